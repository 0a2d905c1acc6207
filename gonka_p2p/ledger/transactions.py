"""Ledger transactions: wire schemas sealed in signed envelopes, and their reason codes.

A transaction is a :class:`~gonka_p2p.wire.schema.Message` of one of the
kinds below, sealed with :func:`~gonka_p2p.wire.envelope.seal` by the account
that acts; the envelope's signer *is* the acting account (its peer id), so no
transaction names its own sender. Build one with, e.g.::

    raw = seal(Transfer(chain_id=cid, to=peer, amount=5, sequence=n), key)

and submit ``raw`` (bytes) to the mempool / a block. The transaction id is
SHA-256 of those bytes.

Replay protection: every transaction carries the ``chain_id`` (a tx signed for
a test network is void on another) and the signer's account ``sequence``,
which must equal the account's next sequence when the tx is applied (each
accepted tx increments it; rejected txs do not). The client's
:class:`InferenceRequest` inside a :class:`StartInference` carries no
sequence: its envelope digest is the inference id, which the ledger accepts
once, within ``request_window_ms`` of the request's timestamp.

Every failure has a stable :class:`Reason` code in the tx's receipt;
decoding failures reuse the wire layer's codes.

Verification transactions (see :mod:`gonka_p2p.ledger.tx_rules` for when a
validator sends which): :class:`CommitValidationSeed`,
:class:`RevealValidationSeed`, :class:`Validation`, :class:`DisputeVote`. A
verdict travels as :class:`VerdictStats`: integers only (distances in
nano-nats), so that the ledger never holds a float; build it from the
verification metric's ``Verdict`` with :func:`verdict_stats`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum, IntFlag, StrEnum
from typing import Any, get_args

from gonka_p2p.identity import digest
from gonka_p2p.ledger.rules import MAX_EXECUTOR_ATTEMPTS
from gonka_p2p.wire.envelope import MAX_SIGNATURE_BYTES, Signed, open_envelope
from gonka_p2p.wire.messages import HASH_BYTES
from gonka_p2p.wire.schema import Message, Oversize, WireError, bounded, each

MAX_PEER_ID = 64
MAX_TOKENS_CLAIM = 2**31  # per inference and per part; far above any context length
MAX_CLIENT_REQUEST_BYTES = 2 * 1024 * 1024  # the schema bound; params.max_tx_bytes bounds it tighter
MAX_DISTANCE_NANO = 10**15  # 1e6 nats: the cap of a distance, which also encodes "not comparable"
MAX_EPOCH = 2**40


class Reason(StrEnum):
    """Why a transaction was rejected (``OK`` when it was applied). Stable wire strings."""

    OK = "ok"
    # Stateless: the bytes themselves.
    MALFORMED = "malformed"
    OVERSIZE = "oversize"
    UNKNOWN_KIND = "unknown_kind"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CHAIN = "wrong_chain"
    # Any transaction, against the state.
    UNKNOWN_ACCOUNT = "unknown_account"  # the signer has no account (never funded nor in genesis)
    BAD_SEQUENCE = "bad_sequence"
    # Transfer.
    INVALID_ADDRESS = "invalid_address"
    INSUFFICIENT_BALANCE = "insufficient_balance"  # also: the payer cannot pay the fee (any kind)
    # RegisterParticipant / StartInference.
    UNKNOWN_MODEL = "unknown_model"
    NOT_A_PARTICIPANT = "not_a_participant"
    # StartInference.
    BAD_CLIENT_REQUEST = "bad_client_request"  # the embedded client envelope fails to open
    REQUEST_WRONG_CHAIN = "request_wrong_chain"  # the client signed the request for another network
    STALE_REQUEST = "stale_request"  # request timestamp outside request_window_ms of block time
    DUPLICATE_INFERENCE = "duplicate_inference"  # this inference id was already started
    UNKNOWN_CLIENT = "unknown_client"
    EXECUTOR_NOT_ELIGIBLE = "executor_not_eligible"  # not drawable: no weight serving the model (also Finish)
    EXECUTOR_NOT_DRAWN = "executor_not_drawn"  # eligible, but not the weighted draw at this attempt
    ATTEMPT_OUT_OF_RANGE = "attempt_out_of_range"  # attempt >= the genesis max_executor_attempts
    SELF_EXECUTION = "self_execution"  # the TA named itself as executor
    # FinishInference.
    WRONG_EXECUTOR = "wrong_executor"
    INFERENCE_CLOSED = "inference_closed"  # already settled, expired or pruned
    TOKENS_EXCEED_REQUEST = "tokens_exceed_request"  # completion_tokens > the request's max_tokens
    DUPLICATE_FINISH = "duplicate_finish"  # this executor already has a Finish held for it
    HOLDING_AREA_FULL = "holding_area_full"
    # CommitValidationSeed / RevealValidationSeed.
    NOT_A_VALIDATOR = "not_a_validator"  # no weight, or no seed committed for the epoch
    WRONG_EPOCH = "wrong_epoch"  # outside the epoch's commit or reveal window
    ALREADY_COMMITTED = "already_committed"
    NO_COMMITMENT = "no_commitment"
    ALREADY_REVEALED = "already_revealed"
    SEED_MISMATCH = "seed_mismatch"  # the seed does not open the commitment
    # Validation / DisputeVote.
    UNKNOWN_INFERENCE = "unknown_inference"  # never started, or pruned
    NOT_VALIDATABLE = "not_validatable"  # running or expired: there is no work to check
    VALIDATION_CLOSED = "validation_closed"  # past the epoch's validation window
    CONFLICT_OF_INTEREST = "conflict_of_interest"  # the validator executed or routed it
    ALREADY_CLAIMED = "already_claimed"  # the validator revealed its seed for the epoch
    DUPLICATE_VALIDATION = "duplicate_validation"
    NOT_A_DUTY = "not_a_duty"  # a failing check whose seed gives its signer no duty on the inference
    INCONSISTENT_VERDICT = "inconsistent_verdict"  # valid with failure flags, or failed without
    NO_DISPUTE = "no_dispute"
    VOTING_CLOSED = "voting_closed"
    NOT_ON_COMMITTEE = "not_on_committee"
    DUPLICATE_VOTE = "duplicate_vote"
    # SubmitEvidence.
    NOT_CONFLICTING = "not_conflicting"  # both votes name the same block (or nil): no equivocation
    BAD_EVIDENCE_SIGNATURE = "bad_evidence_signature"  # a vote is not signed by the named offender
    EVIDENCE_TOO_OLD = "evidence_too_old"  # older than evidence_max_age_blocks, or a future height
    ALREADY_PUNISHED = "already_punished"  # the offender's punishment already covers that height
    # Proof of compute.
    NOT_IN_PHASE = "not_in_phase"  # the round is not in the phase this kind belongs to
    BAD_JOIN_STAMP = "bad_join_stamp"  # a newcomer's hashcash stamp does not pass
    ROUND_FULL = "round_full"  # the round's newcomer places are taken
    NOTHING_TO_CONFIRM = "nothing_to_confirm"  # a confirmation without a regular commitment to confirm
    BAD_OPENING = "bad_opening"  # wrong number of leaves, or a proof that does not verify


class TxRejected(Exception):
    """A transaction breaks a rule. Raised before any state is touched; becomes a receipt."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Transfer(Message):
    """Move ``amount`` coin units from the signer's balance to account ``to`` (created if new)."""

    KIND = "tx_transfer"
    chain_id: str = bounded(max_len=64)
    to: str = bounded(max_len=MAX_PEER_ID)
    amount: int = bounded(min_value=1)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class RegisterParticipant(Message):
    """The signer (an existing account) becomes, or updates itself as, a participant.

    Its public key comes from the envelope, its weight from genesis (0 for
    newcomers until a proof-of-compute round assigns one).
    """

    KIND = "tx_register_participant"
    chain_id: str = bounded(max_len=64)
    addrs: list[str] = bounded(max_len=8)
    models: list[str] = bounded(max_len=16)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class StartInference(Message):
    """Signed by the TA: escrow the client's coins for ``request``, executed by ``executor``.

    ``request`` is the client's :class:`InferenceRequest` envelope, byte for
    byte: the ledger checks the client's signature itself and takes the
    inference id from it (``wire.messages.inference_id``: chain, client key
    and nonce, all signed by the client). ``executor`` must be the
    weighted draw at ``attempt`` (``rules.choose_executor``; 0 first, one more
    for each drawn executor that failed before its first token), which the
    ledger recomputes and keeps on the inference's record.
    """

    KIND = "tx_start_inference"
    chain_id: str = bounded(max_len=64)
    request: bytes = bounded(max_len=MAX_CLIENT_REQUEST_BYTES)
    executor: str = bounded(max_len=MAX_PEER_ID)
    attempt: int = bounded(min_value=0, max_value=MAX_EXECUTOR_ATTEMPTS - 1)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class FinishInference(Message):
    """Signed by the executor: the work is done; these are the counts it claims and stands behind."""

    KIND = "tx_finish_inference"
    chain_id: str = bounded(max_len=64)
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    prompt_tokens: int = bounded(min_value=0, max_value=MAX_TOKENS_CLAIM)
    completion_tokens: int = bounded(min_value=0, max_value=MAX_TOKENS_CLAIM)
    response_hash: bytes = bounded(max_len=HASH_BYTES)
    artifact_commitment: bytes = bounded(max_len=HASH_BYTES)
    sequence: int = bounded(min_value=0)


