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
  charged without an answer, none still running after the settle time. A
  request the ledger settled while the client saw an error is judged by what
  the client holds against what was committed (the response hash and token
  count of the settled record, read from the replayed stores): *answered,
  last frame lost* -- every token of the committed answer reached the client,
  signed by the executor the ledger paid, and only the closing
  ``InferenceFinished`` frame was cut (a perturbation broke the relay after
  the executor had sent it and claimed the work); this is no loss and holds.
  *charged, answer cut in relay* -- the executor the ledger paid started the
  stream and claimed a finished answer, but the client holds only part of
  it; *charged without answer* -- anything else (no token, another executor,
  tokens that are not the committed answer). Those two are losses and fail.
  A completed request settled with another answer than the one verified is
  *charged for another answer*, and fails too. A request sent through the
  OpenAI gateway carries no token ids (the HTTP API shows text): it holds the
  committed answer when the paid executor's frames, all verified by the
  gateway, number the committed count. The ledger prunes an inference once
  its epoch has settled, so the observer's final ``settle`` query finds the
  early ones absent; the replayed stores saw them settle, and they are judged
  as settled. *Answered, unrecorded* is then an answer no store ever saw
  settle: served, never charged or paid (a TA that died before its Start
  committed, say).
* **streams never hang** -- every request ended: answered, refused, or cut
  by the TA's stall timeout (a silent executor: ``executor_stalled``) or by
  the client's idle timeout (a silent TA: ``StreamStalled``); none reached
  the load's ``timeout_s`` still open. A cut one must be refunded, which the
  previous row judges.
* **membership** (only with ``join`` or ``leave``) -- a participant that
  joined in epoch *e* holds weight at some height of epoch *e* + 3 or
  earlier: epoch *e*'s round may have passed when it started, and it may
  still be fetching the genesis, catching up and warming up when *e* + 1's
  opens (65 s in the 30-minute run, two thirds of its 100-block epochs), so
  its first round is *e* + 2's at the latest, whose weights hold in *e* + 3.
  One that left in epoch *e* never holds more than in *e* + 1 (weight it
  earned in *e*'s round before it left is its due there), and from *e* + 2
  on, its weight never rises, and every epoch in which it still holds weight
  is one whose decreases together spent the whole bound a round may move
  (``poc.declined_targets``): its weight is kept only by the bound. Honest
  provers' weights wander from round to round and their falls share the
  bound, so the leaver's steps can be small (run 11: 284, 117, 92, 80, 49,
  35, 24, 0 over seven epochs), or none: down to its last units, its share of
  the bound rounds to zero and the leftover units go to larger remainders
  (run 18: 116, 1, 1, 0); a run may end while it still falls.
* **a peer behind a NAT serves and validates** (only with ``nat``) -- each
  participant behind a NAT has inferences settled with it as the executor,
  validations of its committed, and requests answered with it as the TA: the
  load client, on the public side, can reach it only through the circuit
  its relay holds, so those answers crossed a relay.
* **no honest participant penalised** -- every participant of a testnet is
  honest, so none may end the run caught cheating, sanctioned, or with a
  verdict of its overturned by a dispute: a crash, a partition or evidence
  it could not serve must cost it at most the work it did not finish (the
  inferences that expired in its hands, reported beside). Checks a validator
  left undone when it revealed are reported beside too, not judged: each one
  forfeits that epoch's reward, which is the brief's rule also for a
  validator that was down or cut off for its whole validation window.
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
from gonka_p2p.ledger.genesis import Genesis, Params
from gonka_p2p.ledger.rules import shift_budget
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


STANDING = ("caught", "sanctioned", "overturned", "missed")  # a participant's record, as the ledger keeps it
SKIPPED = "skipped"  # beside it: duties left unchecked at its reveals (read from the reveals, kept while they are)


def note_standing(state: LedgerState, standing: dict[str, dict[str, int]]) -> None:
    """Merge each participant's :data:`STANDING` counters in ``state`` into ``standing`` (the
    counters only grow, so the highest seen is the longest store's)."""
    for peer, participant in state.registry.rows.items():
        mine = standing.setdefault(peer, dict.fromkeys(STANDING, 0))
        for counter in STANDING:
            mine[counter] = max(mine[counter], int(getattr(participant, counter)))


