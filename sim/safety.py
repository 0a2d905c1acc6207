"""``gonka-p2p sim safety --seeds 1000``: the consensus promise, checked over many seeds.

Each seed runs :class:`sim.consensus_sim.Scenario.random` twice over a random
network (lossy until GST, maybe a partition that forms and heals, 4 to 10
replicas of random power):

* *within the bound*: byzantine power below 1/3, equivocating. It must be
  ``safe``: no two honest replicas commit different blocks, every honest
  replica commits ``target_heights`` heights after GST, and no invariant of
  the replica breaks. Anything else fails the run, naming the seed and the
  command that replays it.
* *beyond the bound*: the same network with byzantine power >= 1/3
  (withholding on even seeds, equivocating on odd ones). Its verdict is
  ``unsafe`` (a fork, or power the protocol gives no guarantee against) or
  ``stalled``; a ``safe`` verdict there would be a silent pass and fails
  the run.

Seeds fan out over processes; the table counts verdicts per side. CI runs
1,000 seeds (tests/test_sim_consensus.py times it); ``--seeds 10000`` is the
long run.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from sim.consensus_sim import LivenessFailure, Scenario, SimFailure, simulate

VALIDATORS = (4, 10)  # replicas per run: drawn from the seed in this range
STALL_MS = 5_000  # beyond the bound, this long without an honest commit ends the run: stalled


def within_bound(seed: int) -> str:
    """The verdict of ``seed``'s network with byzantine power below 1/3: 'safe', or why not."""
    scenario = Scenario.random(seed, 4 + seed % (VALIDATORS[1] - VALIDATORS[0] + 1))
    try:
        result = simulate(scenario)
        result.check_safety()
        result.check_liveness()
    except LivenessFailure as e:
        return f"stalled: {e}"
    except SimFailure as e:
        return f"unsafe: {e}"
    return "safe"


def beyond_bound(seed: int) -> str:
    """The verdict of ``seed``'s network with a third or more of the power byzantine."""
    base = Scenario.random(seed, 4 + seed % (VALIDATORS[1] - VALIDATORS[0] + 1))
    n = len(base.powers)
    byzantine = tuple(range(n))[: -(-n // 3)]  # ceil(n/3) replicas ...
    powers = tuple(max(base.powers) if i in byzantine else p for i, p in enumerate(base.powers))  # ... >= 1/3
    scenario = replace(base, powers=powers, byzantine=byzantine, bound_byzantine=False,
                       byzantine_mode="withhold" if seed % 2 == 0 else "equivocate",
                       stall_ms=STALL_MS)
    assert not scenario.tolerated
    try:
        result = simulate(scenario)
        result.check_safety()
        result.check_liveness()
    except LivenessFailure:
        return "stalled"
    except SimFailure:
        return "unsafe"
    return "unsafe"  # no fork showed, but none is excluded: never reported as safe


def _verdicts(seed: int) -> tuple[int, str, str]:
    return seed, within_bound(seed), beyond_bound(seed)


def run_safety(seeds: range, workers: int) -> tuple[Counter[str], Counter[str], list[str]]:
    """(within-bound verdicts, beyond-bound verdicts, failures with their replay commands)."""
    within: Counter[str] = Counter()
    beyond: Counter[str] = Counter()
    failures = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for seed, inside, outside in pool.map(_verdicts, seeds, chunksize=16):
            within[inside.split(":")[0]] += 1
            beyond[outside] += 1
            if inside != "safe":
                failures.append(f"{inside}\n  replay: python -m sim.consensus_sim --seed {seed} "
                                f"--validators {4 + seed % (VALIDATORS[1] - VALIDATORS[0] + 1)}")
            if outside == "safe":
                failures.append(f"seed {seed}: byzantine power >= 1/3 reported safe")
    return within, beyond, failures


def main(argv: list[str], console: Console) -> int:
    parser = argparse.ArgumentParser(prog="gonka-p2p sim safety", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1000, help="seeds to run (default %(default)s)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds run from this one (default 1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (default: the cores, %(default)s)")
    args = parser.parse_args(argv)
    within, beyond, failures = run_safety(range(args.first_seed, args.first_seed + args.seeds), args.workers)
    table = Table(title=f"consensus safety over {args.seeds} seeds (random networks, partitions that heal)")
    table.add_column("byzantine power")
    for verdict in ("safe", "stalled", "unsafe"):
        table.add_column(verdict, justify="right")
    table.add_row("< 1/3 (equivocating)", *(str(within[v]) for v in ("safe", "stalled", "unsafe")))
    table.add_row(">= 1/3 (withholding / equivocating)", *(str(beyond[v]) for v in ("safe", "stalled", "unsafe")))
    console.print(table)
    for failure in failures:
        console.print(f"[red]FAIL[/red] {failure}")
    console.print("[red]failed[/red]" if failures else
                  "passed: below 1/3 every seed safe and live; at or above 1/3 none reported safe")
    return 1 if failures else 0
