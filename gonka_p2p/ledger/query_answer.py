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
    ParticipantInfo,
    QueryFailed,
    StatusQuery,
    StatusReply,
    SubmitReply,
    SubmitTx,
)
from gonka_p2p.ledger.rules import is_account_address
from gonka_p2p.ledger.end_of_block import format_epoch_summary
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
        return StatusReply(
            chain_id=state.chain_id, height=state.height, epoch=state.epoch, time_ms=state.time_ms,
            app_hash=state.app_hash(), mempool=view.mempool_size, evidence=view.evidence_count,
            participants=[ParticipantInfo(peer_id=p, weight=r.weight, models=list(r.models),
                                          completed=r.completed, missed=r.missed)
                          for p, r in list(state.participants().items())[:MAX_LISTED_PARTICIPANTS]])
    if isinstance(request, BalanceQuery):
        if not is_account_address(request.account):
            return QueryFailed(code="invalid_address", message=f"{request.account!r} is not a peer id")
        account = state.account(request.account)
        return BalanceReply(account=request.account, exists=account is not None,
                            balance=account.balance if account else 0,
                            sequence=account.sequence if account else 0,
                            pending_fees=state.pending_fees(request.account), height=state.height)
    if isinstance(request, InferenceQuery):
        record = state.inference(request.inference_id)
        if record is None:
            return InferenceReply(inference_id=request.inference_id, found=False, status="", client="",
                                  executor="", escrow=0, cost=0, height=state.height)
        return InferenceReply(inference_id=request.inference_id, found=True, status=record.status.value,
                              client=record.client, executor=record.executor, escrow=record.escrow,
                              cost=record.cost, height=state.height)
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
            return EpochSummaryReply(epoch=request.epoch, settled=False, caught=[], paid=[], fees_paid=0,
                                     fees_refunded=0, minted=0, text="")
        rows = summary.participants
        return EpochSummaryReply(
            epoch=request.epoch, settled=True, caught=[r.peer for r in rows if r.caught],
            paid=[r.peer for r in rows if r.fees_paid > 0], fees_paid=summary.fees_paid,
            fees_refunded=summary.fees_refunded, minted=summary.minted,
            text=format_epoch_summary(summary)[:256 * 1024])
    return QueryFailed(code="unknown_query", message=f"cannot answer {request.KIND}")


def answer_frame(view: LedgerView, frame: bytes) -> bytes:
    """Decode a request frame and encode its reply; bad frames get a ``QueryFailed``."""
    try:
        request = decode_frame_of(frame, *REQUESTS)
    except WireError as e:
        return encode_frame(QueryFailed(code=e.code, message=str(e)[:1024]))
    return encode_frame(answer(view, request))
