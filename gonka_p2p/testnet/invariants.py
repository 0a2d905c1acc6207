"""The invariants a testnet run must keep, judged from what it recorded; one row each.

Inputs: the observer's status lines (``watch``), the load generator's
request lines, the observer's ``settle`` answers, the perturbations applied
(with wall-clock start and end), and every replica's SQLite store once the
nodes stopped. Rows:

* **no participant crashed or failed to restart** -- no process exited that
  the harness did not stop, and each came back from its own data directory
  after a kill or a rolling restart.
* **app hashes agree** -- every pair of observations at one height carry one
  app hash; and, offline, every replica's stored blocks replay to the same
  app hash at every height they share (a divergent commit cannot hide in a
  height nobody polled).
* **no conflicting votes** -- no replica has seen an equivocation.
* **committed blocks survive** -- a replica's stored chain reaches at least
  the highest height it ever reported (a crash lost nothing acknowledged).
* **conservation** -- replaying each store, genesis supply + minted - burned
  equals the coins held at every height (``check_invariants``).
* **no request lost** -- every request completed with a verified answer, or
  the ledger holds no charge for it (absent, or expired and refunded); none
  charged without an answer, none still running after the settle time.
* **liveness** -- after each perturbation ends (one never undone: after it
  starts), some replica commits a new height within ``recovery_bound_s``, and
  one does in the run's last such window; a run in which either fails is
  STALLED (with byzantine power >= 1/3 frozen this is the correct outcome,
  and it is reported as such, never as a pass).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gonka_p2p.ledger.block import decode_block
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants
from gonka_p2p.ledger.store import LedgerStore
from gonka_p2p.ledger.tables import InvariantViolation
from gonka_p2p.testnet.manifest import Perturbation


@dataclass(frozen=True)
class Applied:
    """A perturbation as it happened: wall-clock seconds since the epoch."""

    perturbation: Perturbation
    started: float
    ended: float | None  # None: never undone (freeze forever)


@dataclass
class Row:
    name: str
    holds: bool
    detail: str


@dataclass
class Verdict:
    rows: list[Row] = field(default_factory=list)
    recoveries: list[float | None] = field(default_factory=list)  # seconds, None: never recovered
    counts: dict[str, int] = field(default_factory=dict)
    stalled: bool = False

    @property
    def passed(self) -> bool:
        return not self.stalled and all(r.holds for r in self.rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def replay_store(path: Path, genesis: Genesis) -> tuple[dict[int, str], str | None]:
    """Every stored height's app hash, replayed from genesis with a full invariant check after each
    block; and the first violation, if any."""
    store = await LedgerStore.open(path, genesis)
    hashes: dict[int, str] = {}
    try:
        state = LedgerState.from_genesis(genesis)
        while True:
            batch = await store.blocks(state.height + 1, 256)
            if not batch:
                return hashes, None
            for height, raw, _ in batch:
                apply_block(state, decode_block(raw))
                try:
                    check_invariants(state)
                except InvariantViolation as e:
                    return hashes, f"height {height}: {e}"
                hashes[height] = state.app_hash().hex()
    finally:
        await store.close()


def _agreement(by_node: dict[int, dict[int, str]], what: str) -> Row:
    seen: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for node, hashes in by_node.items():
        for height, h in hashes.items():
            if node not in seen[height][h]:
                seen[height][h].append(node)
    split = {height: dict(v) for height, v in seen.items() if len(v) > 1}
    if split:
        height = min(split)
        return Row(f"app hashes agree ({what})", False,
                   f"{len(split)} heights split, first {height}: {split[height]}")
    return Row(f"app hashes agree ({what})", True, f"{len(seen)} heights, {len(by_node)} replicas")


def recovery_after(observed: list[dict[str, Any]], at: float, bound: float) -> float | None:
    """Seconds from ``at`` until the highest observed height exceeds the highest seen up to ``at``."""
    before = max((o["height"] for o in observed if "height" in o and o["t"] <= at), default=0)
    later = [o["t"] for o in observed if "height" in o and o["t"] > at and o["height"] > before]
    first = min(later, default=None)
    return None if first is None or first - at > bound else first - at


def judge_requests(sent: list[dict[str, Any]], ledger: dict[str, Any]) -> tuple[Row, dict[str, int]]:
    counts: dict[str, int] = defaultdict(int)
    bad: list[str] = []
    for r in sent:
        if r["outcome"] == "skipped":
            counts["skipped"] += 1
            continue
        counts["sent"] += 1
        status = (ledger.get(r["id"]) or {}).get("status", "unknown")
        answered = r["outcome"] == "ok"
        counts["completed" if answered else "failed"] += 1
        if status in ("started", "finished", "unknown"):
            counts["unresolved"] += 1
            bad.append(f"{r['id'][:12]} {status}")
        elif not answered and status == "settled":
            counts["charged without answer"] += 1
            bad.append(f"{r['id'][:12]} charged, client got {r.get('error', '')[:60]}")
        elif status == "expired":
            counts["refunded"] += 1
        elif not answered:
            counts["never charged"] += 1
        elif status == "absent":
            counts["answered, unrecorded"] += 1
    detail = (f"{counts['sent']} sent: {counts['completed']} verified, {counts['refunded']} refunded, "
              f"{counts['never charged']} failed uncharged, {len(bad)} lost")
    if bad:
        detail += f"; first: {bad[0]}"
    return Row("no request lost or charged without answer", not bad, detail), dict(counts)


def judge(observed: list[dict[str, Any]], sent: list[dict[str, Any]], settled: dict[str, Any],
          applied: list[Applied], stores: dict[int, tuple[dict[int, str], str | None]],
          recovery_bound_s: float, process_failures: list[str]) -> Verdict:
    verdict = Verdict()
    verdict.rows.append(Row("no participant crashed or failed to restart", not process_failures,
                            "; ".join(process_failures) or "none"))
    polled: dict[int, dict[int, str]] = defaultdict(dict)
    for o in observed:
        if "height" in o and o["height"] > 0:
            polled[o["node"]][o["height"]] = o["app_hash"]
    verdict.rows.append(_agreement(polled, "as polled"))
    verdict.rows.append(_agreement({n: h for n, (h, _) in stores.items()}, "stores replayed"))
    evidence = {o["node"]: o["evidence"] for o in observed if o.get("evidence")}
    evidence |= {n["node"]: n["evidence"] for n in settled.get("nodes", []) if n.get("evidence")}
    verdict.rows.append(Row("no replica saw conflicting votes", not evidence,
                            f"equivocations seen: {evidence}" if evidence else "0 on every replica"))
    lost = {n: (max(polled[n]), max(h, default=0)) for n, (h, _) in stores.items()
            if polled.get(n) and max(polled[n]) > max(h, default=0)}
    verdict.rows.append(Row("committed blocks survive crashes", not lost,
                            f"reported vs stored height: {lost}" if lost else
                            f"stores reach {', '.join(str(max(h, default=0)) for h, _ in stores.values())}"))
    broken = {n: v for n, (_, v) in stores.items() if v}
    verdict.rows.append(Row("conservation at every height", not broken,
                            f"{broken}" if broken else
                            f"{sum(len(h) for h, _ in stores.values())} replica-heights checked"))
    row, verdict.counts = judge_requests(sent, settled.get("inferences", {}))
    verdict.rows.append(row)
    for a in applied:  # one never undone must not stop the network from its start on
        verdict.recoveries.append(recovery_after(observed, a.started if a.ended is None else a.ended,
                                                 recovery_bound_s))
    never = [a.perturbation.kind for a, r in zip(applied, verdict.recoveries) if r is None]
    last_t = max((o["t"] for o in observed), default=0.0)
    final_progress = recovery_after(observed, last_t - recovery_bound_s, recovery_bound_s) if observed else None
    verdict.stalled = bool(never) or final_progress is None
    done = sorted(r for r in verdict.recoveries if r is not None)
    verdict.rows.append(Row(
        f"liveness: commits again within {recovery_bound_s:g} s", not verdict.stalled,
        (f"STALLED after {', '.join(never)}" if never else
         "STALLED: no commit in the last window" if final_progress is None else
         f"{len(done)} recoveries, p50 {done[len(done) // 2]:.1f} s, max {done[-1]:.1f} s" if done else
         "no perturbation; committing")))
    return verdict
