"""Sweeps: one knob over a range of values, each value over many seeds, in parallel processes.

Every (value, seed) pair is an independent run of the scenario (each replays
alone from its pair); a worker process returns only the run's metrics
(:func:`metrics_of`), never its state. The table and the plots give, per
value, the mean across seeds and a 95 % interval for it (mean +- t * s /
sqrt(n), Student's t for n - 1 degrees of freedom), so a reader sees whether
two values differ more than their seeds do. Results are ordered by (value,
seed) whatever order the processes finish in, so ``sweep.json`` replays
byte for byte too.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sim.config import knob_kind, scalar_knobs
from sim.metrics import Report
from sim.scenario import Scenario, ScenarioError
from sim.world import Simulation

# Student's t at 97.5 % for 1..30 degrees of freedom; 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def parse_range(text: str) -> tuple[str, list[Any]]:
    """``validation.floor=0.01:0.2:8`` -> ("validation.floor", 8 evenly spaced values); an
    integer knob's values are rounded and repeats dropped; ``a,b,c`` lists values."""
    path, sep, spec = text.partition("=")
    kind = knob_kind(path) if sep else None
    if kind is None:
        raise ScenarioError(f"--param {text!r}: expected SECTION.NAME=LOW:HIGH:STEPS with one of "
                            f"{', '.join(sorted(scalar_knobs()))}, or params.NAME, mix.STRATEGY, "
                            "economics.savings.STRATEGY")
    if kind not in (int, float):
        raise ScenarioError(f"--param {path}: only numeric knobs can be swept")
    try:
        if ":" in spec:
            low, high, steps = spec.split(":")
            n = int(steps)
            if n < 1:
                raise ValueError("STEPS must be at least 1")
            lo, hi = float(low), float(high)
            values = [lo + (hi - lo) * i / (n - 1) if n > 1 else lo for i in range(n)]
        else:
            values = [float(v) for v in spec.split(",")]
    except ValueError as e:
        raise ScenarioError(f"--param {text!r}: {e} (LOW:HIGH:STEPS, or a list a,b,c)") from None
    if kind is int:
        return path, list(dict.fromkeys(round(v) for v in values))
    return path, [round(v, 12) for v in values]


def metrics_of(report: Report) -> dict[str, float]:
    """The numbers a sweep compares, per strategy and for the network (None-valued ones left out)."""
    out: dict[str, float] = {}
    for row in report.strategies:
        if row.strategy == "honest":
            continue
        out[f"profit vs honest: {row.strategy}"] = row.profit
        if row.detection is not None:
            out[f"detection: {row.strategy}"] = row.detection
        if row.blocks_to_catch is not None:
            out[f"blocks to catch: {row.strategy}"] = row.blocks_to_catch
        if row.offenders:
            out[f"caught within its epoch: {row.strategy}"] = row.caught_within_epoch / row.offenders
    network = report.network
    # latencies in ms: with simulated consensus only; "poc: ...": with proof of compute only
    for key in ("validation compute share", "validation compute share, last epoch", "fair: Gini of reward per weight", "honest convicted",
                "disputes", "checks per inference", "commit latency mean (ms)", "commit latency p99 (ms)",
                "request latency mean (ms)", "poc: overclaims caught share",
                "poc: fair max |weight share / compute share - 1|", "poc: max voting power share"):
        value = network.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value):
            out[key] = float(value)
    return out


def run_one(job: tuple[Scenario, dict[str, Any], int]) -> dict[str, float]:
    """One (value, seed) pair, in a worker process."""
    scenario, overrides, seed = job
    return metrics_of(Simulation(scenario.config(seed, overrides)).run())


def interval(samples: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95 % interval); half-width 0 for one sample."""
    mean = fmean(samples)
    if len(samples) < 2:
        return mean, 0.0
    t = _T975[len(samples) - 2] if len(samples) - 1 <= len(_T975) else 1.96
    return mean, t * stdev(samples) / math.sqrt(len(samples))


def run_sweep(scenario: Scenario, overrides: dict[str, Any], path: str, values: list[Any],
              seeds: range, workers: int, out: Path, console: Console, *, quiet: bool = False) -> dict[str, Any]:
    jobs = [(scenario, {**overrides, path: value}, seed) for value in values for seed in seeds]
    results: list[dict[str, float]] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool, Progress(
            TextColumn(f"sweeping {path}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
            TimeElapsedColumn(), console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("runs", total=len(jobs))
        for metrics in pool.map(run_one, jobs):  # in submission order: (value, seed)
            results.append(metrics)
            progress.advance(task)
    names = sorted({name for metrics in results for name in metrics})
    summary: dict[str, Any] = {
        "scenario": scenario.name, "scenario sha256": scenario.sha256, "overrides": overrides,
        "param": path, "values": values, "seeds": [seeds.start, seeds.stop - 1],
        "metrics": {}, "runs": results}
    for name in names:
        rows = []
        for i, value in enumerate(values):
            samples = [m[name] for m in results[i * len(seeds):(i + 1) * len(seeds)] if name in m]
            mean, half = interval(samples) if samples else (None, None)  # e.g. nobody caught at this value
            rows.append({"value": value, "mean": mean, "ci95": half, "n": len(samples)})
        summary["metrics"][name] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    from sim.plots import plot_sweep

    for name, rows in summary["metrics"].items():
        plot_sweep(path, name, rows, out / f"{_slug(name)}.png")
    console.print(sweep_table(summary))
    console.print(f"sweep.json and one plot per metric in {out}")
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def sweep_table(summary: dict[str, Any]) -> Table:
    """One line per (metric, value): the mean across seeds, its 95 % interval, and how many
    seeds had the metric (a time to catch exists only in runs that caught someone)."""
    table = Table(title=f"sweep of {summary['param']} over {summary['scenario']} (seeds "
                        f"{summary['seeds'][0]}..{summary['seeds'][1]})", box=box.SIMPLE_HEAD)
    for column in ("metric", summary["param"], "mean", "+- 95 %", "seeds"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, rows in summary["metrics"].items():
        for i, r in enumerate(rows):
            mean, half = ("-", "-") if r["mean"] is None else (f"{r['mean']:.3g}", f"{r['ci95']:.2g}")
            table.add_row(name if i == 0 else "", f"{r['value']:g}", mean, half, str(r["n"]),
                          end_section=i == len(rows) - 1)
    return table
