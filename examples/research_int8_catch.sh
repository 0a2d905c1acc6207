#!/bin/sh
# Research question: how long until an int8 cheater is caught in a network that pins bf16, and
# how does that grow as it cheats on fewer of its requests?
#
# The int8-bf16 scenario (sim/scenarios/int8-bf16.toml): verdicts from the detection matrix's
# bf16 rows, where honest noise is as large as int8's, so a check fails no int8 output of
# SmolLM2's and the evidence is suspicious-but-valid checks (94-98 % of its outputs) and their
# distances, which the ledger's epoch test and its distance run (carried across epochs) add up. The sweep lowers the share q of requests
# it cheats on from 1 to 0.1, 20 seeds each. Read runs/research-int8-catch/blocks-to-catch-int8.png
# (first offence -> the settlement that sanctioned it) beside detection-int8.png (sanctioned /
# offending epochs).
set -e
cd "$(dirname "$0")/.."
gonka-p2p sim sweep int8-bf16 --param behaviour.cheat_fraction=0.1:1:4 --seeds 20 --out runs/research-int8-catch