def note_skipped(revealed: dict[tuple[int, str], int], standing: dict[str, dict[str, int]]) -> None:
    """Merge each validator's unchecked duties, summed over its reveals, into ``standing``."""
    skipped: dict[str, int] = defaultdict(int)
    for (_, validator), left in revealed.items():
        skipped[validator] += left
    for peer, left in skipped.items():
        mine = standing.setdefault(peer, dict.fromkeys(STANDING, 0))
        mine[SKIPPED] = max(mine.get(SKIPPED, 0), left)


async def replay_store(path: Path, genesis: Genesis, answers: dict[str, dict[str, Any]] | None = None,
                       checks: set[tuple[str, str]] | None = None,
                       standing: dict[str, dict[str, int]] | None = None) -> tuple[dict[int, str], str | None]:
    """Every stored height's app hash, replayed from genesis with a full invariant check after each
    block; and the first violation, if any. ``answers``, when given, is filled with what each
    inference's record committed as its answer (hex id -> response hash, completion tokens,
    executor), kept as seen even once the record is pruned; ``checks`` with every committed
    validation (hex inference id, validator); ``standing`` with each participant's
    :data:`STANDING` counters at the store's last height and the duties it left unchecked at
    every reveal the store holds (:data:`SKIPPED`; the highest across stores)."""
    store = await LedgerStore.open(path, genesis)
    hashes: dict[int, str] = {}
    revealed: dict[tuple[int, str], int] = {}  # (epoch, validator) -> duties it left unchecked
    try:
        state = LedgerState.from_genesis(genesis)
        while True:
            batch = await store.blocks(state.height + 1, 256)
            if not batch:
                if standing is not None:
                    note_standing(state, standing)
                    note_skipped(revealed, standing)
                return hashes, None
            for height, raw, _ in batch:
                apply_block(state, decode_block(raw))
                try:
                    check_invariants(state)
                except InvariantViolation as e:
                    return hashes, f"height {height}: {e}"
                hashes[height] = state.app_hash().hex()
                if checks is not None:
                    checks.update((iid.hex(), validator) for iid, validator in state.checks.rows)
                if standing is not None:
                    revealed |= {key: c.duties - c.done for key, c in state.commitments.rows.items()
                                 if c.revealed_height}
                if answers is not None:
                    for iid, record in state.inferences.rows.items():
                        if record.response_hash:
                            answers[iid.hex()] = {"response_hash": record.response_hash.hex(),
                                                  "completion_tokens": record.completion_tokens,
                                                  "executor": record.executor}
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


def charged_failure(r: dict[str, Any], record: dict[str, Any], committed: dict[str, Any] | None) -> str:
    """What happened to a request the ledger settled while its client saw an error (see the module doc)."""
    paid = record.get("executor") or (committed or {}).get("executor", "")
    if not r.get("tokens") or r.get("executor") != paid or committed is None:
        return "charged without answer"
    same = r["answer"] == committed["response_hash"] if "answer" in r else r.get("via") == "http"
    if same and r.get("tokens") == committed["completion_tokens"]:
        return "answered, last frame lost"
    if r.get("tokens", 0) < committed["completion_tokens"]:
        return "charged, answer cut in relay"
    return "charged without answer"