class FailureFlag(IntFlag):
    """Why a check failed: one bit per rule of the verification metric, plus withheld artifacts."""

    LENGTH = 1  # the completion does not end the way an honest engine ends one
    RESPONSE = 2  # the artifact's tokens are not the committed response
    COVERAGE = 4  # the recomputation does not cover the claimed tokens
    EVIDENCE = 8  # malformed logprobs or top-k ids
    DISTANCE = 16  # claimed logprobs too far from the recomputed ones
    TOP_K = 32  # claimed top-k ids are not the recomputed top-k
    SAMPLING = 64  # tokens are not the seeded sampler's choice (the pre-fill attack)
    WITHHELD = 128  # the executor or TA did not serve the artifacts when asked
    OTHER = 256


ALL_FAILURE_FLAGS = sum(FailureFlag)
_REASON_FLAGS = {"length": FailureFlag.LENGTH, "response": FailureFlag.RESPONSE,
                 "recomputation": FailureFlag.COVERAGE, "evidence": FailureFlag.EVIDENCE,
                 "distance": FailureFlag.DISTANCE, "top-k": FailureFlag.TOP_K,
                 "sampling": FailureFlag.SAMPLING}


@dataclass(frozen=True)
class VerdictStats(Message):
    """A verdict on one inference and the statistics the epoch test aggregates, as integers.

    ``valid`` iff ``failure_flags == 0``; ``suspicious`` qualifies a valid verdict whose mean
    distance is above the honest bulk (the metric's ``Evidence.SUSPICIOUS``). Distances are in
    nano-nats (1e-9 nats), capped at ``MAX_DISTANCE_NANO``.
    """

    KIND = "verdict_stats"
    valid: bool
    suspicious: bool
    failure_flags: int = bounded(min_value=0, max_value=ALL_FAILURE_FLAGS)
    n_tokens: int = bounded(min_value=0, max_value=MAX_TOKENS_CLAIM)
    mean_distance_nano: int = bounded(min_value=0, max_value=MAX_DISTANCE_NANO)
    max_distance_nano: int = bounded(min_value=0, max_value=MAX_DISTANCE_NANO)
    top_k_misses: int = bounded(min_value=0, max_value=MAX_TOKENS_CLAIM)
    sampling_mismatches: int = bounded(min_value=0, max_value=MAX_TOKENS_CLAIM)


