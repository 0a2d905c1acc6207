#!/bin/sh
# Research question: how much weight must a coalition of validators that accuse honest work
# hold before it convicts anyone, and what does trying cost it?
#
# The framing-coalition scenario, swept over the coalition's share of the total weight. Read
# runs/research-framing/honest-convicted.png (should stay at 0 below 1/2 of the committee
# seats) and profit-vs-honest-framing.png (every overturned accusation costs the accuser its
# epoch reward).
set -e
cd "$(dirname "$0")/.."
gonka-p2p sim sweep framing-coalition --param behaviour.adversary_weight_share=0.1:0.45:4 --seeds 10 --out runs/research-framing