def judge_requests(sent: list[dict[str, Any]], ledger: dict[str, Any],
                   answers: dict[str, dict[str, Any]] | None = None) -> tuple[Row, dict[str, int]]:
    """``answers``: the committed answers (:func:`replay_store`); without them a settled request the
    client saw fail is judged charged without answer."""
    answers = answers or {}
    counts: dict[str, int] = defaultdict(int)
    bad: list[str] = []
    for r in sent:
        if r["outcome"] == "skipped":
            counts["skipped"] += 1
            continue
        counts["sent"] += 1
        record = ledger.get(r["id"]) or {}
        status = record.get("status", "unknown")
        committed = answers.get(r["id"])
        if status == "absent" and committed is not None:  # settled, then pruned with its epoch
            record, status = {"status": "settled", "executor": committed["executor"]}, "settled"
        answered = r["outcome"] == "ok"
        counts["completed" if answered else "failed"] += 1
        if status in ("started", "finished", "unknown"):
            counts["unresolved"] += 1
            bad.append(f"{r['id'][:12]} {status}")
        elif not answered and status == "settled":
            what = charged_failure(r, record, committed)
            counts[what] += 1
            if what != "answered, last frame lost":
                got = (f"{r.get('tokens', 0)} of {committed['completion_tokens']} tokens" if committed
                       else f"{r.get('tokens', 0)} tokens")
                bad.append(f"{r['id'][:12]} {what} ({got}), client got {r.get('error', '')[:60]}")
        elif (answered and status == "settled" and committed is not None and "answer" in r
              and r["answer"] != committed["response_hash"]):
            counts["charged for another answer"] += 1
            bad.append(f"{r['id'][:12]} charged for another answer than the one verified")
        elif status == "expired":
            counts["refunded"] += 1
        elif not answered:
            counts["never charged"] += 1
        elif status == "absent":
            counts["answered, unrecorded"] += 1
    detail = (f"{counts['sent']} sent: {counts['completed']} verified, {counts['refunded']} refunded, "
              f"{counts['never charged']} failed uncharged, "
              + (f"{counts.get('answered, last frame lost')} answered but last frame lost, "
                 if counts.get("answered, last frame lost") else "")
              + f"{len(bad)} lost")
    if bad:
        detail += f"; first: {bad[0]}"
    return Row("no request lost or charged without answer", not bad, detail), dict(counts)


# cut for silence, not hung: executor_stalled (TA), StreamStalled (libp2p client), the SDK's read timeout
STALLED_ERRORS = ("stalled", "apitimeouterror")  # matched without regard to case


def judge_streams(sent: list[dict[str, Any]]) -> Row:
    """No request hung; how many were cut for silence (by the TA or the client) and how."""
    ended = [r for r in sent if r["outcome"] != "skipped"]
    hung = [r for r in ended if r.get("hung")]
    cut = [r for r in ended if not r.get("hung") and any(s in r.get("error", "").lower() for s in STALLED_ERRORS)]
    detail = f"{len(ended)} ended, {len(cut)} cut for silence, {len(hung)} hung"
    if hung:
        detail += f"; first: {hung[0]['id'][:12]} via {hung[0].get('via', 'libp2p')}"
    return Row("streams never hang", not hung, detail)


def _epoch_at(observed: list[dict[str, Any]], t: float) -> int:
    return max((o["epoch"] for o in observed if "epoch" in o and o["t"] <= t), default=0)


def _membership_change(a: Applied, peer: str, observed: list[dict[str, Any]], reached: int) -> tuple[bool, str]:
    """Whether one join or leave took effect in time (see the module doc), and what was seen."""
    index, joined = a.perturbation.targets[0], _epoch_at(observed, a.started)
    later = [o for o in observed if "weights" in o and o["t"] > a.started]
    if a.perturbation.kind == "join":
        in_time = [o for o in later if o["epoch"] <= joined + 3]
        won = next((o for o in in_time if o["weights"].get(peer, 0) > 0), None)
        if won is None:
            cut_short = f" (the run reached epoch {reached})" if reached < joined + 3 else ""
            return False, f"joiner {index} (epoch {joined}): no weight by epoch {joined + 3}{cut_short}"
        return True, f"joiner {index} (epoch {joined}): weight {won['weights'][peer]} in epoch {won['epoch']}"
    # Weight a leaver earned in the round of the epoch it left in (before leaving) is its due in
    # the next epoch; from there it falls by bounded steps.
    due = [o for o in observed if "weights" in o and o["epoch"] <= joined + 1]
    held = due[-1]["weights"] if due else {}
    risen = next((o for o in later if o["epoch"] > joined + 1 and o["weights"].get(peer, 0) > held.get(peer, 0)),
                 None)
    if risen is not None:
        return False, f"leaver {index} (epoch {joined}): weight rose to {risen['weights'][peer]} in epoch {risen['epoch']}"
    by_epoch = {o["epoch"]: o["weights"] for o in observed if "weights" in o}
    falling = sorted(e for e in by_epoch if e >= joined + 2)
    if not falling:
        return False, f"leaver {index} (epoch {joined}): the run ended in epoch {reached}, before its weight could fall"
    shift_ppm = Params().max_weight_shift_ppm
    for epoch in falling:
        before, now = by_epoch.get(epoch - 1), by_epoch[epoch]
        if not now.get(peer, 0) or before is None:
            continue
        if now[peer] > before.get(peer, 0):
            return False, f"leaver {index} (epoch {joined}): weight rose to {now[peer]} in epoch {epoch}"
        spent = sum(max(0, w - now.get(p, 0)) for p, w in before.items())
        bound = shift_budget(sum(before.values()), shift_ppm)
        if spent < bound:
            return False, (f"leaver {index} (epoch {joined}): weight {now[peer]} kept in epoch {epoch} although "
                           f"the epoch's decreases spent {spent} of the {bound} the bound allows")
    last = falling[-1]
    if by_epoch[last].get(peer, 0):
        return True, (f"leaver {index} (epoch {joined}): falling by bounded steps, "
                      f"{by_epoch[last][peer]} in epoch {last} (the run's last)")
    gone = min(e for e in falling if not any(by_epoch[x].get(peer, 0) for x in falling if x >= e))
    return True, f"leaver {index} (epoch {joined}): weight 0 from epoch {gone}"


