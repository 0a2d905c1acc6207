"""A run's verdict for people (a rich table) and for programs (``report.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gonka_p2p.testnet.invariants import Applied, Verdict


def outcome(verdict: Verdict) -> str:
    return "PASSED" if verdict.passed else "STALLED" if verdict.stalled else "FAILED"


def show(verdict: Verdict, applied: list[Applied], console: Console) -> None:
    table = Table(title=f"testnet invariants: {outcome(verdict)}", title_justify="left")
    for col in ("invariant", "holds", "detail"):
        table.add_column(col)
    for row in verdict.rows:
        table.add_row(row.name, "[green]yes[/green]" if row.holds else "[red]NO[/red]", row.detail)
    console.print(table)
    perts = Table(title="perturbations", title_justify="left")
    for col in ("kind", "targets", "lasted s", "recovered in s"):
        perts.add_column(col)
    for a, r in zip(applied, verdict.recoveries):
        perts.add_row(a.perturbation.kind, ", ".join(map(str, a.perturbation.targets)) or "all",
                      "forever" if a.ended is None else f"{a.ended - a.started:.0f}",
                      "[red]never[/red]" if r is None else f"{r:.1f}")
    console.print(perts)
    console.print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(verdict.counts.items())))


def save(verdict: Verdict, applied: list[Applied], path: Path) -> None:
    path.write_text(json.dumps({
        "outcome": outcome(verdict),
        "rows": [r.__dict__ for r in verdict.rows],
        "counts": verdict.counts,
        "perturbations": [{"kind": a.perturbation.kind, "targets": list(a.perturbation.targets),
                           "started": a.started, "ended": a.ended, "recovered_s": r}
                          for a, r in zip(applied, verdict.recoveries)],
    }, indent=2))