@dataclass(frozen=True)
class CommitValidationSeed(Message):
    """Signed by a validator during epoch ``epoch - 1``: its commitment
    (``rules.seed_commitment(epoch, validator, seed)``) to its secret seed for ``epoch``."""

    KIND = "tx_commit_validation_seed"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=1, max_value=MAX_EPOCH)
    commitment: bytes = bounded(max_len=HASH_BYTES)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class RevealValidationSeed(Message):
    """Signed by a validator after ``epoch`` ended, before it settles: the seed, which claims its
    epoch reward; the ledger recomputes its duties and counts those it skipped."""

    KIND = "tx_reveal_validation_seed"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=0, max_value=MAX_EPOCH)
    seed: bytes = bounded(max_len=HASH_BYTES)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class Validation(Message):
    """Signed by a validator: its verdict on a settled inference. A failed one opens a dispute
    and must carry the signer's epoch seed (empty for a pass), proving the check was its duty."""

    KIND = "tx_validation"
    chain_id: str = bounded(max_len=64)
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    verdict: VerdictStats
    seed: bytes = bounded(max_len=HASH_BYTES)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class DisputeVote(Message):
    """Signed by a member of a dispute's committee: its own verdict on the disputed inference."""

    KIND = "tx_dispute_vote"
    chain_id: str = bounded(max_len=64)
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    verdict: VerdictStats
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class SubmitEvidence(Message):
    """Signed by anyone: two votes ``offender`` signed for one (height, round, type) naming two
    different blocks -- equivocation, which costs it its weight and epoch reward.

    The two votes share everything but their block hash (empty: nil), time and signature, so
    a pair that differs anywhere else cannot even be written down.
    """

    KIND = "tx_submit_evidence"
    chain_id: str = bounded(max_len=64)
    offender: str = bounded(max_len=MAX_PEER_ID)
    vote_type: int = bounded(min_value=1, max_value=2)  # consensus_types.VoteType
    height: int = bounded(min_value=1)
    round: int = bounded(min_value=0)
    first_block_hash: bytes = bounded(max_len=HASH_BYTES)
    first_time_ms: int = bounded(min_value=0)  # each vote signs its own time
    first_signature: bytes = bounded(max_len=MAX_SIGNATURE_BYTES)
    second_block_hash: bytes = bounded(max_len=HASH_BYTES)
    second_time_ms: int = bounded(min_value=0)
    second_signature: bytes = bounded(max_len=MAX_SIGNATURE_BYTES)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class PocCommit(Message):
    """Signed by a prover inside a round's compute window: ``count`` nonces computed on ``model``,
    committed by their Merkle ``root``, and the hash of its round secret (``poc.secret_hash``).

    A key with no account joins with its first commitment: it then carries its ``addrs`` and a
    ``join_stamp`` (``poc.join_stamp_ok``); a participant's ``addrs`` may be empty."""

    KIND = "tx_poc_commit"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=0, max_value=MAX_EPOCH)
    round: int = bounded(min_value=0, max_value=1)  # poc.RoundKind
    model: str = bounded(max_len=128)
    root: bytes = bounded(max_len=HASH_BYTES)
    count: int = bounded(min_value=1)
    secret_hash: bytes = bounded(max_len=HASH_BYTES)
    addrs: list[str] = bounded(max_len=8, items=each(max_len=256))
    join_stamp: int = bounded(min_value=0, max_value=2**63 - 1)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class PocSecret(Message):
    """Signed by a committer in the round's secret phase: the secret behind its commitment."""

    KIND = "tx_poc_secret"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=0, max_value=MAX_EPOCH)
    round: int = bounded(min_value=0, max_value=1)
    model: str = bounded(max_len=128)
    secret: bytes = bounded(max_len=HASH_BYTES)
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class PocReveal(Message):
    """Signed by a committer in the reveal phase: its sampled leaves, in sample order, each with
    its Merkle inclusion proof (``wire.merkle``)."""

    KIND = "tx_poc_reveal"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=0, max_value=MAX_EPOCH)
    round: int = bounded(min_value=0, max_value=1)
    model: str = bounded(max_len=128)
    leaves: list[bytes] = bounded(max_len=256, items=each(max_len=256))  # poc.MAX_POC_LEAF_BYTES
    proofs: list[list[bytes]] = bounded(max_len=256, items=each(max_len=64, items=each(max_len=HASH_BYTES)))
    sequence: int = bounded(min_value=0)


