"""The ledger query protocol: what a client or the CLI may ask a replica, and its answers.

Protocol ``/gonka/ledger/query/1``: one request frame, one reply frame, each
an unsigned versioned frame (:func:`~gonka_p2p.ledger.consensus_wire.encode_frame`;
noise authenticates the replica that answers). Requests and their replies::

    StatusQuery               -> StatusReply     (chain, height, epoch, app hash, participants, ...)
    BalanceQuery(account)     -> BalanceReply
    InferenceQuery(id)        -> InferenceReply
    AppHashQuery(height)      -> AppHashReply    (recent heights only)
    SubmitTx(tx)              -> SubmitReply     (admitted to the mempool, or why not)
    EpochSummaryQuery(epoch)  -> EpochSummaryReply (the epoch's settlement, once it has settled)

Any request that cannot be answered gets a ``QueryFailed`` with a stable
code. The answers read committed state only (a replica's view may lag the
network's by a block or so); :func:`answer` is a pure function of a
:class:`LedgerView`, so the replica's handler is a two-liner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gonka_p2p.ledger.consensus_wire import decode_frame_of, encode_frame
from gonka_p2p.ledger.genesis import MAX_CHAIN_ID, MAX_MODELS
from gonka_p2p.ledger.mempool import TxRefused
from gonka_p2p.ledger.rules import is_account_address
from gonka_p2p.ledger.state import LedgerState, format_epoch_summary
from gonka_p2p.ledger.transactions import MAX_CLIENT_REQUEST_BYTES, MAX_PEER_ID
from gonka_p2p.wire.messages import HASH_BYTES
from gonka_p2p.wire.schema import Message, WireError, bounded

MAX_LISTED_PARTICIPANTS = 4096


@dataclass(frozen=True)
class StatusQuery(Message):
    KIND = "ledger_status_query"


@dataclass(frozen=True)
class BalanceQuery(Message):
    KIND = "ledger_balance_query"
    account: str = bounded(max_len=MAX_PEER_ID)


@dataclass(frozen=True)
class InferenceQuery(Message):
    KIND = "ledger_inference_query"
    inference_id: bytes = bounded(max_len=HASH_BYTES)


@dataclass(frozen=True)
class AppHashQuery(Message):
    KIND = "ledger_app_hash_query"
    height: int = bounded(min_value=0)


@dataclass(frozen=True)
class SubmitTx(Message):
    KIND = "ledger_submit_tx"
    tx: bytes = bounded(max_len=MAX_CLIENT_REQUEST_BYTES + 4096)


@dataclass(frozen=True)
class EpochSummaryQuery(Message):
    KIND = "ledger_epoch_summary_query"
    epoch: int = bounded(min_value=0)


@dataclass(frozen=True)
class ParticipantInfo(Message):
    KIND = "ledger_participant_info"
    peer_id: str = bounded(max_len=MAX_PEER_ID)
    weight: int = bounded(min_value=0)
    models: list[str] = bounded(max_len=MAX_MODELS)
    completed: int = bounded(min_value=0)
    missed: int = bounded(min_value=0)


@dataclass(frozen=True)
class StatusReply(Message):
    KIND = "ledger_status_reply"
    chain_id: str = bounded(max_len=MAX_CHAIN_ID)
    height: int = bounded(min_value=0)
    epoch: int = bounded(min_value=0)
    time_ms: int = bounded(min_value=0)
    app_hash: bytes = bounded(max_len=HASH_BYTES)
    participants: list[ParticipantInfo] = bounded(max_len=MAX_LISTED_PARTICIPANTS)
    mempool: int = bounded(min_value=0)
    evidence: int = bounded(min_value=0)  # equivocations this replica has seen


@dataclass(frozen=True)
class BalanceReply(Message):
    KIND = "ledger_balance_reply"
    account: str = bounded(max_len=MAX_PEER_ID)
    exists: bool = bounded()
    balance: int = bounded(min_value=0)
    sequence: int = bounded(min_value=0)
    pending_fees: int = bounded(min_value=0)
    height: int = bounded(min_value=0)


@dataclass(frozen=True)
class InferenceReply(Message):
    KIND = "ledger_inference_reply"
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    found: bool = bounded()
    status: str = bounded(max_len=16)
    client: str = bounded(max_len=MAX_PEER_ID)
    executor: str = bounded(max_len=MAX_PEER_ID)
    escrow: int = bounded(min_value=0)
    cost: int = bounded(min_value=0)
    height: int = bounded(min_value=0)


@dataclass(frozen=True)
class AppHashReply(Message):
    KIND = "ledger_app_hash_reply"
    height: int = bounded(min_value=0)
    found: bool = bounded()
    app_hash: bytes = bounded(max_len=HASH_BYTES)


@dataclass(frozen=True)
class SubmitReply(Message):
    KIND = "ledger_submit_reply"
    tx_hash: bytes = bounded(max_len=HASH_BYTES)
    code: str = bounded(max_len=64)  # "ok", or why the mempool refused it
    detail: str = bounded(max_len=1024)


@dataclass(frozen=True)
class EpochSummaryReply(Message):
    """Who was paid, caught and refunded when ``epoch`` settled; ``text`` is the table for people."""

    KIND = "ledger_epoch_summary_reply"
    epoch: int = bounded(min_value=0)
    settled: bool = bounded()
    caught: list[str] = bounded(max_len=MAX_LISTED_PARTICIPANTS)
    paid: list[str] = bounded(max_len=MAX_LISTED_PARTICIPANTS)  # executors paid fees
    fees_paid: int = bounded(min_value=0)
    fees_refunded: int = bounded(min_value=0)
    minted: int = bounded(min_value=0)
    text: str = bounded(max_len=256 * 1024)


@dataclass(frozen=True)
class QueryFailed(Message):
    KIND = "ledger_query_failed"
    code: str = bounded(max_len=64)
    message: str = bounded(max_len=1024)


REQUESTS: tuple[type[Message], ...] = (StatusQuery, BalanceQuery, InferenceQuery, AppHashQuery, SubmitTx,
                                       EpochSummaryQuery)
REPLIES: tuple[type[Message], ...] = (StatusReply, BalanceReply, InferenceReply, AppHashReply, SubmitReply,
                                      EpochSummaryReply, QueryFailed)


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
