"""Validation's share of the network's compute at steady state, and the parameters that move it.

Compute is measured as the simulator models it (:mod:`sim.world`, ``Metrics.compute``): an
execution costs the tokens it generates (prompt + completion); a check or a dispute vote re-runs
the same tokens teacher-forced as one prefill, at ``val_over_gen`` of generating them (the
detection matrix's validation/generation time on SmolLM2, pooled over its honest rows: 0.175;
``benchmarks/results/validation_cost.md`` measures about 0.9 against vLLM's batched
generation). The share is validation / (inference + validation) over the last
epoch's inferences. Because ``val_over_gen`` depends on the hardware and the engine, each row
also gives the raw ratio of re-run tokens to inferred tokens, and the share that ratio means if
a check cost as much as generating (val/gen = 1).

Steady state means every executor at reputation 1, so each inference is checked at the floor m
alone (p = m + (1 - m)(1 - r), capped at ``validation_cap_ppm``). A genesis cannot start a
participant above reputation 0 (``GenesisParticipant`` has no such field), so the runs set
``reputation_growth_epochs = 1``: reputations saturate after one clean epoch and are in force
from epoch 2 (epoch 0 settles during epoch 1), which is the epoch measured. That parameter only
sets how fast reputation grows; at r = 1 no rule reads it. The table's last row checks the
shortcut: the default curve (30 epochs), run for 33 epochs, lands on the same share.

Honest peers only (30 by default, weights 5..20, no churn), one seed, signatures stood in by
the keyed hash (``[network] signatures = "keyed-hash"``, which changes no figure). The second
table holds traffic at 3,000 requests per epoch and varies the floor: flat floors
(``[validation] floor``) and the schedule's points (``params.floor_*``).

    OMP_NUM_THREADS=1 python benchmarks/sim_overhead.py             # both tables, a few minutes
    OMP_NUM_THREADS=1 python benchmarks/sim_overhead.py --quick     # small networks, seconds

Run it at a quiet moment: it prints the load average beside the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gonka_p2p.ledger.rules import PPM  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from sim.world import Simulation  # noqa: E402

SATURATE_IN_ONE = {"reputation_growth_epochs": 1}
DEFAULT_GROWTH_EPOCHS = 30  # the ledger's reputation_growth_epochs (checked against Params below)


@dataclass(frozen=True)
class Case:
    label: str
    requests: int  # per epoch
    epochs: int
    floor: float = 0.0  # flat floor; 0: the ledger's schedule
    params: tuple[tuple[str, int], ...] = tuple(SATURATE_IN_ONE.items())


@dataclass(frozen=True)
class Row:
    case: Case
    floor_m: float  # the measured epoch's floor
    p_validate: float  # mean validation rate of the executors at its start (m, once r = 1)
    reputation: float  # their mean reputation then
    checks: float  # checks and dispute votes per inference, measured epoch
    token_ratio: float  # tokens re-run by validation / tokens inferred
    share: float  # validation's share of compute at the matrix's val_over_gen
    wall_s: float


def measure(case: Case, peers: int, seed: int) -> Row:
    """Run ``case`` and read its last epoch: the steady state once reputations have saturated."""
    config = SimConfig(seed=seed, peers=peers, epochs=case.epochs, requests=case.requests, churn=0.0, mix={},
                       floor=case.floor, signatures="keyed-hash", params=dict(case.params))
    started = time.perf_counter()
    simulation = Simulation(config)
    report = simulation.run()
    wall = time.perf_counter() - started
    last = config.epochs - 1
    metrics = simulation.metrics
    inferred = metrics.inference_compute[last]
    rerun = metrics.validation_compute[last] / simulation.verdicts.val_over_gen
    return Row(case, report.per_epoch["floor m"][last], report.per_epoch["p_validate honest"][last],
               report.per_epoch["reputation honest"][last], report.per_epoch["checks per inference"][last],
               rerun / inferred if inferred else 0.0, metrics.validation_share([last]), wall)


def traffic_cases(quick: bool) -> list[Case]:
    sizes = (20, 50, 100) if quick else (300, 3_000, 30_000)
    cases = [Case(f"{n:,}", n, 3) for n in sizes]
    if not quick:
        cases.append(Case("300, default reputation curve", 300, DEFAULT_GROWTH_EPOCHS + 3, params=()))
    return cases


def floor_cases(quick: bool) -> list[Case]:
    n = 100 if quick else 3_000
    flat = [Case(f"flat {f:.0%}", n, 3, floor=f) for f in ((0.05,) if quick else (0.5, 0.2, 0.05, 0.01))]
    if quick:
        return [Case("schedule (default)", n, 3), *flat]
    schedule = [Case("schedule (default): 100 % to 100 inferences, 5 % at 5,000, 1 % from 10,000", n, 3)]
    steeper = Case("schedule reaching 5 % at 1,000 inferences, 1 % from 2,000", n, 3, params=(
        *SATURATE_IN_ONE.items(), ("floor_mid_inferences", 1_000), ("floor_low_inferences", 2_000)))
    return [*schedule, steeper, *flat]


def table(title: str, first: str, rows: list[Row]) -> list[str]:
    lines = [f"### {title}", "",
             f"| {first} | floor m | validation rate p | reputation r | checks / inference "
             "| re-run / inferred tokens | validation share | share at val/gen = 1 | epochs simulated | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        at_one = r.token_ratio / (1 + r.token_ratio)
        lines.append(f"| {r.case.label} | {r.floor_m:.1%} | {r.p_validate:.1%} | {r.reputation:.2f} | {r.checks:.3f} "
                     f"| {r.token_ratio:.3f} | **{r.share:.1%}** | {at_one:.1%} | {r.case.epochs} | {r.wall_s:.1f} |")
    return lines


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 peers, 20..100 requests per epoch (seconds)")
    parser.add_argument("--peers", type=int, default=None, help="participants (default 30; 10 with --quick)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    peers = args.peers or (10 if args.quick else 30)
    from gonka_p2p.ledger.genesis import Params

    assert Params().reputation_growth_epochs == DEFAULT_GROWTH_EPOCHS, "the default curve's row is stale"
    head = [f"# Validation overhead at steady state (sim, {peers} honest peers, seed {args.seed})", "",
            f"Command: `{' '.join(['OMP_NUM_THREADS=1 python benchmarks/sim_overhead.py', *raw])}`", "",
            f"Before: {load()}", ""]
    print("\n".join(head), flush=True)
    first = [measure(c, peers, args.seed) for c in traffic_cases(args.quick)]
    lines = table("By traffic, ledger defaults", "requests / epoch", first)
    print("\n".join(lines), flush=True)
    second = [measure(c, peers, args.seed) for c in floor_cases(args.quick)]
    lines2 = ["", *table(f"At {second[0].case.requests:,} requests / epoch, by floor", "floor", second)]
    tail = ["", f"After: {load()}"]
    print("\n".join([*lines2, *tail]), flush=True)
    if args.out:
        args.out.write_text("\n".join([*head, *lines, *lines2, *tail]) + "\n")


if __name__ == "__main__":
    main()