@dataclass(frozen=True)
class PocVerdict(Message):
    """Signed by a validator of the epoch in the verdict phase: whether ``prover``'s opened leaves
    are what its own engine computes for them."""

    KIND = "tx_poc_verdict"
    chain_id: str = bounded(max_len=64)
    epoch: int = bounded(min_value=0, max_value=MAX_EPOCH)
    round: int = bounded(min_value=0, max_value=1)
    prover: str = bounded(max_len=MAX_PEER_ID)
    model: str = bounded(max_len=128)
    ok: bool
    sequence: int = bounded(min_value=0)


def to_nano(nats: float) -> int:
    """A distance in nats as integer nano-nats: rounded, capped; inf and NaN become the cap."""
    if not math.isfinite(nats) or nats * 1e9 >= MAX_DISTANCE_NANO:
        return MAX_DISTANCE_NANO
    return max(0, round(nats * 1e9))


def failure_flags(reasons: Any) -> int:
    """The flags of the verification metric's failure reasons (each starts with "<rule>:")."""
    flags = 0
    for reason in reasons:
        flags |= _REASON_FLAGS.get(str(reason).split(":", 1)[0].strip(), FailureFlag.OTHER)
    return int(flags)


def verdict_stats(verdict: Any) -> VerdictStats:
    """Encode the verification metric's ``Verdict`` (``gonka_p2p.inference.verification``) for the
    ledger. Duck-typed, so the ledger does not import the metric (nor torch)."""
    flags = failure_flags(verdict.reasons)
    if not verdict.valid and not flags:
        flags = int(FailureFlag.OTHER)
    suspicious = bool(verdict.valid) and getattr(verdict.evidence, "value", verdict.evidence) == "suspicious"
    return VerdictStats(
        valid=bool(verdict.valid), suspicious=suspicious, failure_flags=0 if verdict.valid else flags,
        n_tokens=min(int(verdict.n_tokens), MAX_TOKENS_CLAIM),
        mean_distance_nano=to_nano(verdict.mean_distance), max_distance_nano=to_nano(verdict.max_distance),
        top_k_misses=min(int(verdict.top_k_misses), MAX_TOKENS_CLAIM),
        sampling_mismatches=min(int(verdict.sampling_mismatches), MAX_TOKENS_CLAIM))


