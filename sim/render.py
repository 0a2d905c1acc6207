"""A run's report as rich tables, for people reading a terminal."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from sim.metrics import Report


def _num(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def strategies_table(report: Report) -> Table:
    table = Table(title="Per strategy: offending epochs, those the ledger sanctioned, time to catch "
                        "(first offence -> settlement), minted reward per weight vs honest",
                  box=box.SIMPLE_HEAD)
    table.add_column("strategy", no_wrap=True)
    for column in ("peers", "offend", "sanct.", "detect", "in ep.", "blocks", "epochs", "rwd/w",
                   "profit", "accused"):
        table.add_column(column, justify="right", min_width=len(column))
    for row in report.strategies:
        detection = "-" if row.detection is None else f"{row.detection:.0%}"
        table.add_row(row.strategy, _num(row.peers), _num(row.active_epochs), _num(row.sanctioned_epochs),
                      detection, f"{row.caught_within_epoch}/{row.peers}", _num(row.blocks_to_catch),
                      _num(row.epochs_to_catch), f"{row.reward_per_weight:.2f}", f"{row.profit:.2f}",
                      _num(row.accusations))
    return table


def break_even_table(report: Report) -> Table:
    """Does cheating pay? Per (q, reputation) and validation floor: P(caught within the epoch)
    and whether the expected gain is positive (sim.economics)."""
    floors = sorted({row["floor"] for row in report.break_even})
    table = Table(title="Break-even of a one-epoch cheat (sim.economics): P(caught), and 'PAYS' where "
                        "the compute saved beats the expected loss", box=box.SIMPLE_HEAD)
    table.add_column("q", justify="right")
    table.add_column("reputation", justify="right")
    for floor in floors:
        table.add_column(f"floor {floor:g}", justify="right")
    cells: dict[tuple[float, float], list[str]] = {}
    for row in report.break_even:
        mark = "PAYS" if row["pays"] else "no"
        cells.setdefault((float(row["q"]), float(row["reputation"])), []).append(f"{row['P(caught)']:.2f} {mark}")
    for (q, reputation), row_cells in cells.items():
        table.add_row(f"{q:g}", f"{reputation:g}", *row_cells)
    return table


def network_table(report: Report) -> Table:
    table = Table(title="Network: throughput, overhead, latency, fairness, coins", box=box.SIMPLE_HEAD)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in report.network.items():
        table.add_row(key, _num(value))
    return table


def poc_table(report: Report) -> Table:
    """Proof of compute, per participant: its compute share and its final weight share (fair:
    equal), and its weight at each epoch's start (joiners rising, leavers falling to 0)."""
    poc = report.poc
    table = Table(title=f"Proof of compute: weight follows compute (sample size {poc['sample size']}, "
                        f"overclaim k = {poc['overclaim k']:g})", box=box.SIMPLE_HEAD)
    for column in ("peer", "role", "nonces/block", "compute share", "weight share", "weight by epoch"):
        table.add_column(column, justify="left" if column in ("peer", "role") else "right", no_wrap=True)
    for row in poc["participants"]:  # type: ignore[union-attr]
        table.add_row(row["peer"], row["role"], _num(row["capacity"]), f"{row['compute share']:.3f}",
                      f"{row['weight share']:.3f}", " ".join(str(w) for w in row["weights"]))
    return table


def poc_rounds_table(report: Report) -> Table:
    """Each round's commitments as the ledger judged them."""
    table = Table(title="Proof-of-compute rounds: commitments proven, failed by a majority (fraud), "
                        "unjudged", box=box.SIMPLE_HEAD)
    columns = ("epoch", "round", "commitments", "proven", "fraud", "unproven", "honest fraud")
    for column in columns:
        table.add_column(column, justify="left" if column == "round" else "right")
    for row in report.poc["rounds"]:  # type: ignore[union-attr]
        table.add_row(*(_num(row[c]) for c in columns))
    return table


def print_report(report: Report, console: Console, out: str) -> None:
    config = report.config
    console.print(f"[bold]gonka-p2p network simulation[/bold]: scenario {config.get('scenario', '-')} "
                  f"(sha256 {str(config.get('scenario sha256', '-'))[:16]}...), seed {config['seed']}, "
                  f"{config['peers']} peers, {config['epochs']} epochs of {config['epoch_blocks']} blocks, "
                  f"{config['requests']} requests per epoch, verdicts from {config['verdicts']}")
    if config.get("overrides"):
        console.print(f"overrides: {config['overrides']}")
    console.print(strategies_table(report))
    console.print(network_table(report))
    if report.poc:
        console.print(poc_rounds_table(report))
        console.print(poc_table(report))
        shares = " ".join(f"{s:.3f}" for s in report.poc["max voting power share"])  # type: ignore[union-attr]
        console.print(f"largest voting power share by epoch: {shares} "
                      f"(cap {report.poc['voting power cap']:.3f} with 4 or more participants)")
    if report.break_even:
        console.print(break_even_table(report))
    if report.rejected_txs:
        console.print("[yellow]transactions the ledger rejected:[/yellow] "
                      + ", ".join(f"{k} x{n}" for k, n in report.rejected_txs.items()))
    console.print(f"digest {report.digest}  (replay: the same scenario file, --seed and --set)")
    console.print(f"plots and report.json in {out}")
