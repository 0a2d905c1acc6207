"""``gonka-p2p sim``: run one scenario from a seed, or sweep one of its knobs over seeds.

``gonka-p2p sim SCENARIO --seed 7 --out runs/honest-7`` runs a scenario file
(or a ready one by name: ``gonka-p2p sim list`` names them) and writes
``report.json`` and its plots; the report names the file's SHA-256 and the
seed, and the same pair (with the same ``--set`` overrides) replays byte for
byte. ``gonka-p2p sim sweep SCENARIO --param validation.floor=0.01:0.2:8
--seeds 20`` runs every (value, seed) pair in parallel processes and writes a
table and one plot per metric (mean and 95 % interval across seeds); see
:mod:`sim.sweep`. ``gonka-p2p sim safety --seeds 1000`` checks consensus over
many random networks (:mod:`sim.safety`). ``python -m sim`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sim.config import scalar_knobs
from sim.plots import write_plots
from sim.render import print_report
from sim.scenario import SCENARIOS, Scenario, ScenarioError, load, parse_override, typed
from sim.world import Simulation

EXIT_USAGE = 2


def _overrides(texts: list[str]) -> dict[str, Any]:
    overrides = {}
    for text in texts:
        path, value = parse_override(text)
        overrides[path] = typed(path, value)
    return overrides


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="a scenario TOML file, or a ready one's name (sim/scenarios/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                        help="override one knob for this run (repeatable; the report lists them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gonka-p2p sim", description=__doc__.split("\n\n")[0])
    _common(parser)
    parser.add_argument("--seed", type=int, default=7, help="the one source of randomness (default 7)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/SCENARIO-SEED)")
    return parser


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gonka-p2p sim sweep",
                                     description="vary one knob over a range, each value over many seeds")
    _common(parser)
    parser.add_argument("--param", required=True, metavar="SECTION.NAME=LOW:HIGH:STEPS",
                        help=f"the knob and its range, e.g. validation.floor=0.01:0.2:8 (knobs: "
                             f"{', '.join(sorted(scalar_knobs()))}; and params.NAME, a genesis parameter, "
                             "mix.STRATEGY, economics.savings.STRATEGY)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per value (default %(default)s)")
    parser.add_argument("--first-seed", type=int, default=1, help="seeds run from this one (default 1)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (default: the cores, %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/sweep-SCENARIO)")
    return parser


def run(argv: list[str], console: Console) -> int:
    args = run_parser().parse_args(argv)
    scenario, overrides = load(args.scenario), _overrides(args.set)
    config = scenario.config(args.seed, overrides)
    simulation = Simulation(config)
    out = args.out or Path("runs") / f"{scenario.name}-{args.seed}"
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
                  TimeElapsedColumn(), console=console, disable=args.quiet, transient=True) as progress:
        task = progress.add_task("blocks", total=simulation.last_height)
        report = simulation.run(lambda height: progress.update(task, completed=height),
                                _identity(scenario, overrides))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json() + "\n")
    write_plots(report, out)
    print_report(report, console, str(out))
    return 0


def _identity(scenario: Scenario, overrides: dict[str, Any]) -> dict[str, object]:
    """What names a run beside its seed: the scenario file's hash and any overrides."""
    return {"scenario": scenario.name, "scenario sha256": scenario.sha256, "overrides": overrides}


def sweep(argv: list[str], console: Console) -> int:
    from sim.sweep import parse_range, run_sweep

    args = sweep_parser().parse_args(argv)
    scenario, overrides = load(args.scenario), _overrides(args.set)
    path, values = parse_range(args.param)
    if args.seeds < 1 or args.workers < 1:
        raise ScenarioError("--seeds and --workers must be at least 1")
    for value in values:  # refuse a bad range before starting any process
        scenario.config(args.first_seed, {**overrides, path: value})
    out = args.out or Path("runs") / f"sweep-{scenario.name}"
    run_sweep(scenario, overrides, path, values, range(args.first_seed, args.first_seed + args.seeds),
              args.workers, out, console, quiet=args.quiet)
    return 0


def list_scenarios(console: Console) -> int:
    for path in sorted(SCENARIOS.glob("*.toml")):
        first = next((ln[2:] for ln in path.read_text().splitlines() if ln.startswith("# ")), "")
        console.print(f"[bold]{path.stem}[/bold]  {first}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    console.width = max(console.width, 100)  # the per-strategy table needs 100 columns (pipes: 80)
    try:
        if argv[:1] == ["list"]:
            return list_scenarios(console)
        if argv[:1] == ["sweep"]:
            return sweep(argv[1:], console)
        if argv[:1] == ["safety"]:
            from sim.safety import main as safety

            return safety(argv[1:], console)
        return run(argv, console)
    except ScenarioError as e:
        console.print(f"[red]error:[/red] {e}")
        return EXIT_USAGE