def judge_membership(observed: list[dict[str, Any]], applied: list[Applied], peers: list[str]) -> Row | None:
    """Joiners gain weight and leavers lose it in time (see the module doc); None without either."""
    changes = [a for a in applied if a.perturbation.kind in ("join", "leave")]
    if not changes:
        return None
    reached = max((o["epoch"] for o in observed if "epoch" in o), default=0)
    seen = [_membership_change(a, peers[a.perturbation.targets[0]], observed, reached) for a in changes]
    detail = "; ".join([what for ok, what in seen if not ok] + [what for ok, what in seen if ok])
    return Row("joiners gain weight (3 epochs), leavers lose it (bounded steps)", all(ok for ok, _ in seen),
               detail)


def judge_nat(index: int, peer: str, sent: list[dict[str, Any]], answers: dict[str, dict[str, Any]],
              checks: set[tuple[str, str]]) -> Row:
    executed = sum(a["executor"] == peer for a in answers.values())
    validated = sum(validator == peer for _, validator in checks)
    relayed = sum(r.get("ta") == index and r.get("outcome") == "ok" for r in sent)
    return Row(f"participant {index} behind a NAT serves and validates", bool(executed and validated and relayed),
               f"{executed} inferences settled as executor, {validated} validations committed, {relayed} "
               "requests answered as TA through its relay's circuit")


def judge_standing(standing: dict[str, dict[str, int]]) -> Row:
    penalised = {peer: {k: v for k, v in counters.items() if k not in ("missed", SKIPPED) and v}
                 for peer, counters in standing.items()}
    penalised = {peer: counters for peer, counters in penalised.items() if counters}
    missed = sum(counters["missed"] for counters in standing.values())
    skipped = {peer[-8:]: counters[SKIPPED] for peer, counters in standing.items() if counters.get(SKIPPED)}
    detail = (f"penalised: {', '.join(f'{peer[-8:]} {counters}' for peer, counters in penalised.items())}"
              if penalised else f"none caught, sanctioned or overturned among {len(standing)} participants")
    return Row("no honest participant penalised", not penalised,
               f"{detail}; {missed} inferences expired in their executors' hands (unpaid, unpunished); "
               f"checks left undone at a reveal (that epoch's reward forfeited): {skipped or 0}")


def judge(observed: list[dict[str, Any]], sent: list[dict[str, Any]], settled: dict[str, Any],
          applied: list[Applied], stores: dict[int, tuple[dict[int, str], str | None]],
          recovery_bound_s: float, process_failures: list[str],
          answers: dict[str, dict[str, Any]] | None = None, peers: list[str] | None = None,
          nat: tuple[int, ...] = (), checks: set[tuple[str, str]] | None = None,
          standing: dict[str, dict[str, int]] | None = None) -> Verdict:
    """``peers``: every participant's peer id by index (joiners included), for the membership and NAT
    rows; ``nat``: the participants behind a NAT; ``checks``: the committed validations;
    ``standing``: each participant's record on the ledger (:func:`replay_store`)."""
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
    row, verdict.counts = judge_requests(sent, settled.get("inferences", {}), answers)
    verdict.rows.append(row)
    verdict.rows.append(judge_streams(sent))
    membership = judge_membership(observed, applied, peers or [])
    if membership is not None:
        verdict.rows.append(membership)
    verdict.rows += [judge_nat(i, (peers or [])[i], sent, answers or {}, checks or set()) for i in nat]
    if standing:
        verdict.rows.append(judge_standing(standing))
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
