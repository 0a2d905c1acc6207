#!/bin/sh
# Research question: what validation floor makes a q = 10 % cheater unprofitable?
#
# The q10-cheater scenario (sim/scenarios/q10-cheater.toml): an int4 executor that, once its
# reputation is high, cheats on 10 % of its requests in a network where fees pay for compute.
# The sweep runs it at 8 flat validation floors m, 20 seeds each, in parallel processes.
# Read runs/research-floor-q10/profit-vs-honest-int4.png: the floor where the mean (and its
# 95 % interval) falls below 1 is where cheating stops paying; the report of any single run
# (gonka-p2p sim q10-cheater --seed 7) prints the break-even table it is checked against.
set -e
cd "$(dirname "$0")/.."
gonka-p2p sim sweep q10-cheater --param validation.floor=0.01:0.2:8 --seeds 20 --out runs/research-floor-q10