def withheld_verdict() -> VerdictStats:
    """The verdict on an inference whose artifacts were not served when asked: a failure."""
    return VerdictStats(valid=False, suspicious=False, failure_flags=int(FailureFlag.WITHHELD),
                        n_tokens=0, mean_distance_nano=MAX_DISTANCE_NANO,
                        max_distance_nano=MAX_DISTANCE_NANO, top_k_misses=0, sampling_mismatches=0)


def derive_validation_seed(secret: bytes, chain_id: str, epoch: int) -> bytes:
    """A validator's secret seed for an epoch, derived from its private key: nothing to store,
    the same after a restart, unpredictable to anyone without the key."""
    return hashlib.sha256(b"gonka-p2p/validation-seed-derivation/v1\x00" + secret
                          + chain_id.encode() + b"\x00" + epoch.to_bytes(8, "big")).digest()


class Payer(Enum):
    """Who pays a transaction's fee (genesis ``tx_fee``, burned when the transaction applies).

    Every kind has a price or a quota. The kinds anyone may send at will pay; the
    protocol-critical ones (``DUTY``) are free, so that a participant never needs coins to
    do its work, and are bounded instead: by its duties on the ledger (one Finish per
    inference it executed, one seed commit and reveal per epoch, one Validation per duty,
    one DisputeVote per committee seat, one accepted SubmitEvidence per offence) and in the
    mempool by a per-account quota and a reserved share of its capacity. A rejected
    transaction pays nothing: it is not applied, so its sequence is not spent either.
    """

    SIGNER = "signer"
    CLIENT = "client"  # StartInference: the client whose signed request it carries, with its escrow
    DUTY = "duty"


@dataclass(frozen=True)
class TxKind:
    """One kind of transaction: its wire schema, who pays for it, and what the mempool may
    assume of it. Its rule is ``tx_rules``' (which checks that every kind here has exactly one)."""

    message: type[Message]
    payer: Payer
    account_only: bool = False  # valid or not by its signer's account record alone (see mempool)


