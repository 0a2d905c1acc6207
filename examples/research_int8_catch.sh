#!/bin/sh
# Research question: how long until an int8 cheater is caught, and how does that grow as it
# cheats on fewer of its requests?
#
# The int8 scenario (a subtle cheat: most of its outputs pass, some look suspicious, so the
# ledger's epoch test rather than a single failed check catches it), swept over the share q of
# requests it cheats on. Read runs/research-int8-catch/blocks-to-catch-int8.png (first offence
# -> the settlement that sanctioned it) beside detection-int8.png (sanctioned / offending epochs).
set -e
cd "$(dirname "$0")/.."
gonka-p2p sim sweep int8 --param behaviour.cheat_fraction=0.1:1:4 --seeds 20 --out runs/research-int8-catch
