#!/bin/sh
# Research question: what does a 1/4 byzantine minority cost in commit latency?
#
# The byzantine-minority scenario (sim/scenarios/byzantine-minority.toml): the chain's 10
# consensus replicas run Tendermint in the same run as the economics, under two partitions
# that form and heal. The sweep raises the byzantine share of the replicas from 0 to 1/4
# (0, 1, 2 and 3 of the 10: equivocating, proposing invalid blocks), 10 seeds each.
# Read runs/research-byzantine-latency/commit-latency-mean-ms.png (and the p99 beside it):
# the cost of the minority is the rise over the share-0 point; request-latency-mean-ms.png
# shows it reaching the clients. Every run's report says safe; a share of 1/3 or more
# (--set consensus.byzantine_share=0.34) is reported stalled or unsafe, never safe.
set -e
cd "$(dirname "$0")/.."
gonka-p2p sim sweep byzantine-minority --param consensus.byzantine_share=0,0.1,0.2,0.25 --seeds 10 --out runs/research-byzantine-latency
