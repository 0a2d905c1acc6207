"""How a replica answers the ledger query protocol (:mod:`gonka_p2p.ledger.query`).

The answers read committed state only (a replica's view may lag the
network's by a block or so); :func:`answer` is a pure function of a
:class:`LedgerView`, so the replica's handler is a two-liner. Kept apart
from the protocol's schemas so that a client, which only asks, never loads
the state machine.
"""

from __future__ import annotations

from typing import Protocol

from gonka_p2p.ledger.mempool import TxRefused
from gonka_p2p.ledger.query import (
    MAX_LISTED_PARTICIPANTS,
    REQUESTS,
    AppHashQuery,
    AppHashReply,
    BalanceQuery,
    BalanceReply,
    EpochSummaryQuery,
    EpochSummaryReply,
    InferenceQuery,
    InferenceReply,
    ModelWeight,
    ParticipantInfo,
    PocResultInfo,
    QueryFailed,
    StatusQuery,
    StatusReply,
    SubmitReply,
    SubmitTx,
)
from gonka_p2p.ledger.end_of_block import format_epoch_summary
from gonka_p2p.ledger.poc import Phase, RoundKind, phase, regular_start
from gonka_p2p.ledger.poc_rounds import verdicts
from gonka_p2p.ledger.rules import epoch_of, is_account_address
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.schema import Message, WireError
from gonka_p2p.wire.unsigned import decode_frame_of, encode_frame


class LedgerView(Protocol):
    """What :func:`answer` reads: a replica's committed state and a few of its counters."""

    @property
    def state(self) -> LedgerState: ...

    @property
    def evidence_count(self) -> int: ...

    @property
    def mempool_size(self) -> int: ...

    def app_hash_at(self, height: int) -> bytes | None: ...

    def submit(self, raw: bytes) -> bytes: ...


def answer(view: LedgerView, request: Message) -> Message:
    """The reply to one decoded request."""
    state = view.state
    if isinstance(request, StatusQuery):
        power = state.weights()
        enabled = bool(state.params.poc_enabled)
        return StatusReply(
            chain_id=state.chain_id, height=state.height, epoch=state.epoch, time_ms=state.time_ms,
            app_hash=state.app_hash(), mempool=view.mempool_size, evidence=view.evidence_count,
            participants=[ParticipantInfo(peer_id=p, weight=r.weight, power=power.get(p, 0),
                                          model_weights=[ModelWeight(model=m, weight=r.weight_for(m))
                                                         for m in r.models if r.weight_for(m)],
                                          models=list(r.models), completed=r.completed, missed=r.missed)
                          for p, r in list(state.participants().items())[:MAX_LISTED_PARTICIPANTS]],
            poc_enabled=enabled, next_poc=next_regular_round(state) if enabled else 0,
            confirmation=confirmation_start(state), prover=request.prover,
            last_poc=last_poc_results(state, request.prover) if request.prover else [])
    if isinstance(request, BalanceQuery):
        if not is_account_address(request.account):
            return QueryFailed(code="invalid_address", message=f"{request.account!r} is not a peer id")
        account = state.account(request.account)
        return BalanceReply(account=request.account, exists=account is not None,
                            balance=account.balance if account else 0,
                            sequence=account.sequence if account else 0,
                            pending_fees=state.pending_fees(request.account), height=state.height)
    if isinstance(request, InferenceQuery):
        return inference_reply(state, request.inference_id)
    if isinstance(request, AppHashQuery):
        app_hash = view.app_hash_at(request.height)
        return AppHashReply(height=request.height, found=app_hash is not None, app_hash=app_hash or b"")
    if isinstance(request, SubmitTx):
        try:
            tx_hash = view.submit(request.tx)
        except TxRefused as e:
            return SubmitReply(tx_hash=b"", code=e.code, detail=e.detail[:1024])
        return SubmitReply(tx_hash=tx_hash, code="ok", detail="")
    if isinstance(request, EpochSummaryQuery):
        summary = state.epoch_summary(request.epoch)
        if summary is None:
            return EpochSummaryReply(epoch=request.epoch, settled=False, caught=[], paid=[], checked=[],
                                     fees_paid=0, fees_refunded=0, minted=0, text="")
        rows = summary.participants
        return EpochSummaryReply(
            epoch=request.epoch, settled=True, caught=[r.peer for r in rows if r.caught],
            paid=[r.peer for r in rows if r.fees_paid > 0], checked=[r.peer for r in rows if r.checked > 0],
            fees_paid=summary.fees_paid,
            fees_refunded=summary.fees_refunded, minted=summary.minted,
            text=format_epoch_summary(summary)[:256 * 1024])
    return QueryFailed(code="unknown_query", message=f"cannot answer {request.KIND}")


