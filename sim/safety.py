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

* *with the ledger*: every ``--ledger-every``-th seed (default 10) also
  drives the real ledger state machine through a small economic run (8
  peers, one an int4 cheater, 2 epochs) under a consensus drawn from that
  seed -- 4 to 7 equal replicas, the largest minority below 1/3
  equivocating, one or two partitions that heal (:mod:`sim.consensus_run`)
  -- which checks coin conservation at every block
  (:class:`~sim.chain.ConservationError`). It must be ``safe`` with coins
  conserved.

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
from itertools import repeat

from rich.console import Console
from rich.table import Table

from sim.chain import ConservationError
from sim.config import SimConfig
from sim.consensus_sim import LivenessFailure, Scenario, SimFailure, simulate
from sim.world import Simulation

VALIDATORS = (4, 10)  # replicas per run: drawn from the seed in this range
STALL_MS = 5_000  # beyond the bound, this long without an honest commit ends the run: stalled
LEDGER_EVERY = 10  # every this many seeds also runs the ledger under its consensus (with_ledger)


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


def with_ledger(seed: int) -> str:
    """The verdict of ``seed``'s small economic run on the real ledger, its blocks committed by a
    byzantine minority's consensus under partitions: 'safe', or why not."""
    validators = 4 + seed % 4
    config = SimConfig(seed=seed, peers=8, epochs=2, requests=30, epoch_blocks=60, clients=5, churn=0.0,
                       mix={"int4": 1}, validators=validators, byzantine_share=((validators - 1) // 3) / validators,
                       partitions=1 + seed % 2, partition_ms=3_000, signatures="keyed-hash")
    try:
        simulation = Simulation(config)
        simulation.run()
    except ConservationError as e:
        return f"unsafe: seed {seed}: coins not conserved: {e}"
    assert simulation.consensus is not None
    outcome = simulation.consensus
    return "safe" if outcome.verdict == "safe" else f"{outcome.verdict}: seed {seed}: {outcome.why}"


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


def _verdicts(seed: int, ledger_every: int) -> tuple[int, str, str, str | None]:
    ledger = with_ledger(seed) if ledger_every and seed % ledger_every == 0 else None
    return seed, within_bound(seed), beyond_bound(seed), ledger


def run_safety(seeds: range, workers: int, ledger_every: int = LEDGER_EVERY
               ) -> tuple[Counter[str], Counter[str], Counter[str], list[str]]:
    """(within-bound verdicts, beyond-bound verdicts, verdicts with the ledger, failures with
    their replay commands); ``ledger_every`` 0 runs no ledger."""
    within: Counter[str] = Counter()
    beyond: Counter[str] = Counter()
    ledger: Counter[str] = Counter()
    failures = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for seed, inside, outside, economic in pool.map(_verdicts, seeds, repeat(ledger_every), chunksize=16):
            within[inside.split(":")[0]] += 1
            beyond[outside] += 1
            if inside != "safe":
                failures.append(f"{inside}\n  replay: python -m sim.consensus_sim --seed {seed} "
                                f"--validators {4 + seed % (VALIDATORS[1] - VALIDATORS[0] + 1)}")
            if outside == "safe":
                failures.append(f"seed {seed}: byzantine power >= 1/3 reported safe")
            if economic is not None:
                ledger[economic.split(":")[0]] += 1
                if economic != "safe":
                    failures.append(f"{economic}\n  replay: python -c 'from sim.safety import with_ledger; "
                                    f"print(with_ledger({seed}))'")
    return within, beyond, ledger, failures


def main(argv: list[str], console: Console) -> int:
    parser = argparse.ArgumentParser(prog="gonka-p2p sim safety", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1000, help="seeds to run (default %(default)s)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds run from this one (default 1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (default: the cores, %(default)s)")
    parser.add_argument("--ledger-every", type=int, default=LEDGER_EVERY,
                        help="every this many seeds also run the ledger under that consensus, checking coins "
                             "(default %(default)s; 0: never)")
    args = parser.parse_args(argv)
    within, beyond, ledger, failures = run_safety(range(args.first_seed, args.first_seed + args.seeds),
                                                  args.workers, args.ledger_every)
    table = Table(title=f"consensus safety over {args.seeds} seeds (random networks, partitions that heal)")
    table.add_column("byzantine power")
    for verdict in ("safe", "stalled", "unsafe"):
        table.add_column(verdict, justify="right")
    table.add_row("< 1/3 (equivocating)", *(str(within[v]) for v in ("safe", "stalled", "unsafe")))
    table.add_row(">= 1/3 (withholding / equivocating)", *(str(beyond[v]) for v in ("safe", "stalled", "unsafe")))
    if ledger:
        table.add_row("< 1/3, with the ledger (coins checked every block)",
                      *(str(ledger[v]) for v in ("safe", "stalled", "unsafe")))
    console.print(table)
    for failure in failures:
        console.print(f"[red]FAIL[/red] {failure}")
    console.print("[red]failed[/red]" if failures else
                  "passed: below 1/3 every seed safe and live (coins conserved where the ledger ran); "
                  "at or above 1/3 none reported safe")
    return 1 if failures else 0