TX_KINDS: tuple[TxKind, ...] = (  # every transaction kind, once
    TxKind(Transfer, Payer.SIGNER, account_only=True),
    TxKind(RegisterParticipant, Payer.SIGNER),
    TxKind(StartInference, Payer.CLIENT),
    TxKind(FinishInference, Payer.DUTY),
    TxKind(CommitValidationSeed, Payer.DUTY),
    TxKind(RevealValidationSeed, Payer.DUTY),
    TxKind(Validation, Payer.DUTY),
    TxKind(DisputeVote, Payer.DUTY),
    TxKind(SubmitEvidence, Payer.DUTY),
    TxKind(PocCommit, Payer.DUTY),
    TxKind(PocSecret, Payer.DUTY),
    TxKind(PocReveal, Payer.DUTY),
    TxKind(PocVerdict, Payer.DUTY),
)
ACCOUNT_ONLY_KINDS = frozenset(kind.message.KIND for kind in TX_KINDS if kind.account_only)
DUTY_KINDS = frozenset(kind.message.KIND for kind in TX_KINDS if kind.payer is Payer.DUTY)
_SIGNER_PAYS = frozenset(kind.message.KIND for kind in TX_KINDS if kind.payer is Payer.SIGNER)


def signer_fee(kind: str, tx_fee: int) -> int:
    """What the signer of a ``kind`` transaction pays when it applies: ``tx_fee`` or nothing."""
    return tx_fee if kind in _SIGNER_PAYS else 0
Tx = (Transfer | RegisterParticipant | StartInference | FinishInference | CommitValidationSeed
      | RevealValidationSeed | Validation | DisputeVote | SubmitEvidence | PocCommit | PocSecret | PocReveal
      | PocVerdict)  # the same kinds, for the type checker
assert set(get_args(Tx)) == {kind.message for kind in TX_KINDS}, "Tx and TX_KINDS disagree"
_TX_MESSAGES = tuple(kind.message for kind in TX_KINDS)


class _DecodedCache:
    """Recently opened transactions by hash, bounded in count and bytes; thread-safe.

    A replica opens every transaction several times -- the gossip topic
    validator (in the network thread), mempool admission and re-checks,
    block validation, ``apply_block`` -- and the signature check is most of
    the cost of each (~60 us of ~80). The same bytes always open to the same
    value, so the first successful opening is remembered; failures are not
    (they are rejected at the first hop anyway). The decoded value is
    immutable and only read.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._items: OrderedDict[bytes, Signed[Tx]] = OrderedDict()
        self._bytes = 0
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, tx_hash: bytes) -> Signed[Tx] | None:
        with self._lock:
            hit = self._items.get(tx_hash)
            if hit is not None:
                self._items.move_to_end(tx_hash)
            return hit

    def put(self, tx_hash: bytes, signed: Signed[Tx]) -> None:
        with self._lock:
            if tx_hash in self._items:
                return
            self._items[tx_hash] = signed
            self._bytes += len(signed.raw)
            while len(self._items) > self._max_items or self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.raw)


_DECODED = _DecodedCache(max_items=1 << 16, max_bytes=64 * 1024 * 1024)


def decode_tx(raw: bytes, max_tx_bytes: int) -> Signed[Tx]:
    """Open a transaction envelope: size, shape, kind, version, signature, schema. Raises WireError."""
    if len(raw) > max_tx_bytes:
        raise Oversize(f"transaction of {len(raw)} bytes exceeds max_tx_bytes={max_tx_bytes}")
    tx_hash = digest(raw)
    signed = _DECODED.get(tx_hash)
    if signed is None:
        signed = open_envelope(raw, *_TX_MESSAGES)  # type: ignore[assignment]
        _DECODED.put(tx_hash, signed)  # type: ignore[arg-type]
    return signed  # type: ignore[return-value]


def reason_of(error: WireError) -> Reason:
    """The receipt code of a decoding failure (the wire codes are a subset of :class:`Reason`)."""
    return Reason(error.code)
