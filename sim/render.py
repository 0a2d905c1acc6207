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
                   "accused"):
        table.add_column(column, justify="right", min_width=len(column))
    for row in report.strategies:
        detection = "-" if row.detection is None else f"{row.detection:.0%}"
        table.add_row(row.strategy, _num(row.peers), _num(row.active_epochs), _num(row.sanctioned_epochs),
                      detection, f"{row.caught_within_epoch}/{row.peers}", _num(row.blocks_to_catch),
                      _num(row.epochs_to_catch), f"{row.reward_per_weight:.2f}", _num(row.accusations))
    return table


def network_table(report: Report) -> Table:
    table = Table(title="Network: throughput, overhead, latency, fairness, coins", box=box.SIMPLE_HEAD)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in report.network.items():
        table.add_row(key, _num(value))
    return table


def print_report(report: Report, console: Console, out: str) -> None:
    config = report.config
    console.print(f"[bold]gonka-p2p network simulation[/bold]: seed {config['seed']}, {config['peers']} peers, "
                  f"{config['epochs']} epochs of {config['epoch blocks']} blocks, "
                  f"{config['requests per epoch']} requests per epoch, verdicts from {config['verdicts']}")
    console.print(strategies_table(report))
    console.print(network_table(report))
    if report.rejected_txs:
        console.print("[yellow]transactions the ledger rejected:[/yellow] "
                      + ", ".join(f"{k} x{n}" for k, n in report.rejected_txs.items()))
    console.print(f"digest {report.digest}  (replay: same --seed and flags)")
    console.print(f"plots and report.json in {out}")