def inference_reply(state: LedgerState, inference_id: bytes) -> InferenceReply:
    """How ``state`` holds one inference, as a client asks it (``found`` False: never, or pruned)."""
    record = state.inference(inference_id)
    if record is None:
        return InferenceReply(inference_id=inference_id, found=False, status="", client="",
                              executor="", escrow=0, cost=0, height=state.height, response_hash=b"",
                              executor_addrs=[])
    executor = state.participant(record.executor)
    return InferenceReply(inference_id=inference_id, found=True, status=record.status.value,
                          client=record.client, executor=record.executor, escrow=record.escrow,
                          cost=record.cost, height=state.height, response_hash=record.response_hash,
                          executor_addrs=list(executor.addrs) if executor is not None else [])


def next_regular_round(state: LedgerState) -> int:
    """The first compute height of the next regular proof-of-compute round: this epoch's, until
    it has started, else the next epoch's (a fixed offset into each epoch)."""
    epoch = epoch_of(state.height + 1, state.params)
    start = regular_start(epoch, state.params)
    return start if start > state.height else regular_start(epoch + 1, state.params)


def confirmation_start(state: LedgerState) -> int:
    """This epoch's confirmation round's first compute height once it has opened, else 0: its
    start is drawn block by block, so nobody -- this replica included -- knows it earlier."""
    record = state.poc_rounds.get((epoch_of(state.height + 1, state.params), RoundKind.CONFIRMATION))
    return record.start if record is not None else 0


def last_poc_results(state: LedgerState, prover: str) -> list[PocResultInfo]:
    """``prover``'s commitments in the last round it committed to (one per model), each with its
    verdict: proven or fraud once enough of the judging power said so (``poc.Verdicts``), pending while
    the round's verdict phase lasts, unproven after it."""
    mine = sorted((key, entry) for key, entry in state.poc_entries.rows.items() if key[2] == prover)
    if not mine:
        return []
    epoch, kind = mine[-1][0][0], RoundKind(mine[-1][0][1])
    record = state.poc_rounds.get((epoch, kind))
    results = []
    for (e, k, _, model), entry in mine:
        if (e, k) != (epoch, kind):
            continue
        judged = verdicts(state, epoch, prover, model, entry)
        if judged.proven or judged.fraud:
            verdict = "proven" if judged.proven else "fraud"
        elif record is not None and phase(state.height + 1, record.start, kind, state.params) is not Phase.OVER:
            verdict = "pending"
        else:
            verdict = "unproven"
        results.append(PocResultInfo(epoch=epoch, round=kind.name.lower(), model=model,
                                     count=entry.count, verdict=verdict))
    return results


def answer_frame(view: LedgerView, frame: bytes) -> bytes:
    """Decode a request frame and encode its reply; bad frames get a ``QueryFailed``."""
    try:
        request = decode_frame_of(frame, *REQUESTS)
    except WireError as e:
        return encode_frame(QueryFailed(code=e.code, message=str(e)[:1024]))
    return encode_frame(answer(view, request))
