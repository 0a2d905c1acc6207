"""The ledger query protocol: what a client or the CLI may ask a replica, and its answers.

Protocol ``/gonka/ledger/query/1``: one request frame, one reply frame, each
an unsigned versioned frame (:func:`~gonka_p2p.wire.unsigned.encode_frame`;
noise authenticates the replica that answers). Requests and their replies::

    StatusQuery(prover)       -> StatusReply     (chain, height, epoch, app hash, participants with their
                                                  weights per model and voting power, the proof-of-compute
                                                  schedule, and ``prover``'s last proof-of-compute result)
    BalanceQuery(account)     -> BalanceReply
    InferenceQuery(id)        -> InferenceReply
    AppHashQuery(height)      -> AppHashReply    (recent heights only)
    SubmitTx(tx)              -> SubmitReply     (admitted to the mempool, or why not)
    EpochSummaryQuery(epoch)  -> EpochSummaryReply (the epoch's settlement, once it has settled)

Any request that cannot be answered gets a ``QueryFailed`` with a stable
code. This module is the protocol only -- schemas a client imports without
loading the ledger's state machine; how a replica answers is
:mod:`gonka_p2p.ledger.query_answer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gonka_p2p.ledger.genesis import MAX_CHAIN_ID, MAX_MODEL_NAME, MAX_MODELS
from gonka_p2p.ledger.transactions import MAX_CLIENT_REQUEST_BYTES, MAX_PEER_ID
from gonka_p2p.wire.messages import HASH_BYTES
from gonka_p2p.wire.schema import Message, bounded, each

MAX_LISTED_PARTICIPANTS = 4096
PEER_IDS = each(max_len=MAX_PEER_ID)  # the bound of each item of a list of peer ids


@dataclass(frozen=True)
class StatusQuery(Message):
    KIND = "ledger_status_query"
    prover: str = bounded(max_len=MAX_PEER_ID)  # whose last proof-of-compute result to include ("": nobody's)


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
class ModelWeight(Message):
    KIND = "ledger_model_weight"
    model: str = bounded(max_len=MAX_MODEL_NAME)
    weight: int = bounded(min_value=0)


@dataclass(frozen=True)
class ParticipantInfo(Message):
    KIND = "ledger_participant_info"
    peer_id: str = bounded(max_len=MAX_PEER_ID)
    weight: int = bounded(min_value=0)
    power: int = bounded(min_value=0)  # consensus voting power: weight, capped per participant
    model_weights: list[ModelWeight] = bounded(max_len=MAX_MODELS)  # executor-draw weight per model
    models: list[str] = bounded(max_len=MAX_MODELS, items=each(max_len=MAX_MODEL_NAME))
    completed: int = bounded(min_value=0)
    missed: int = bounded(min_value=0)


@dataclass(frozen=True)
class PocResultInfo(Message):
    """One commitment of a prover's last proof-of-compute round, and how the round judged it."""

    KIND = "ledger_poc_result"
    epoch: int = bounded(min_value=0)
    round: str = bounded(max_len=16)  # "regular" | "confirmation"
    model: str = bounded(max_len=MAX_MODEL_NAME)
    count: int = bounded(min_value=0)  # nonces committed
    verdict: str = bounded(max_len=16)  # "proven" | "fraud" | "unproven" | "pending"


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
    poc_enabled: bool = bounded()
    next_poc: int = bounded(min_value=0)  # first compute height of the next regular round (0: PoC off)
    confirmation: int = bounded(min_value=0)  # this epoch's confirmation round's start, once open (else 0)
    prover: str = bounded(max_len=MAX_PEER_ID)  # the query's prover
    last_poc: list[PocResultInfo] = bounded(max_len=MAX_MODELS)  # its last round's commitments, one per model


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
    VERSION = 3  # 2: response_hash (what a client checks a recovered answer against); 3: executor_addrs
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    found: bool = bounded()
    status: str = bounded(max_len=16)
    client: str = bounded(max_len=MAX_PEER_ID)
    executor: str = bounded(max_len=MAX_PEER_ID)
    escrow: int = bounded(min_value=0)
    cost: int = bounded(min_value=0)
    height: int = bounded(min_value=0)
    response_hash: bytes = bounded(max_len=HASH_BYTES)  # the executor's Finish claim; empty before it
    # Where the executor says it listens (its ledger record): a client recovering a cut answer
    # may never have dialled it (a participant that joined after the client connected).
    executor_addrs: list[str] = bounded(max_len=8, items=each(max_len=256))


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
    caught: list[str] = bounded(max_len=MAX_LISTED_PARTICIPANTS, items=PEER_IDS)
    paid: list[str] = bounded(max_len=MAX_LISTED_PARTICIPANTS, items=PEER_IDS)  # executors paid fees
    checked: list[str] = bounded(max_len=MAX_LISTED_PARTICIPANTS, items=PEER_IDS)  # with an inference checked
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
