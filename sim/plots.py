"""A run's report as PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from sim.metrics import Report  # noqa: E402

# Fixed metadata: PNGs carry no wall-clock timestamp or version, so a seed's plots are bytes-equal.
_PNG_METADATA = {"Software": None}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=_PNG_METADATA)
    plt.close(fig)
    return path


def plot_rewards(report: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy, curve in report.reward_curves.items():
        ax.plot(range(len(curve)), curve, label=strategy, linewidth=2.5 if strategy == "honest" else 1.2)
    ax.set(title="Cumulative minted reward per unit weight", xlabel="epoch", ylabel="coins / weight")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_detection(report: Report, path: Path) -> Path:
    rows = [r for r in report.strategies if r.strategy != "honest"]
    names = [r.strategy for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.bar(names, [100 * (r.detection or 0.0) for r in rows], color="tab:red")
    left.set(title="Detection: sanctioned epochs / offending epochs", ylabel="%", ylim=(0, 105))
    right.bar(names, [r.blocks_to_catch or 0.0 for r in rows], color="tab:blue")
    right.set(title="Time to catch: first offence -> settlement", ylabel="blocks")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def plot_validation(report: Report, path: Path) -> Path:
    per_epoch = report.per_epoch
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(per_epoch["floor m"], "k--", label="floor m")
    for key in sorted(per_epoch):
        if key.startswith("p_validate ") and key.endswith(("honest", "int8", "silent")):
            ax.plot(per_epoch[key], label=key)
        if key.startswith("reputation ") and key.endswith(("honest", "silent")):
            ax.plot(per_epoch[key], ":", label=key)
    ax.set(title="p_validate = m + (1 - m)(1 - r) and reputation r at each epoch's start",
           xlabel="epoch", ylabel="probability / reputation", ylim=(-0.02, 1.05))
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_throughput(report: Report, path: Path) -> Path:
    per_epoch = report.per_epoch
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(per_epoch["settled"], label="settled")
    top.plot(per_epoch["expired"], label="expired (refunded)")
    top.set(title="Inferences per epoch", ylabel="inferences")
    top.legend(fontsize="small")
    bottom.plot(per_epoch["checks per inference"], color="tab:green")
    bottom.set(title="Verification overhead: checks and votes per inference", xlabel="epoch",
               ylabel="checks / inference")
    return _save(fig, path)


def plot_profit(report: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy, curve in report.profit_curves.items():
        ax.plot(range(len(curve)), curve, label=strategy, linewidth=2.5 if strategy == "honest" else 1.2)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set(title="Cumulative profit per weight / a stable honest peer's (above 1: the strategy pays)",
           xlabel="epoch", ylabel="relative profit")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_catch_times(report: Report, path: Path) -> Path:
    rows = [r for r in report.strategies if r.catch_blocks]
    fig, ax = plt.subplots(figsize=(8, 5))
    if rows:
        ax.boxplot([r.catch_blocks for r in rows], showmeans=True)
        ax.set_xticks(range(1, len(rows) + 1), [r.strategy for r in rows], rotation=45)
    ax.set(title="Time to catch, per sanctioned peer: first offence -> settlement", ylabel="blocks")
    return _save(fig, path)


def plot_poc(report: Report, path: Path) -> Path:
    """Proof of compute: each participant's weight by epoch (joiners rise, leavers and caught
    overclaimers fall to 0), and its final weight share against its compute share."""
    rows = report.poc["participants"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in rows:  # type: ignore[union-attr]
        honest = row["role"] == "honest"
        left.plot(row["weights"], color="0.75" if honest else None, linewidth=0.8 if honest else 2,
                  label=None if honest else f"{row['peer']} ({row['role']})")
    left.set(title="Weight at each epoch's start (grey: honest)", xlabel="epoch", ylabel="weight")
    left.legend(fontsize="small")
    for role in sorted({row["role"] for row in rows}):  # type: ignore[union-attr]
        mine = [row for row in rows if row["role"] == role]  # type: ignore[union-attr]
        right.scatter([r["compute share"] for r in mine], [r["weight share"] for r in mine], label=role)
    top = max([0.01, *(max(r["compute share"], r["weight share"]) for r in rows)])  # type: ignore[union-attr]
    right.plot([0, top], [0, top], "k--", linewidth=0.8, label="weight = compute")
    right.set(title="Final weight share vs compute share", xlabel="compute share", ylabel="weight share")
    right.legend(fontsize="small")
    return _save(fig, path)


def plot_sweep(param: str, metric: str, rows: list[dict[str, float]], path: Path) -> Path:
    """One metric of a sweep: its mean across seeds per value, with the 95 % interval."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in rows if r["mean"] is not None]
    ax.errorbar([r["value"] for r in measured], [r["mean"] for r in measured],
                yerr=[r["ci95"] for r in measured], marker="o", capsize=4)
    if metric.startswith("profit vs honest"):
        ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="as profitable as honesty")
        ax.legend(fontsize="small")
    ax.set(title=f"{metric} (mean, 95 % interval across seeds)", xlabel=param, ylabel=metric)
    return _save(fig, path)


def plot_scale(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """``benchmarks/sim_scale.py``'s curve: wall time and peak memory against peers, log-log,
    beside the lines time ~ peers (k = 1) and ~ peers^2 (k = 2) through the smallest size;
    a projected size (not run) is a hollow marker."""
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    peers = [r["peers"] for r in rows]
    run = [r for r in rows if not r.get("projected")]
    time_ax.plot([r["peers"] for r in run], [r["wall_s"] for r in run], "o-", label="wall time (run)")
    projected = [r for r in rows if r.get("projected")]
    if projected:
        time_ax.plot([r["peers"] for r in projected], [r["wall_s"] for r in projected], "o", mfc="none",
                     label="projected, not run")
    first = rows[0]
    for k, style in ((1, ":"), (2, "--")):
        time_ax.plot(peers, [first["wall_s"] * (p / first["peers"]) ** k for p in peers], style, color="grey",
                     label=f"~ peers^{k}")
    time_ax.set(xscale="log", yscale="log", title=title, xlabel="peers (3 requests each)", ylabel="seconds")
    time_ax.legend(fontsize="small")
    memory_ax.plot([r["peers"] for r in run], [r["peak_mib"] for r in run], "o-", color="tab:green")
    memory_ax.set(xscale="log", title="Peak resident memory", xlabel="peers", ylabel="MiB")
    return _save(fig, path)


def write_plots(report: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [plot_rewards(report, out / "rewards.png"), plot_detection(report, out / "detection.png"),
            plot_validation(report, out / "validation.png"), plot_throughput(report, out / "throughput.png"),
            plot_profit(report, out / "profit.png"), plot_catch_times(report, out / "catch.png"),
            *([plot_poc(report, out / "poc.png")] if report.poc else [])]
