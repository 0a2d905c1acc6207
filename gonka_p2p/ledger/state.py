"""The ledger state machine: committed blocks in, state and receipts out.

Theory of operation
-------------------
A :class:`LedgerState` is built from a :class:`~gonka_p2p.ledger.genesis.Genesis`
and then changes only through :func:`apply_block`; everything here is a
deterministic function of (genesis, blocks), with no I/O, clocks, threads or
randomness, so every replica that applies the same blocks holds the same
state and the same :meth:`LedgerState.app_hash`. Block time is the block's
``time_ms`` (chosen by the proposer, bounded by consensus, never allowed to
go backwards here): it is the ledger's only clock, used solely to judge the
client's signed request timestamp. The only "randomness" is derived from
committed data: validators' committed seeds and block hashes.

``apply_block`` first checks that the block extends this state (height + 1,
``prev_hash``) and raises :class:`BlockMismatch` otherwise -- the caller
fed the wrong block, nothing was applied. Then, in order:

1. each transaction, in block order, is decoded and verified and either
   applied whole or rejected whole (a rule raises :class:`TxRejected` before
   touching anything); each yields a :class:`Receipt`, and a transaction
   never makes ``apply_block`` raise;
2. end of block: inferences whose deadline is this height expire (full
   refund, a miss for the executor); Finishes held past their deadline are
   dropped; request ids older than the replay window are forgotten;
   disputes whose voting deadline is this height resolve; if this height
   settles an epoch, :func:`process_epoch_settlement` runs; if it ends an
   epoch, :func:`process_epoch_start` freezes the next epoch's validator
   set and validation floor;
3. the block is committed: the app hash is updated and the invariants are
   checked on every record the block changed.

Transitions, by transaction kind (signer = envelope signer = acting account;
every kind also needs the right ``chain_id``, a known signer account and its
exact next ``sequence``, and bumps that sequence when accepted)::

    Transfer(to, amount)           balance[signer] -= amount; balance[to] += amount
    RegisterParticipant(addrs,     participant[signer] = (pubkey, weight from genesis
                        models)        or 0, addrs, models)
    StartInference(request, ex)    signer a participant, client's envelope valid and
                                   fresh, id = sha256(request) never seen, ex != signer
                                   serves the model, escrow <= balance[client]:
                                   balance[client] -= escrow; inference[id] = STARTED;
                                   settles at once if ex's Finish is held
    FinishInference(id, counts)    STARTED and signer == executor: SETTLED, cost =
                                   min(tokens * price, escrow) to pending fees[executor],
                                   escrow - cost back to the client; p = p_validate(r, m)
                                   fixed on the record; no such inference yet: held
                                   (bounded) until its Start
    CommitValidationSeed(e, c)     during epoch e-1, signer has weight: commitment[e, signer] = c
    RevealValidationSeed(e, seed)  after epoch e ends, before it settles, H(e, signer, seed)
                                   == commitment: seed stored, duties recomputed and counted
    Validation(id, verdict)        id SETTLED in epoch e, window open, signer committed for e,
                                   not its executor nor TA, not yet revealed: check[id, signer];
                                   a failed verdict opens dispute[id] (committee drawn by
                                   weight from this block's hash)
    DisputeVote(id, verdict)       signer on dispute[id]'s committee, before its deadline:
                                   vote[id, signer]; the last vote resolves it

    inference status:  STARTED --Finish--> SETTLED (payout PENDING --settlement--> PAID | REFUNDED)
                       STARTED --deadline passes--> EXPIRED
                       (FINISHED: a Finish is held, its Start not yet committed)
    dispute:           OPEN --all voted, or deadline--> INVALID | VALID | UNDECIDED

Epochs and verification (formulas in :mod:`gonka_p2p.ledger.rules`)
--------------------------------------------------------------------
Epoch e holds heights e*L+1 .. (e+1)*L; an inference belongs to the epoch in
which it closed. Its validators commit seeds during e-1; checks of its
inferences are accepted until ``validation_deadline(e)``; seeds are revealed
after it ends; it settles at ``settlement_height(e)`` (after the last
possible dispute). :func:`process_epoch_settlement` then, deterministically:

- judges each executor: caught if a dispute found one of its inferences
  invalid, or if the epoch test (SPRT over one observation per checked
  inference) accuses it;
- pays each executor the fees of its epoch's inferences -- or, if it was
  caught, refunds every one of them to the client that paid it;
- splits the epoch reward: ``validator_share`` by validation work (tokens
  of the duties and votes a validator did; an accusation the committee
  overturned earns nothing), the rest by billable tokens executed (executors
  are drawn by weight, so this share tracks weight without counting it twice).
  A participant that was caught, skipped a duty or a vote, did not commit
  and reveal a seed, or passed work that a dispute proved invalid forfeits
  its share: the share is not minted;
- updates reputations (caught or too many misses: 0; a clean, checked
  epoch: +1/N) and weights (caught: 0, visible in the participants table);
- records an :class:`EpochSummary` (who was paid what, who forfeited, who was
  caught) and prunes the epoch before it.

Memory stays bounded: a request id is remembered (``seen``) only while its
timestamp can still be fresh, since a stale request is refused anyway;
closed inference records, their checks, votes and disputes, seed
commitments and epoch records are pruned when the epoch after theirs
settles; summaries are kept for ``SUMMARY_EPOCHS_KEPT`` epochs; held
Finishes are capped per executor and in total and dropped after the
deadline; running inferences are bounded by the clients' balances (every
model costs >= 1 coin per token).

Using it
--------
A ledger replica: ``state = LedgerState.from_genesis(load_genesis(path))``
(or ``LedgerState.from_bytes(snapshot)``); on consensus's ValidateBlock,
``check_block(state, decode_block(raw))``; on Commit,
``apply_block(state, decode_block(raw))``, then persist ``state.to_bytes()``
and compare ``state.app_hash()`` with the other replicas'. The mempool
admits with ``check_tx(state, raw_tx)``. A TA submits
``seal(StartInference(chain_id, request=<client envelope bytes>, executor,
sequence), ta_key)`` as soon as it has routed the request; the executor
submits ``seal(FinishInference(chain_id, inference_id, prompt_tokens,
completion_tokens, response_hash, artifact_commitment, sequence),
executor_key)`` when done -- in either order. Both read their next sequence
from ``state.account(peer_id).sequence`` (plus what they have in flight).

A validator (every participant with weight), each epoch e:

1. during epoch e-1: ``seed = derive_validation_seed(key.secret, chain_id, e)``,
   submit ``CommitValidationSeed(epoch=e, commitment=seed_commitment(e, me, seed))``;
2. during epoch e, for each inference that settles (and any it missed):
   ``state.is_validation_duty(iid, me, seed)``; if so fetch the artifacts,
   verify, submit ``Validation(inference_id, verdict_stats(verdict))`` before
   ``rules.validation_deadline(e)`` (``state.validation_duties(e, me, seed)``
   lists them all);
3. whenever ``state.dispute(iid)`` names it on an open committee: verify
   and submit ``DisputeVote(inference_id, verdict)`` before the deadline;
4. after epoch e ends (``rules.seed_reveal_open``): submit
   ``RevealValidationSeed(epoch=e, seed)`` -- the claim; checks after it are refused.

Queries: ``reputation``, ``validation_rate_ppm``, ``validation_view(iid)``
(duties and checks of an inference), ``dispute``, ``epoch_summary(e)``
(and :func:`format_epoch_summary` for people).

Invariants, checked as every block commits (an :class:`InvariantViolation`
means a bug: the replica must stop, never limp on):

- conservation: sum(balances) + sum(escrow of STARTED inferences) +
  sum(pending fees) == genesis supply + minted. Nothing is ever burnt: a
  forfeited reward is not minted, forfeited fees go back to the clients
  that paid them. Checked incrementally: the coins carried by the records
  a block changed must change by exactly what the block minted; since the
  genesis state satisfies the equation (checked in full: every record is
  new), every state does; a loaded snapshot is checked in full the same
  way, and :func:`check_invariants` re-checks any state in full (tests);
- no balance, escrow, cost or pending fee is ever negative; cost <= escrow;
  reputation within [0, 1]; a payout is pending only on a settled inference;
  a verdict is consistent (valid names no failure); settlement asserts that
  it moved exactly the epoch's fees and minted exactly the shares it paid.

App hash
--------
The state is a set of records (table, key, value). Its hash is an LtHash
(lattice-based homomorphic set hash: each record expands to 1024 lanes of
16 bits by SHAKE-256, and the set hash is their lane-wise sum mod 2^16),
so a block costs two SHAKE calls per record it changed, not a pass over the
whole state. ``app_hash`` is SHA-256 of a header (genesis hash, height, block
time, last block hash, minted) and that sum. Only tables the rules read are
hashed; indexes derived from them are rebuilt by :meth:`LedgerState.from_bytes`.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np

from gonka_p2p.identity import digest, peer_id_from_pubkey
from gonka_p2p.ledger.genesis import MAX_ADDR_LEN, Genesis, GenesisError, Params, genesis_from_obj
from gonka_p2p.ledger.rules import (
    PPM,
    SEED_BYTES,
    DisputeOutcome,
    Observation,
    dispute_deadline,
    dispute_outcome,
    draw_committee,
    duty_threshold,
    epoch_after,
    epoch_of,
    epoch_reward_pools,
    epoch_settled_at,
    escrow_for,
    forfeit_reasons,
    held_finish_deadline,
    inference_cost,
    inference_deadline,
    inference_observation,
    is_account_address,
    is_epoch_end,
    is_validation_duty,
    miss_rate_exceeded,
    next_block_time,
    pro_rata,
    prompt_token_bound,
    replay_memory_until,
    reputation_after_epoch,
    request_is_fresh,
    seed_commit_open,
    seed_commitment,
    seed_reveal_open,
    sequence_acceptable,
    sprt_catches,
    validation_deadline,
    validation_floor_ppm,
    validation_ppm,
    verdict_is_consistent,
)
from gonka_p2p.ledger.transactions import (
    MAX_PEER_ID,
    CommitValidationSeed,
    DisputeVote,
    FinishInference,
    Reason,
    RegisterParticipant,
    RevealValidationSeed,
    StartInference,
    Transfer,
    Tx,
    TxRejected,
    Validation,
    VerdictStats,
    decode_tx,
    reason_of,
)
from gonka_p2p.wire.envelope import Signed, open_envelope
from gonka_p2p.wire.messages import HASH_BYTES, InferenceRequest
from gonka_p2p.wire.schema import Malformed, Message, WireError, bounded

SNAPSHOT_FORMAT = 2
SUMMARY_EPOCHS_KEPT = 16  # epoch summaries kept for queries (the rest of an epoch goes sooner)
_LEAF_DOMAIN = b"gonka-p2p/state-leaf/v1\x00"
_APP_HASH_DOMAIN = b"gonka-p2p/app-hash/v1\x00"
MAX_BLOCK_TXS = 20_000
_LANES = 1024


class BlockMismatch(Exception):
    """The block does not extend this state (wrong height or previous hash). Nothing was applied."""


class InvariantViolation(AssertionError):
    """A ledger invariant broke: a bug in the state machine. The replica must stop."""


class SnapshotError(Exception):
    """Bytes given to :meth:`LedgerState.from_bytes` are not a consistent state snapshot."""


# --------------------------------------------------------------------------- records


class InferenceStatus(StrEnum):
    STARTED = "started"
    FINISHED = "finished"  # only reported by queries: a Finish is held, its Start not committed
    SETTLED = "settled"
    EXPIRED = "expired"


class Payout(StrEnum):
    """Where a settled inference's fee goes: decided when its epoch settles."""

    NONE = "none"  # no fee: running, or expired (refunded in full)
    PENDING = "pending"  # charged; waits in the executor's pending fees for the epoch's settlement
    PAID = "paid"  # paid to the executor
    REFUNDED = "refunded"  # returned to the client: the executor was caught this epoch


@dataclass(frozen=True, slots=True)
class Account:
    balance: int  # coin units, spendable
    sequence: int  # the sequence this account's next transaction must carry


@dataclass(frozen=True, slots=True)
class Participant:
    pubkey: bytes
    weight: int  # voting power and executor-draw weight (from genesis for now)
    addrs: tuple[str, ...]
    models: tuple[str, ...]  # sorted, unique, each priced in genesis
    completed: int  # inferences this participant settled as executor
    missed: int  # inferences that expired in its hands
    reputation_ppm: int = 0  # r in [0, PPM]: lowers how often its work is checked
    caught: int = 0  # epochs in which it was caught cheating (work proven invalid or SPRT)
    overturned: int = 0  # its failed verdicts that a dispute majority overturned


@dataclass(frozen=True, slots=True)
class Inference:
    client: str
    ta: str
    executor: str
    model: str
    price: int  # coin units per token, fixed at Start
    max_tokens: int
    prompt_bound: int  # tokens, see rules.prompt_token_bound
    escrow: int  # coin units locked at Start
    request_ms: int  # the client's signed timestamp
    start_height: int
    deadline: int  # last height at which a Finish is accepted
    status: InferenceStatus
    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_hash: bytes = b""
    artifact_commitment: bytes = b""
    cost: int = 0  # coin units charged to the client (paid to the executor at epoch end)
    closed_height: int = 0  # height at which it settled or expired
    validation_ppm: int = 0  # p: the probability it is checked, fixed when it settled
    payout: Payout = Payout.NONE

    @property
    def billable_tokens(self) -> int:
        """The tokens the client paid for (the claim, capped at the escrow): the work it counts as."""
        return self.cost // self.price if self.price else 0

    @property
    def locked(self) -> int:
        """Coins this record holds out of every balance: its escrow while it runs."""
        return self.escrow if self.status is InferenceStatus.STARTED else 0


@dataclass(frozen=True, slots=True)
class HeldFinish:
    """A FinishInference accepted before its StartInference; keyed by (inference id, executor)."""

    prompt_tokens: int
    completion_tokens: int
    response_hash: bytes
    artifact_commitment: bytes
    deadline: int  # dropped at the end of this height if its Start has not come


@lru_cache(maxsize=64)
def _weight_map(validators: tuple[tuple[str, int], ...]) -> Mapping[str, int]:
    return MappingProxyType(dict(validators))


@dataclass(frozen=True, slots=True)
class EpochInfo:
    """What an epoch froze when it began: its validator set and its validation floor."""

    traffic: int  # inferences settled in the previous epoch
    floor_ppm: int  # m = validation_floor_ppm(traffic)
    validators: tuple[tuple[str, int], ...]  # (peer, weight > 0), sorted: weights at its start
    inferences: int = 0  # inferences settled in it so far (the next epoch's traffic)

    @property
    def weights(self) -> Mapping[str, int]:
        return _weight_map(self.validators)


@dataclass(frozen=True, slots=True)
class SeedCommitment:
    """A validator's commitment to its secret seed for one epoch; keyed by (epoch, validator)."""

    commitment: bytes
    height: int  # where it was committed
    seed: bytes = b""  # empty until revealed
    revealed_height: int = 0
    duties: int = 0  # counted at reveal: the inferences the seed made it check
    done: int = 0  # of those, checked (by a Validation or a DisputeVote)

    @property
    def revealed(self) -> bool:
        return bool(self.seed)

    @property
    def skipped(self) -> int:
        return self.duties - self.done


@dataclass(frozen=True, slots=True)
class Check:
    """A validator's verdict on an inference (a Validation or a DisputeVote); keyed by (id, validator).

    Distances are in nano-nats (1e-9 natural-log units), capped at
    ``transactions.MAX_DISTANCE_NANO`` (which also stands for "could not compare").
    """

    height: int
    valid: bool
    suspicious: bool
    failure_flags: int  # transactions.FailureFlag bits; 0 iff valid
    n_tokens: int
    mean_distance_nano: int
    max_distance_nano: int
    top_k_misses: int
    sampling_mismatches: int

    @classmethod
    def of(cls, verdict: VerdictStats, height: int) -> Check:
        return cls(height, verdict.valid, verdict.suspicious, verdict.failure_flags, verdict.n_tokens,
                   verdict.mean_distance_nano, verdict.max_distance_nano, verdict.top_k_misses,
                   verdict.sampling_mismatches)


@dataclass(frozen=True, slots=True)
class Dispute:
    """A failed check under review by a committee; keyed by inference id."""

    epoch: int  # the inference's epoch
    executor: str
    accuser: str  # the validator whose failed verdict opened it
    opened_height: int
    deadline: int  # last height a vote is accepted; resolves at its end (or at the last vote)
    committee: tuple[str, ...]  # drawn by weight from the opening block's hash
    outcome: DisputeOutcome = DisputeOutcome.OPEN
    invalid_weight: int = 0  # epoch weight of the committee's "invalid" votes
    valid_weight: int = 0
    resolved_height: int = 0


@dataclass(frozen=True, slots=True)
class ParticipantOutcome:
    """One participant's line in an epoch's settlement. Coin amounts in coin units."""

    peer: str
    weight: int  # in the epoch's validator set (0: not in it)
    inferences: int  # settled as executor in the epoch
    expired: int  # expired in its hands
    tokens: int  # billable tokens of its settled inferences
    checked: int  # of its settled inferences, those at least one validator checked
    fees_paid: int  # fees paid to it
    fees_refunded: int  # fees of its inferences returned to the clients (it was caught)
    committed: bool  # committed a seed for the epoch
    revealed: bool
    duties: int  # the checks its revealed seed required
    done: int  # of those, done
    checks: int  # Validations it submitted for the epoch (duties or not)
    votes: int  # DisputeVotes it cast
    missed_votes: int  # committee seats it left empty
    overturned: int  # its failed verdicts overturned by a committee majority
    work: int  # validation work credited: tokens of its duties and votes (not overturned ones)
    executor_reward: int  # minted to it for executing
    validator_reward: int  # minted to it for validating
    forfeited: int  # the reward it would have had, not minted
    forfeit: tuple[str, ...]  # rules.Forfeit values: why
    caught: str  # "" | "dispute" | "sprt"
    reputation_before: int  # ppm
    reputation_after: int  # ppm
    weight_after: int


@dataclass(frozen=True, slots=True)
class EpochSummary:
    """The outcome of one epoch's settlement: who was paid what, who forfeited, who was caught."""

    epoch: int
    height: int  # where it settled
    floor_ppm: int  # the epoch's validation floor m
    inferences: int  # settled in the epoch
    expired: int
    checked: int  # settled inferences at least one validator checked
    disputes: int
    disputes_invalid: int
    reward: int  # the epoch's reward (both pools)
    minted: int  # of it, minted (paid)
    forfeited: int  # shares not minted because of forfeits (the rest of reward - minted is dust)
    fees_paid: int
    fees_refunded: int
    refunds: tuple[tuple[str, int], ...]  # (client, coins refunded), sorted
    participants: tuple[ParticipantOutcome, ...]  # sorted by peer

    def participant(self, peer: str) -> ParticipantOutcome | None:
        return next((row for row in self.participants if row.peer == peer), None)


@dataclass(frozen=True)
class ValidatorDuty:
    """One eligible validator of an inference, as :meth:`LedgerState.validation_view` shows it."""

    peer: str
    weight: int
    threshold: int  # duty iff its 64-bit draw H(seed || id) is below; threshold / 2^64 = q_v
    duty: bool | None  # None while its seed is secret
    check: Check | None
    vote: Check | None

    @property
    def q(self) -> float:
        return self.threshold / 2**64


@dataclass(frozen=True)
class ValidationView:
    inference_id: bytes
    epoch: int
    executor: str
    ta: str
    p_ppm: int
    validators: tuple[ValidatorDuty, ...]
    dispute: Dispute | None


# --------------------------------------------------------------------------- tables

K = TypeVar("K")
V = TypeVar("V")
_ABSENT: Any = object()


@dataclass(frozen=True)
class _Codec(Generic[V]):
    """How one table's values become msgpack objects and back, and the coins each one holds."""

    encode: Callable[[V], Any]
    decode: Callable[[Any], V]
    coins: Callable[[V], int]


_FROM_WIRE: dict[str, Callable[[Any], Any]] = {  # msgpack gives lists and str
    "addrs": tuple, "models": tuple, "status": InferenceStatus, "payout": Payout,
    "committee": tuple, "outcome": DisputeOutcome, "forfeit": tuple,
    "validators": lambda v: tuple((str(p), int(w)) for p, w in v),
    "refunds": lambda v: tuple((str(c), int(a)) for c, a in v),
    "participants": lambda v: tuple(_OUTCOME_CODEC.decode(row) for row in v),
}


def _record_codec(cls: type, coins: Callable[[Any], int]) -> _Codec[Any]:
    """A record is encoded as the list of its field values, in declaration order (tuples as
    msgpack arrays, the nested records of a summary as their own lists)."""
    names = [f.name for f in fields(cls)]
    if "participants" in names:
        def encode(row: Any) -> list[Any]:
            return [_encode_value(getattr(row, n)) for n in names]
    else:
        def encode(row: Any) -> list[Any]:
            return [getattr(row, n) for n in names]

    def decode(obj: Any) -> Any:
        return cls(*[_FROM_WIRE[n](v) if n in _FROM_WIRE else v
                     for n, v in zip(names, obj, strict=True)])

    return _Codec(encode, decode, coins)


def _encode_value(value: Any) -> Any:
    if isinstance(value, ParticipantOutcome):
        return _OUTCOME_CODEC.encode(value)
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


_ACCOUNT_CODEC = _record_codec(Account, lambda a: a.balance)
_PARTICIPANT_CODEC = _record_codec(Participant, lambda p: 0)
_INFERENCE_CODEC = _record_codec(Inference, lambda r: r.locked)
_HELD_CODEC = _record_codec(HeldFinish, lambda h: 0)
_SEEN_CODEC: _Codec[int] = _Codec(lambda v: v, int, lambda v: 0)
_FEE_CODEC: _Codec[int] = _Codec(lambda v: v, int, lambda v: v)
_OUTCOME_CODEC = _record_codec(ParticipantOutcome, lambda o: 0)
_EPOCH_CODEC = _record_codec(EpochInfo, lambda e: 0)
_COMMITMENT_CODEC = _record_codec(SeedCommitment, lambda c: 0)
_CHECK_CODEC = _record_codec(Check, lambda c: 0)
_DISPUTE_CODEC = _record_codec(Dispute, lambda d: 0)
_SUMMARY_CODEC = _record_codec(EpochSummary, lambda s: 0)


class Table(Generic[K, V]):
    """A map of immutable records that remembers, per block, what each changed key held before.

    Only :meth:`put` and :meth:`delete` change it, so the commit step sees
    every change: the app hash and the coin invariant are maintained from
    that log alone.
    """

    __slots__ = ("tag", "codec", "rows", "dirty")

    def __init__(self, tag: str, codec: _Codec[V]) -> None:
        self.tag = tag
        self.codec = codec
        self.rows: dict[K, V] = {}
        self.dirty: dict[K, V] = {}  # key -> value before this block (_ABSENT if new)

    def get(self, key: K) -> V | None:
        return self.rows.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def put(self, key: K, value: V) -> None:
        if key not in self.dirty:
            self.dirty[key] = self.rows.get(key, _ABSENT)
        self.rows[key] = value

    def delete(self, key: K) -> None:
        if key not in self.dirty:
            self.dirty[key] = self.rows.get(key, _ABSENT)
        del self.rows[key]


def _leaf(tag: str, key: Any, value: Any) -> np.ndarray:
    data = msgpack.packb([tag, key, value], use_bin_type=True)
    return np.frombuffer(hashlib.shake_256(_LEAF_DOMAIN + data).digest(2 * _LANES), dtype="<u2")


def _check_record(tag: str, key: Any, value: Any, coins: int) -> None:
    if coins < 0:
        raise InvariantViolation(f"{tag}[{key!r}] holds {coins} coins")
    if isinstance(value, Account) and (value.balance < 0 or value.sequence < 0):
        raise InvariantViolation(f"account {key} is negative: {value}")
    if isinstance(value, Inference):
        if not 0 <= value.cost <= value.escrow:
            raise InvariantViolation(f"inference {key.hex()} costs {value.cost} of {value.escrow} escrow")
        if (value.payout is Payout.NONE) != (value.status is not InferenceStatus.SETTLED):
            raise InvariantViolation(f"inference {key.hex()} is {value.status} with payout {value.payout}")
        if not 0 <= value.validation_ppm <= PPM:
            raise InvariantViolation(f"inference {key.hex()} has p = {value.validation_ppm} ppm")
    if isinstance(value, Participant) and not (0 <= value.reputation_ppm <= PPM and value.weight >= 0):
        raise InvariantViolation(f"participant {key} out of range: {value}")
    if isinstance(value, Check) and not verdict_is_consistent(value.valid, value.suspicious,
                                                              value.failure_flags):
        raise InvariantViolation(f"{tag}[{key!r}] is an inconsistent verdict: {value}")
    if isinstance(value, Dispute) and ({value.executor, value.accuser} & set(value.committee)):
        raise InvariantViolation(f"dispute {key.hex()} seats its executor or accuser: {value}")
    if isinstance(value, SeedCommitment) and not 0 <= value.done <= value.duties:
        raise InvariantViolation(f"seed commitment {key!r} did {value.done} of {value.duties} duties")


_peer_id = lru_cache(maxsize=1 << 16)(peer_id_from_pubkey)


# --------------------------------------------------------------------------- blocks, receipts


@dataclass(frozen=True)
class Block(Message):
    """A block as consensus orders it: the value it agrees on is ``encode()``, its hash that digest.

    ``time_ms`` is the proposer's clock (consensus bounds it; the ledger
    only refuses to let it go backwards); ``txs`` are raw signed transaction
    envelopes, applied in order, each judged on its own.
    """

    KIND = "ledger_block"
    height: int = bounded(min_value=1)
    prev_hash: bytes = bounded(max_len=HASH_BYTES)
    proposer: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    txs: list[bytes] = bounded(max_len=MAX_BLOCK_TXS)

    @cached_property
    def hash(self) -> bytes:
        """SHA-256 of the block's bytes: the same hash consensus votes on."""
        return digest(self.encode())


def decode_block(raw: bytes) -> Block:
    """Decode a block from consensus; raises WireError. Only the canonical encoding is a block,
    so that the hash consensus computed over ``raw`` is the hash the ledger chains on."""
    block = Block.decode(raw)
    if block.encode() != raw:
        raise Malformed("block is not canonically encoded")
    return block


@dataclass(frozen=True)
class Receipt:
    """The outcome of one transaction: ``reason`` is ``Reason.OK`` or why it was rejected."""

    tx_hash: bytes
    reason: Reason
    detail: str = ""
    kind: str = ""
    signer: str = ""
    sequence: int = -1

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK


@dataclass(frozen=True)
class BlockContext:
    """The block a transaction is judged in: its height and (monotonic) time."""

    height: int
    time_ms: int
    mempool: bool = False  # check_tx: judge against committed state, accept future sequences
    block_hash: bytes = b""  # the block being applied (seeds dispute committees); empty in check_tx


# --------------------------------------------------------------------------- the state


class LedgerState:
    """All ledger state, its queries, its hash and its serialization. Change it with apply_block."""

    def __init__(self, genesis: Genesis) -> None:
        """An empty state at height 0; use :meth:`from_genesis` or :meth:`from_bytes`."""
        self.genesis = genesis
        self.params: Params = genesis.params
        self.chain_id = genesis.chain_id
        self.genesis_hash = genesis.hash()
        self.height = 0
        self.time_ms = genesis.genesis_time_ms
        self.last_block_hash = self.genesis_hash
        self.minted = 0
        self.accounts: Table[str, Account] = Table("account", _ACCOUNT_CODEC)
        self.registry: Table[str, Participant] = Table("participant", _PARTICIPANT_CODEC)
        self.inferences: Table[bytes, Inference] = Table("inference", _INFERENCE_CODEC)
        self.seen: Table[bytes, int] = Table("seen_request", _SEEN_CODEC)  # id -> keep until (ms)
        self.held: Table[tuple[bytes, str], HeldFinish] = Table("held_finish", _HELD_CODEC)
        self.fees: Table[str, int] = Table("pending_fee", _FEE_CODEC)  # executor -> coin units
        self.epochs: Table[int, EpochInfo] = Table("epoch", _EPOCH_CODEC)
        self.commitments: Table[tuple[int, str], SeedCommitment] = Table("seed_commitment",
                                                                        _COMMITMENT_CODEC)
        self.checks: Table[tuple[bytes, str], Check] = Table("validation", _CHECK_CODEC)
        self.votes: Table[tuple[bytes, str], Check] = Table("dispute_vote", _CHECK_CODEC)
        self.disputes: Table[bytes, Dispute] = Table("dispute", _DISPUTE_CODEC)
        self.summaries: Table[int, EpochSummary] = Table("epoch_summary", _SUMMARY_CODEC)
        self._tables: tuple[Table[Any, Any], ...] = (
            self.accounts, self.registry, self.inferences, self.seen, self.held, self.fees,
            self.epochs, self.commitments, self.checks, self.votes, self.disputes, self.summaries)
        self._lthash = np.zeros(_LANES, dtype="<u2")
        self._block_minted = 0  # coins minted since the last commit
        # Indexes derived from the tables (not hashed, rebuilt on load).
        self._expiring: dict[int, list[bytes]] = {}  # height -> inference ids to expire
        self._held_expiring: dict[int, list[tuple[bytes, str]]] = {}
        self._held_by_id: dict[bytes, set[str]] = {}
        self._held_per_executor: dict[str, int] = {}
        self._forget_heap: list[tuple[int, bytes]] = []  # (remember until ms, id)
        self._closed: dict[int, set[bytes]] = {}  # epoch -> ids of inferences closed in it
        self._checkers: dict[bytes, set[str]] = {}  # inference id -> validators that checked it
        self._committed: dict[int, set[str]] = {}  # epoch -> validators with a seed commitment
        self._disputes_due: dict[int, list[bytes]] = {}  # deadline height -> open disputes

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> LedgerState:
        state = cls(genesis)
        for p in genesis.participants:
            state.registry.put(p.peer_id, Participant(
                p.pubkey, p.weight, tuple(p.addrs), tuple(sorted(set(p.models))), 0, 0))
            state.accounts.put(p.peer_id, Account(0, 0))  # so that it can sign transactions
        for address, amount in genesis.allocations.items():
            state.accounts.put(address, Account(amount, 0))
        state.epochs.put(0, EpochInfo(traffic=0, floor_ppm=validation_floor_ppm(0, state.params),
                                      validators=tuple(state.weights().items())))
        for p in genesis.participants:  # epoch 0 has no epoch before it to commit seeds in
            if p.seed_commitment and p.weight > 0:
                state.add_commitment(0, p.peer_id, SeedCommitment(p.seed_commitment, 0))
        state._commit(coins_created=genesis.supply)  # every record is new: a full check
        return state

    # ------------------------------------------------------------------ queries

    @property
    def epoch(self) -> int:
        """The epoch the next block belongs to."""
        return epoch_after(self.height, self.params)

    def balance(self, address: str) -> int:
        account = self.accounts.get(address)
        return account.balance if account else 0

    def account(self, address: str) -> Account | None:
        return self.accounts.get(address)

    def participant(self, address: str) -> Participant | None:
        return self.registry.get(address)

    def participants(self) -> dict[str, Participant]:
        """Every participant by peer id, sorted: genesis ones and those registered since."""
        return dict(sorted(self.registry.rows.items()))

    def weights(self) -> dict[str, int]:
        """Peer id -> weight (> 0 only): the validator set's voting power and the executor draw."""
        return {p: r.weight for p, r in sorted(self.registry.rows.items()) if r.weight > 0}

    def pending_fees(self, executor: str) -> int:
        """Fees earned in the current epoch, paid at its end."""
        return self.fees.get(executor) or 0

    def inference(self, inference_id: bytes) -> Inference | None:
        """The inference's record; status FINISHED (with only the executor's claims) while a
        Finish is held for it; None if never seen, or pruned (one full epoch after it closed)."""
        record = self.inferences.get(inference_id)
        if record is not None:
            return record
        claimants = self._held_by_id.get(inference_id)
        if not claimants:
            return None
        executor = min(claimants)
        held = self.held.rows[(inference_id, executor)]
        return Inference(client="", ta="", executor=executor, model="", price=0, max_tokens=0,
                         prompt_bound=0, escrow=0, request_ms=0, start_height=0,
                         deadline=held.deadline, status=InferenceStatus.FINISHED,
                         prompt_tokens=held.prompt_tokens, completion_tokens=held.completion_tokens,
                         response_hash=held.response_hash,
                         artifact_commitment=held.artifact_commitment)

    def reputation(self, peer: str) -> float:
        """r in [0, 1] (for people; the state holds ``Participant.reputation_ppm``)."""
        participant = self.registry.get(peer)
        return participant.reputation_ppm / PPM if participant else 0.0

    def validation_rate_ppm(self, executor: str) -> int:
        """p for an inference of ``executor`` settling now: m + (1 - m)(1 - r), capped; ppm."""
        participant = self.registry.get(executor)
        floor = self.epochs.rows[self.epoch].floor_ppm
        return validation_ppm(participant.reputation_ppm if participant else 0, floor, self.params)

    def epoch_info(self, epoch: int) -> EpochInfo | None:
        """The validator set and floor frozen at the epoch's start (kept until the next settles)."""
        return self.epochs.get(epoch)

    def commitment(self, epoch: int, validator: str) -> SeedCommitment | None:
        return self.commitments.get((epoch, validator))

    def epoch_validators(self, epoch: int) -> dict[str, int]:
        """The epoch's eligible validators: in its validator set and committed to a seed for it.

        Fixed once the epoch has begun (commitments close when the epoch before it ends).
        """
        info = self.epochs.rows[epoch]
        committed = self._committed.get(epoch, ())
        return {peer: w for peer, w in info.validators if peer in committed}

    def inference_epoch(self, record: Inference) -> int:
        """The epoch a closed inference belongs to: the one in which it closed."""
        return epoch_of(record.closed_height, self.params)

    def validation_candidates(self, inference_id: bytes) -> dict[str, int]:
        """Who may check a settled inference, by weight: its epoch's eligible validators but
        its executor and its TA. Their total weight is the W of its duty thresholds."""
        record = self.inferences.rows[inference_id]
        candidates = self.epoch_validators(self.inference_epoch(record))
        candidates.pop(record.executor, None)
        candidates.pop(record.ta, None)
        return candidates

    def is_validation_duty(self, inference_id: bytes, validator: str, seed: bytes) -> bool:
        """Must ``validator``, holding its secret ``seed`` for the inference's epoch, check it?
        (What a validator actor asks for every inference that settles.)"""
        record = self.inferences.get(inference_id)
        if record is None or record.status is not InferenceStatus.SETTLED:
            return False
        candidates = self.validation_candidates(inference_id)
        if validator not in candidates:
            return False
        return is_validation_duty(seed, inference_id, record.validation_ppm, candidates[validator],
                                  sum(candidates.values()))

    def epoch_inferences(self, epoch: int) -> list[bytes]:
        """Ids of the inferences closed in ``epoch`` (settled or expired), in closing order."""
        ids = self._closed.get(epoch, ())
        return sorted(ids, key=lambda iid: (self.inferences.rows[iid].closed_height, iid))

    def validation_duties(self, epoch: int, validator: str, seed: bytes) -> list[bytes]:
        """Every inference of ``epoch`` (so far) that ``validator`` must check with ``seed``,
        in closing order. One hash per inference: what a reveal recomputes."""
        eligible = self.epoch_validators(epoch)
        weight = eligible.get(validator)
        if weight is None:
            return []
        total = sum(eligible.values())
        duties = []
        for iid in self.epoch_inferences(epoch):
            record = self.inferences.rows[iid]
            if record.status is not InferenceStatus.SETTLED or validator in (record.executor, record.ta):
                continue
            others = total - eligible.get(record.executor, 0) - eligible.get(record.ta, 0)
            if is_validation_duty(seed, iid, record.validation_ppm, weight, others):
                duties.append(iid)
        return duties

    def validations(self, inference_id: bytes) -> dict[str, Check]:
        """The Validations submitted for an inference, by validator."""
        return {v: self.checks.rows[(inference_id, v)]
                for v in sorted(self._checkers.get(inference_id, ()))}

    def dispute(self, inference_id: bytes) -> Dispute | None:
        return self.disputes.get(inference_id)

    def open_disputes_for(self, validator: str) -> list[bytes]:
        """Inference ids of the open disputes whose committee seats ``validator`` and that it
        has not voted on yet: a snapshot list, so a caller may await between items while
        blocks open or prune disputes (never iterate the live table across an await)."""
        return [iid for iid, dispute in self.disputes.rows.items()
                if dispute.outcome is DisputeOutcome.OPEN and validator in dispute.committee
                and (iid, validator) not in self.votes]

    def dispute_votes(self, inference_id: bytes) -> dict[str, Check]:
        dispute = self.disputes.get(inference_id)
        if dispute is None:
            return {}
        return {m: self.votes.rows[(inference_id, m)] for m in dispute.committee
                if (inference_id, m) in self.votes}

    def validation_view(self, inference_id: bytes) -> ValidationView | None:
        """Everything the ledger knows about checking one settled inference: p, each eligible
        validator's weight, duty (once its seed is revealed) and check, and the dispute."""
        record = self.inferences.get(inference_id)
        if record is None or record.status is not InferenceStatus.SETTLED:
            return None
        epoch = self.inference_epoch(record)
        candidates = self.validation_candidates(inference_id)
        total = sum(candidates.values())
        rows = []
        for peer, weight in sorted(candidates.items()):
            commitment = self.commitments.rows[(epoch, peer)]
            duty = None
            if commitment.revealed:
                duty = is_validation_duty(commitment.seed, inference_id, record.validation_ppm,
                                          weight, total)
            rows.append(ValidatorDuty(peer, weight, duty_threshold(record.validation_ppm, weight, total),
                                      duty, self.checks.get((inference_id, peer)),
                                      self.votes.get((inference_id, peer))))
        return ValidationView(inference_id, epoch, record.executor, record.ta, record.validation_ppm,
                              tuple(rows), self.disputes.get(inference_id))

    def epoch_summary(self, epoch: int) -> EpochSummary | None:
        """The settlement of ``epoch`` (kept for ``SUMMARY_EPOCHS_KEPT`` epochs)."""
        return self.summaries.get(epoch)

    def total_coins(self) -> int:
        """Every coin the state holds: balances + running escrow + pending fees (full pass)."""
        return (sum(a.balance for a in self.accounts.rows.values())
                + sum(r.locked for r in self.inferences.rows.values())
                + sum(self.fees.rows.values()))

    # ------------------------------------------------------------------ hash

    def app_hash(self) -> bytes:
        """The committed state's identity; equal on every replica that applied the same blocks."""
        header = msgpack.packb([SNAPSHOT_FORMAT, self.genesis_hash, self.height, self.time_ms,
                                self.last_block_hash, self.minted], use_bin_type=True)
        return digest(_APP_HASH_DOMAIN + header + self._lthash.tobytes())

    def _commit(self, coins_created: int) -> None:
        """Fold every change since the last commit into the hash and check the invariants on it."""
        delta = 0
        for table in self._tables:
            codec = table.codec
            for key, old in table.dirty.items():
                new = table.rows.get(key, _ABSENT)
                if new is old or new == old:
                    continue
                if old is not _ABSENT:
                    self._lthash -= _leaf(table.tag, key, codec.encode(old))
                    delta -= codec.coins(old)
                if new is not _ABSENT:
                    coins = codec.coins(new)
                    _check_record(table.tag, key, new, coins)
                    self._lthash += _leaf(table.tag, key, codec.encode(new))
                    delta += coins
            table.dirty.clear()
        if delta != coins_created:
            raise InvariantViolation(
                f"coins changed by {delta} at height {self.height}, but {coins_created} were created")

    # ------------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        """Canonical snapshot: equal states give equal bytes (tables sorted by key)."""
        if any(t.dirty for t in self._tables):
            raise RuntimeError("snapshot of a state in the middle of a block")
        tables = [[t.tag, [[k, t.codec.encode(v)] for k, v in sorted(t.rows.items())]]
                  for t in self._tables]
        return msgpack.packb([SNAPSHOT_FORMAT, self.genesis.to_obj(), self.height, self.time_ms,
                              self.last_block_hash, self.minted, tables], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerState:
        """Rebuild a state from :meth:`to_bytes`; recomputes the hash and checks the invariants."""
        try:
            fmt, genesis_obj, height, time_ms, last_hash, minted, tables = msgpack.unpackb(
                data, raw=False, strict_map_key=False, use_list=True)
            if fmt != SNAPSHOT_FORMAT:
                raise SnapshotError(f"snapshot format {fmt!r}, expected {SNAPSHOT_FORMAT}")
            state = cls(genesis_from_obj(genesis_obj))
            state.height, state.time_ms, state.minted = int(height), int(time_ms), int(minted)
            state.last_block_hash = bytes(last_hash)
            if [tag for tag, _ in tables] != [t.tag for t in state._tables]:
                raise SnapshotError("snapshot tables do not match this version")
            for table, (_tag, rows) in zip(state._tables, tables, strict=True):
                for key, value in rows:
                    table.put(tuple(key) if isinstance(key, list) else key, table.codec.decode(value))
            state._commit(coins_created=state.genesis.supply + state.minted)
        except SnapshotError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, GenesisError, InvariantViolation,
                msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise SnapshotError(f"not a ledger snapshot: {e}") from None
        state._rebuild_indexes()
        return state

    def _rebuild_indexes(self) -> None:
        for iid, record in self.inferences.rows.items():
            if record.status is InferenceStatus.STARTED:
                self._expiring.setdefault(record.deadline, []).append(iid)
            else:
                self._closed.setdefault(self.inference_epoch(record), set()).add(iid)
        for iid, validator in self.checks.rows:
            self._checkers.setdefault(iid, set()).add(validator)
        for epoch, validator in self.commitments.rows:
            self._committed.setdefault(epoch, set()).add(validator)
        for iid, dispute in self.disputes.rows.items():
            if dispute.outcome is DisputeOutcome.OPEN:
                self._disputes_due.setdefault(dispute.deadline, []).append(iid)
        for key, held in self.held.rows.items():
            self._index_held(key, held)
        self._forget_heap = [(until, iid) for iid, until in self.seen.rows.items()]
        heapq.heapify(self._forget_heap)

    def _index_held(self, key: tuple[bytes, str], held: HeldFinish) -> None:
        iid, executor = key
        self._held_expiring.setdefault(held.deadline, []).append(key)
        self._held_by_id.setdefault(iid, set()).add(executor)
        self._held_per_executor[executor] = self._held_per_executor.get(executor, 0) + 1

    # ------------------------------------------------------------------ mutations used by the rules

    def credit(self, address: str, amount: int) -> None:
        account = self.accounts.get(address)
        if account is None:
            self.accounts.put(address, Account(amount, 0))
        else:
            self.accounts.put(address, Account(account.balance + amount, account.sequence))

    def debit(self, address: str, amount: int) -> None:
        account = self.accounts.rows[address]
        self.accounts.put(address, Account(account.balance - amount, account.sequence))

    def mint(self, address: str, amount: int) -> None:
        """Create ``amount`` new coins in ``address`` (the epoch reward; nothing else mints)."""
        assert amount >= 0
        if amount:
            self.credit(address, amount)
            self.minted += amount
            self._block_minted += amount

    def close_inference(self, inference_id: bytes, record: Inference) -> None:
        """Store a settled or expired record and index it under its epoch."""
        assert record.status in (InferenceStatus.SETTLED, InferenceStatus.EXPIRED)
        self.inferences.put(inference_id, record)
        self._closed.setdefault(self.inference_epoch(record), set()).add(inference_id)

    def add_check(self, inference_id: bytes, validator: str, check: Check) -> None:
        self.checks.put((inference_id, validator), check)
        self._checkers.setdefault(inference_id, set()).add(validator)

    def add_commitment(self, epoch: int, validator: str, commitment: SeedCommitment) -> None:
        self.commitments.put((epoch, validator), commitment)
        self._committed.setdefault(epoch, set()).add(validator)

    def open_dispute(self, inference_id: bytes, dispute: Dispute) -> None:
        self.disputes.put(inference_id, dispute)
        self._disputes_due.setdefault(dispute.deadline, []).append(inference_id)

    def prune_epochs_before(self, epoch: int) -> None:
        """Forget the inferences (with their checks, votes and disputes), seed commitments and
        epoch records of every epoch before ``epoch``, and summaries older than the kept ones."""
        for old in sorted(e for e in self._closed if e < epoch):
            for iid in sorted(self._closed.pop(old)):
                self.inferences.delete(iid)
                for validator in sorted(self._checkers.pop(iid, ())):
                    self.checks.delete((iid, validator))
                dispute = self.disputes.get(iid)
                if dispute is not None:
                    for member in dispute.committee:
                        if (iid, member) in self.votes:
                            self.votes.delete((iid, member))
                    self.disputes.delete(iid)
        for key in sorted(k for k in self.commitments.rows if k[0] < epoch):
            self.commitments.delete(key)
        for old in [e for e in self._committed if e < epoch]:
            del self._committed[old]
        for old in sorted(e for e in self.epochs.rows if e < epoch):
            self.epochs.delete(old)
        for old in sorted(e for e in self.summaries.rows if e <= epoch - SUMMARY_EPOCHS_KEPT):
            self.summaries.delete(old)

    def bump_sequence(self, address: str) -> None:
        account = self.accounts.rows[address]
        self.accounts.put(address, Account(account.balance, account.sequence + 1))

    def hold_finish(self, key: tuple[bytes, str], held: HeldFinish) -> None:
        self.held.put(key, held)
        self._index_held(key, held)

    def release_held(self, inference_id: bytes) -> dict[str, HeldFinish]:
        """Remove and return every Finish held for ``inference_id``, by executor."""
        return {executor: self.drop_held((inference_id, executor))
                for executor in sorted(self._held_by_id.get(inference_id, ()))}

    def drop_held(self, key: tuple[bytes, str]) -> HeldFinish:
        """Remove one held Finish and its index entries (its deadline entry is skipped lazily)."""
        held = self.held.rows[key]
        self.held.delete(key)
        iid, executor = key
        claimants = self._held_by_id[iid]
        claimants.discard(executor)
        if not claimants:
            del self._held_by_id[iid]
        remaining = self._held_per_executor[executor] - 1
        if remaining:
            self._held_per_executor[executor] = remaining
        else:
            del self._held_per_executor[executor]
        return held

    def held_count(self, executor: str) -> int:
        return self._held_per_executor.get(executor, 0)

    def remember_request(self, inference_id: bytes, until_ms: int) -> None:
        self.seen.put(inference_id, until_ms)
        heapq.heappush(self._forget_heap, (until_ms, inference_id))

    def schedule_expiry(self, inference_id: bytes, height: int) -> None:
        self._expiring.setdefault(height, []).append(inference_id)


def check_invariants(state: LedgerState) -> None:
    """Full pass over the state: conservation of coins and no negative amounts. O(state)."""
    for table in state._tables:
        for key, value in table.rows.items():
            _check_record(table.tag, key, value, table.codec.coins(value))
    total, expected = state.total_coins(), state.genesis.supply + state.minted
    if total != expected:
        raise InvariantViolation(f"state holds {total} coins, genesis supply + minted is {expected}")


# --------------------------------------------------------------------------- transaction rules


def process_transfer(state: LedgerState, ctx: BlockContext, signed: Signed[Transfer],
                     signer: str, apply: bool) -> str:
    """Move coins between accounts; the recipient must be a key's address, the sender must cover it."""
    tx = signed.message
    if not is_account_address(tx.to):
        raise TxRejected(Reason.INVALID_ADDRESS, f"{tx.to!r} is not a secp256k1 peer id")
    balance = state.balance(signer)
    if tx.amount > balance:
        raise TxRejected(Reason.INSUFFICIENT_BALANCE, f"transfer of {tx.amount}, balance {balance}")
    if apply:
        state.debit(signer, tx.amount)
        state.credit(tx.to, tx.amount)
    return f"{tx.amount} to {tx.to}"


def process_register_participant(state: LedgerState, ctx: BlockContext,
                                 signed: Signed[RegisterParticipant], signer: str,
                                 apply: bool) -> str:
    """Join (or update addrs/models): any funded account may; weight stays as genesis gave it."""
    tx = signed.message
    for addr in tx.addrs:
        if not 0 < len(addr) <= MAX_ADDR_LEN:
            raise TxRejected(Reason.MALFORMED, f"addresses must have 1 to {MAX_ADDR_LEN} chars")
    for model in tx.models:
        if model not in state.params.price_per_token:
            raise TxRejected(Reason.UNKNOWN_MODEL, f"{model!r} has no price on this network")
    old = state.registry.get(signer)
    if apply:
        addrs, models = tuple(tx.addrs), tuple(sorted(set(tx.models)))
        state.registry.put(signer, replace(old, addrs=addrs, models=models) if old else Participant(
            pubkey=signed.signer, weight=0, addrs=addrs, models=models, completed=0, missed=0))
    return "updated" if old else "registered"


def process_start_inference(state: LedgerState, ctx: BlockContext,
                            signed: Signed[StartInference], signer: str, apply: bool) -> str:
    """The TA locks the client's escrow for a client-signed request and names its executor."""
    tx = signed.message
    if signer not in state.registry:
        raise TxRejected(Reason.NOT_A_PARTICIPANT, "only a registered participant can act as TA")
    try:
        request: Signed[InferenceRequest] = open_envelope(tx.request, InferenceRequest)
    except WireError as e:
        raise TxRejected(Reason.BAD_CLIENT_REQUEST, f"{e.code}: {e}") from None
    req = request.message
    price = state.params.price_per_token.get(req.model)
    if price is None:
        raise TxRejected(Reason.UNKNOWN_MODEL, f"{req.model!r} has no price on this network")
    window = state.params.request_window_ms
    if not request_is_fresh(req.timestamp_ms, ctx.time_ms, window):
        raise TxRejected(Reason.STALE_REQUEST, f"request time {req.timestamp_ms} is more than "
                                               f"{window} ms from block time {ctx.time_ms}")
    iid = request.digest
    if iid in state.inferences or iid in state.seen:
        raise TxRejected(Reason.DUPLICATE_INFERENCE, f"inference {iid.hex()} was already started")
    if tx.executor == signer:
        raise TxRejected(Reason.SELF_EXECUTION, "a TA may not execute its own requests")
    executor = state.registry.get(tx.executor)
    if executor is None or req.model not in executor.models:
        raise TxRejected(Reason.EXECUTOR_NOT_ELIGIBLE, f"{tx.executor!r} does not serve {req.model}")
    client = _peer_id(request.signer)
    account = state.accounts.get(client)
    if account is None:
        raise TxRejected(Reason.UNKNOWN_CLIENT, f"client {client} has no account")
    prompt_bound = prompt_token_bound(req, state.params)
    escrow = escrow_for(prompt_bound, req.max_tokens, price)
    if escrow > account.balance:
        raise TxRejected(Reason.INSUFFICIENT_BALANCE,
                         f"escrow {escrow} exceeds the client's balance {account.balance}")
    if not apply:
        return f"would escrow {escrow}"
    state.debit(client, escrow)
    record = Inference(client=client, ta=signer, executor=tx.executor, model=req.model,
                       price=price, max_tokens=req.max_tokens, prompt_bound=prompt_bound,
                       escrow=escrow, request_ms=req.timestamp_ms, start_height=ctx.height,
                       deadline=inference_deadline(ctx.height, state.params),
                       status=InferenceStatus.STARTED)
    state.inferences.put(iid, record)
    state.remember_request(iid, replay_memory_until(req.timestamp_ms, window))
    held = state.release_held(iid).get(tx.executor)
    if held is not None:
        if held.completion_tokens > req.max_tokens:
            state.schedule_expiry(iid, record.deadline)
            return f"inference {iid.hex()} started; its held Finish claimed too many tokens"
        settle_inference(state, ctx, iid, record, held.prompt_tokens, held.completion_tokens,
                         held.response_hash, held.artifact_commitment)
        return f"inference {iid.hex()} started and settled with its held Finish"
    state.schedule_expiry(iid, record.deadline)
    return f"inference {iid.hex()} started, escrow {escrow}"


def process_finish_inference(state: LedgerState, ctx: BlockContext,
                             signed: Signed[FinishInference], signer: str, apply: bool) -> str:
    """The named executor reports its counts: settle now, or hold until the Start commits."""
    tx = signed.message
    if (len(tx.inference_id), len(tx.response_hash), len(tx.artifact_commitment)) != (HASH_BYTES,) * 3:
        raise TxRejected(Reason.MALFORMED, f"inference id and hashes must be {HASH_BYTES} bytes")
    if signer not in state.registry:
        raise TxRejected(Reason.NOT_A_PARTICIPANT, "only a registered participant executes")
    iid = tx.inference_id
    record = state.inferences.get(iid)
    if record is None:
        return _hold_finish(state, ctx, tx, signer, apply)
    if record.executor != signer:
        raise TxRejected(Reason.WRONG_EXECUTOR, f"inference {iid.hex()} was given to {record.executor}")
    if record.status is not InferenceStatus.STARTED:
        raise TxRejected(Reason.INFERENCE_CLOSED, f"inference {iid.hex()} is {record.status}")
    if tx.completion_tokens > record.max_tokens:
        raise TxRejected(Reason.TOKENS_EXCEED_REQUEST,
                         f"{tx.completion_tokens} completion tokens, max_tokens {record.max_tokens}")
    if apply:
        settle_inference(state, ctx, iid, record, tx.prompt_tokens, tx.completion_tokens,
                         tx.response_hash, tx.artifact_commitment)
    return f"inference {iid.hex()} settled"


def _hold_finish(state: LedgerState, ctx: BlockContext, tx: FinishInference, signer: str,
                 apply: bool) -> str:
    """A Finish that outran its Start waits, bounded per executor and in total."""
    iid = tx.inference_id
    if iid in state.seen:
        raise TxRejected(Reason.INFERENCE_CLOSED, f"inference {iid.hex()} closed and was pruned")
    if (iid, signer) in state.held:
        raise TxRejected(Reason.DUPLICATE_FINISH, f"a Finish for {iid.hex()} is already held")
    p = state.params
    if len(state.held) >= p.max_held_finishes or state.held_count(signer) >= p.max_held_finishes_per_executor:
        raise TxRejected(Reason.HOLDING_AREA_FULL, "too many Finishes wait for their Start")
    if apply:
        state.hold_finish((iid, signer), HeldFinish(
            tx.prompt_tokens, tx.completion_tokens, tx.response_hash, tx.artifact_commitment,
            held_finish_deadline(ctx.height, state.params)))
    return f"held until the StartInference of {iid.hex()} commits"


def settle_inference(state: LedgerState, ctx: BlockContext, iid: bytes, record: Inference,
                     prompt_tokens: int, completion_tokens: int, response_hash: bytes,
                     artifact_commitment: bytes) -> None:
    """Charge the work (capped at escrow) to the executor's pending fees; refund the rest; fix
    the probability p that it is checked from the executor's reputation and the epoch's floor."""
    cost = inference_cost(prompt_tokens, completion_tokens, record.price, record.escrow)
    if record.escrow > cost:
        state.credit(record.client, record.escrow - cost)
    if cost:
        state.fees.put(record.executor, state.pending_fees(record.executor) + cost)
    epoch = epoch_of(ctx.height, state.params)
    info = state.epochs.rows[epoch]
    executor = state.registry.rows[record.executor]
    state.close_inference(iid, replace(
        record, status=InferenceStatus.SETTLED, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, response_hash=response_hash,
        artifact_commitment=artifact_commitment, cost=cost, closed_height=ctx.height,
        validation_ppm=validation_ppm(executor.reputation_ppm, info.floor_ppm, state.params),
        payout=Payout.PENDING))
    state.epochs.put(epoch, replace(info, inferences=info.inferences + 1))
    state.registry.put(record.executor, replace(executor, completed=executor.completed + 1))


def process_commit_seed(state: LedgerState, ctx: BlockContext,
                        signed: Signed[CommitValidationSeed], signer: str, apply: bool) -> str:
    """A participant with weight commits, during epoch e-1, to its secret seed for epoch e."""
    tx = signed.message
    if len(tx.commitment) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"a seed commitment is {HASH_BYTES} bytes")
    participant = state.registry.get(signer)
    if participant is None or participant.weight == 0:
        raise TxRejected(Reason.NOT_A_VALIDATOR, "only a participant with weight validates")
    if not seed_commit_open(tx.epoch, ctx.height, state.params):
        raise TxRejected(Reason.WRONG_EPOCH, f"seeds for epoch {tx.epoch} are committed during epoch "
                                             f"{tx.epoch - 1}; this is epoch "
                                             f"{epoch_of(ctx.height, state.params)}")
    if (tx.epoch, signer) in state.commitments:
        raise TxRejected(Reason.ALREADY_COMMITTED, f"a seed for epoch {tx.epoch} is already committed")
    if apply:
        state.add_commitment(tx.epoch, signer, SeedCommitment(tx.commitment, ctx.height))
    return f"seed for epoch {tx.epoch} committed"


def process_reveal_seed(state: LedgerState, ctx: BlockContext,
                        signed: Signed[RevealValidationSeed], signer: str, apply: bool) -> str:
    """The claim: the seed opens its commitment, and its duties over the epoch are counted."""
    tx = signed.message
    if len(tx.seed) != SEED_BYTES:
        raise TxRejected(Reason.MALFORMED, f"a validation seed is {SEED_BYTES} bytes")
    commitment = state.commitments.get((tx.epoch, signer))
    if commitment is None:
        raise TxRejected(Reason.NO_COMMITMENT, f"no seed was committed for epoch {tx.epoch}")
    if commitment.revealed:
        raise TxRejected(Reason.ALREADY_REVEALED, f"the seed for epoch {tx.epoch} is already revealed")
    if not seed_reveal_open(tx.epoch, ctx.height, state.params):
        raise TxRejected(Reason.WRONG_EPOCH, f"the seed for epoch {tx.epoch} is revealed after it "
                                             "ends and before it settles")
    if seed_commitment(tx.epoch, signer, tx.seed) != commitment.commitment:
        raise TxRejected(Reason.SEED_MISMATCH, "the seed does not open the commitment")
    if not apply:
        return "would reveal"
    duties = state.validation_duties(tx.epoch, signer, tx.seed)
    done = sum((iid, signer) in state.checks or (iid, signer) in state.votes for iid in duties)
    state.commitments.put((tx.epoch, signer), replace(
        commitment, seed=tx.seed, revealed_height=ctx.height, duties=len(duties), done=done))
    return f"epoch {tx.epoch}: {len(duties)} duties, {done} done, {len(duties) - done} skipped"


def _inference_to_check(state: LedgerState, ctx: BlockContext, iid: bytes) -> Inference:
    if len(iid) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"an inference id is {HASH_BYTES} bytes")
    record = state.inferences.get(iid)
    if record is None:
        raise TxRejected(Reason.UNKNOWN_INFERENCE, f"no inference {iid.hex()} (never, or pruned)")
    if record.status is not InferenceStatus.SETTLED:
        raise TxRejected(Reason.NOT_VALIDATABLE, f"inference {iid.hex()} is {record.status}, not settled")
    return record


def _verdict_checked(verdict: VerdictStats) -> None:
    if not verdict_is_consistent(verdict.valid, verdict.suspicious, verdict.failure_flags):
        raise TxRejected(Reason.INCONSISTENT_VERDICT, "a valid verdict names no failure; a failed "
                                                      "one names one and is not 'suspicious'")


def process_validation(state: LedgerState, ctx: BlockContext, signed: Signed[Validation],
                       signer: str, apply: bool) -> str:
    """A committed validator records its verdict on a settled inference; a failure opens a dispute."""
    tx = signed.message
    _verdict_checked(tx.verdict)
    record = _inference_to_check(state, ctx, tx.inference_id)
    iid, epoch = tx.inference_id, state.inference_epoch(record)
    if ctx.height > validation_deadline(epoch, state.params):
        raise TxRejected(Reason.VALIDATION_CLOSED, f"checks of epoch {epoch} closed at height "
                                                   f"{validation_deadline(epoch, state.params)}")
    if signer in (record.executor, record.ta):
        raise TxRejected(Reason.CONFLICT_OF_INTEREST, "a validator never checks work it executed or routed")
    commitment = state.commitments.get((epoch, signer))
    if commitment is None or signer not in state.epochs.rows[epoch].weights:
        raise TxRejected(Reason.NOT_A_VALIDATOR, f"not a committed validator of epoch {epoch}")
    if commitment.revealed:
        raise TxRejected(Reason.ALREADY_CLAIMED, f"its seed for epoch {epoch} is revealed: duties closed")
    if (iid, signer) in state.checks:
        raise TxRejected(Reason.DUPLICATE_VALIDATION, f"it already checked {iid.hex()}")
    if not apply:
        return "would record the check"
    state.add_check(iid, signer, Check.of(tx.verdict, ctx.height))
    if tx.verdict.valid:
        return f"{iid.hex()} checked: valid"
    if iid in state.disputes:
        return f"{iid.hex()} checked: invalid (already disputed)"
    candidates = state.validation_candidates(iid)
    candidates.pop(signer)
    committee = draw_committee(candidates, ctx.block_hash, iid, state.params.dispute_committee_size)
    state.open_dispute(iid, Dispute(epoch=epoch, executor=record.executor, accuser=signer,
                                    opened_height=ctx.height,
                                    deadline=dispute_deadline(ctx.height, state.params),
                                    committee=committee))
    _resolve_if_complete(state, ctx, iid)
    return f"{iid.hex()} checked: invalid; dispute opened, committee {', '.join(committee) or 'empty'}"


def process_dispute_vote(state: LedgerState, ctx: BlockContext, signed: Signed[DisputeVote],
                         signer: str, apply: bool) -> str:
    """A committee member's re-check of a disputed inference; the last vote resolves it."""
    tx = signed.message
    _verdict_checked(tx.verdict)
    if len(tx.inference_id) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"an inference id is {HASH_BYTES} bytes")
    iid = tx.inference_id
    dispute = state.disputes.get(iid)
    if dispute is None:
        raise TxRejected(Reason.NO_DISPUTE, f"inference {iid.hex()} is not disputed")
    if dispute.outcome is not DisputeOutcome.OPEN or ctx.height > dispute.deadline:
        raise TxRejected(Reason.VOTING_CLOSED, f"the dispute on {iid.hex()} is {dispute.outcome}")
    if signer not in dispute.committee:
        raise TxRejected(Reason.NOT_ON_COMMITTEE, f"not on the committee of {iid.hex()}")
    if (iid, signer) in state.votes:
        raise TxRejected(Reason.DUPLICATE_VOTE, f"it already voted on {iid.hex()}")
    if apply:
        state.votes.put((iid, signer), Check.of(tx.verdict, ctx.height))
        _resolve_if_complete(state, ctx, iid)
    return f"vote on {iid.hex()}: {'valid' if tx.verdict.valid else 'invalid'}"


def _resolve_if_complete(state: LedgerState, ctx: BlockContext, iid: bytes) -> None:
    dispute = state.disputes.rows[iid]
    if all((iid, member) in state.votes for member in dispute.committee):
        resolve_dispute(state, ctx, iid)


def resolve_dispute(state: LedgerState, ctx: BlockContext, iid: bytes) -> None:
    """Tally the committee's votes by the epoch's weights; a strict majority of votes cast decides.

    Proven invalid work sanctions its executor at once, not at settlement: weight and
    reputation drop to 0, so transfer agents stop drawing it for new clients and it
    holds no seat in a validator set chosen from now on. Its fees and reward are
    judged at settlement, with the rest of its epoch."""
    dispute = state.disputes.rows[iid]
    assert dispute.outcome is DisputeOutcome.OPEN
    weights = state.epochs.rows[dispute.epoch].weights
    invalid = valid = 0
    for member in dispute.committee:
        vote = state.votes.get((iid, member))
        if vote is not None:
            if vote.valid:
                valid += weights[member]
            else:
                invalid += weights[member]
    outcome = dispute_outcome(invalid, valid)
    state.disputes.put(iid, replace(dispute, outcome=outcome, invalid_weight=invalid, valid_weight=valid,
                                    resolved_height=ctx.height))
    if outcome is DisputeOutcome.INVALID:
        executor = state.inferences.rows[iid].executor
        state.registry.put(executor, replace(state.registry.rows[executor], weight=0, reputation_ppm=0))


_PROCESSORS: dict[type, Callable[..., str]] = {
    Transfer: process_transfer,
    RegisterParticipant: process_register_participant,
    StartInference: process_start_inference,
    FinishInference: process_finish_inference,
    CommitValidationSeed: process_commit_seed,
    RevealValidationSeed: process_reveal_seed,
    Validation: process_validation,
    DisputeVote: process_dispute_vote,
}


# --------------------------------------------------------------------------- end of block


def process_expiries(state: LedgerState, ctx: BlockContext) -> None:
    """Inferences still running at the end of their deadline height: full refund, a miss counted."""
    for iid in state._expiring.pop(ctx.height, ()):
        record = state.inferences.get(iid)
        if record is None or record.status is not InferenceStatus.STARTED:
            continue  # settled in time
        state.credit(record.client, record.escrow)
        state.close_inference(iid, replace(record, status=InferenceStatus.EXPIRED,
                                           closed_height=ctx.height))
        executor = state.registry.rows[record.executor]
        state.registry.put(record.executor, replace(executor, missed=executor.missed + 1))


def process_held_deadlines(state: LedgerState, ctx: BlockContext) -> None:
    """A Finish whose Start never came within the deadline is dropped (it moved no coins)."""
    for key in state._held_expiring.pop(ctx.height, ()):
        held = state.held.get(key)
        if held is not None and held.deadline == ctx.height:
            state.drop_held(key)


def process_replay_memory(state: LedgerState, ctx: BlockContext) -> None:
    """Forget request ids whose timestamps can no longer be fresh: they can never start again."""
    heap = state._forget_heap
    while heap and heap[0][0] < ctx.time_ms:
        until, iid = heapq.heappop(heap)
        if state.seen.get(iid) == until:
            state.seen.delete(iid)


def process_dispute_deadlines(state: LedgerState, ctx: BlockContext) -> None:
    """Disputes still open at the end of their deadline height resolve on the votes cast."""
    for iid in state._disputes_due.pop(ctx.height, ()):
        dispute = state.disputes.get(iid)
        if dispute is not None and dispute.outcome is DisputeOutcome.OPEN:
            resolve_dispute(state, ctx, iid)


@dataclass
class PeerTally:
    """What one participant did in an epoch, as settlement reads it from the state."""

    weight: int = 0
    reputation_ppm: int = 0
    inferences: int = 0
    expired: int = 0
    tokens: int = 0
    checked: int = 0
    observations: list[Observation] = field(default_factory=list)
    proven_invalid: bool = False  # a dispute found one of its inferences invalid
    committed: bool = False
    revealed: bool = False
    duties: int = 0
    done: int = 0
    checks: int = 0
    votes: int = 0
    missed_votes: int = 0
    overturned: int = 0
    vouched_invalid: int = 0  # its passing checks of work a dispute proved invalid
    work: int = 0


@dataclass
class EpochTally:
    epoch: int
    floor_ppm: int
    peers: dict[str, PeerTally]
    fees: list[tuple[bytes, str, str, int]]  # (inference id, executor, client, cost) of settled ones
    checked: int = 0
    disputes: int = 0
    disputes_invalid: int = 0


def tally_epoch(state: LedgerState, epoch: int) -> EpochTally:
    """Read everything settlement needs about ``epoch`` from the state (changes nothing)."""
    info = state.epochs.rows[epoch]
    weights = info.weights
    tally = EpochTally(epoch, info.floor_ppm, {}, [])

    def peer(address: str) -> PeerTally:
        row = tally.peers.get(address)
        if row is None:
            participant = state.registry.rows[address]
            row = tally.peers[address] = PeerTally(weight=weights.get(address, 0),
                                                   reputation_ppm=participant.reputation_ppm)
        return row

    for address in weights:
        peer(address)
    duties: set[tuple[bytes, str]] = set()  # (inference id, validator) of every revealed duty
    for (e, address), commitment in state.commitments.rows.items():
        if e == epoch and address in weights:
            row = peer(address)
            row.committed, row.revealed = True, commitment.revealed
            row.duties, row.done = commitment.duties, commitment.done
            if commitment.revealed:
                duties.update((iid, address)
                              for iid in state.validation_duties(epoch, address, commitment.seed))
    for iid in state.epoch_inferences(epoch):
        record = state.inferences.rows[iid]
        executor = peer(record.executor)
        if record.status is InferenceStatus.EXPIRED:
            executor.expired += 1
            continue
        executor.inferences += 1
        executor.tokens += record.billable_tokens
        tally.fees.append((iid, record.executor, record.client, record.cost))
        dispute = state.disputes.get(iid)
        checks = state.validations(iid)
        passes = [(weights[v], c.suspicious) for v, c in checks.items() if c.valid]
        observation = inference_observation(dispute.outcome if dispute else None, passes)
        if observation is not None:
            executor.checked += 1
            tally.checked += 1
            executor.observations.append(observation)
        for validator, check in checks.items():
            row = peer(validator)
            row.checks += 1
            overturned = (dispute is not None and dispute.accuser == validator
                          and dispute.outcome is DisputeOutcome.VALID)
            vouched = dispute is not None and dispute.outcome is DisputeOutcome.INVALID and check.valid
            row.overturned += overturned
            row.vouched_invalid += vouched
            if (iid, validator) in duties and not overturned and not vouched:
                row.work += record.prompt_tokens + record.completion_tokens
        if dispute is None:
            continue
        assert dispute.outcome is not DisputeOutcome.OPEN, "a dispute outlived its epoch's settlement"
        tally.disputes += 1
        if dispute.outcome is DisputeOutcome.INVALID:
            tally.disputes_invalid += 1
            executor.proven_invalid = True
        for member in dispute.committee:
            row = peer(member)
            if (iid, member) in state.votes:
                row.votes += 1
                row.work += record.prompt_tokens + record.completion_tokens
            else:
                row.missed_votes += 1
    return tally


def settle_epoch(tally: EpochTally, params: Params, height: int) -> EpochSummary:
    """The pure rule of settlement: from what happened in the epoch, who is paid what."""
    caught = {}
    for address, row in tally.peers.items():
        if row.proven_invalid:
            caught[address] = "dispute"
        elif sprt_catches(row.observations, params):
            caught[address] = "sprt"
    paid: dict[str, int] = {}
    refunded: dict[str, int] = {}
    refunds: dict[str, int] = {}
    for _iid, executor, client, cost in tally.fees:
        if executor in caught:
            refunded[executor] = refunded.get(executor, 0) + cost
            refunds[client] = refunds.get(client, 0) + cost
        else:
            paid[executor] = paid.get(executor, 0) + cost
    executor_pool, validator_pool = epoch_reward_pools(tally.epoch, params)
    executor_shares = pro_rata(executor_pool, {a: r.tokens for a, r in tally.peers.items()})
    validator_shares = pro_rata(validator_pool, {a: r.work for a, r in tally.peers.items()})
    rows = []
    for address, row in sorted(tally.peers.items()):
        reasons = forfeit_reasons(in_validator_set=row.weight > 0 and tally.epoch > 0,
                                  committed=row.committed, revealed=row.revealed,
                                  skipped=row.duties - row.done, missed_votes=row.missed_votes,
                                  caught=address in caught, vouched_invalid=row.vouched_invalid)
        shares = executor_shares.get(address, 0), validator_shares.get(address, 0)
        missed_too_many = miss_rate_exceeded(row.expired, row.inferences, params)
        clean = row.inferences > 0 and row.checked > 0
        reputation = reputation_after_epoch(row.reputation_ppm, caught=address in caught,
                                            missed_too_many=missed_too_many, clean=clean, params=params)
        rows.append(ParticipantOutcome(
            peer=address, weight=row.weight, inferences=row.inferences, expired=row.expired,
            tokens=row.tokens, checked=row.checked, fees_paid=paid.get(address, 0),
            fees_refunded=refunded.get(address, 0), committed=row.committed, revealed=row.revealed,
            duties=row.duties, done=row.done, checks=row.checks, votes=row.votes,
            missed_votes=row.missed_votes, overturned=row.overturned, work=row.work,
            executor_reward=0 if reasons else shares[0], validator_reward=0 if reasons else shares[1],
            forfeited=sum(shares) if reasons else 0, forfeit=tuple(str(r) for r in reasons),
            caught=caught.get(address, ""), reputation_before=row.reputation_ppm,
            reputation_after=reputation, weight_after=0 if address in caught else row.weight))
    minted = sum(r.executor_reward + r.validator_reward for r in rows)
    forfeited = sum(r.forfeited for r in rows)
    assert minted + forfeited <= executor_pool + validator_pool
    assert sum(paid.values()) + sum(refunded.values()) == sum(cost for *_, cost in tally.fees)
    return EpochSummary(
        epoch=tally.epoch, height=height, floor_ppm=tally.floor_ppm,
        inferences=len(tally.fees), expired=sum(r.expired for r in tally.peers.values()),
        checked=tally.checked, disputes=tally.disputes, disputes_invalid=tally.disputes_invalid,
        reward=executor_pool + validator_pool, minted=minted, forfeited=forfeited,
        fees_paid=sum(paid.values()), fees_refunded=sum(refunded.values()),
        refunds=tuple(sorted(refunds.items())), participants=tuple(rows))


def process_epoch_settlement(state: LedgerState, ctx: BlockContext, epoch: int) -> EpochSummary:
    """The one place an epoch's economics close, at the end of ``settlement_height(epoch)``.

    Tallies the epoch (:func:`tally_epoch`), decides (:func:`settle_epoch`), then applies:
    each settled inference's fee moves from the executor's pending fees to the executor, or
    back to its client if the executor was caught; rewards are minted; reputations, weights
    and counters are updated; the summary is stored; the epoch before is pruned.
    """
    tally = tally_epoch(state, epoch)
    summary = settle_epoch(tally, state.params, ctx.height)
    caught = {row.peer for row in summary.participants if row.caught}
    moved: dict[str, int] = {}
    for iid, executor, client, cost in tally.fees:
        record = state.inferences.rows[iid]
        assert record.payout is Payout.PENDING, f"inference {iid.hex()} settled twice"
        refund = executor in caught
        state.credit(client if refund else executor, cost)
        moved[executor] = moved.get(executor, 0) + cost
        state.inferences.put(iid, replace(record, payout=Payout.REFUNDED if refund else Payout.PAID))
    for executor, amount in sorted(moved.items()):
        remaining = state.pending_fees(executor) - amount
        if remaining < 0:
            raise InvariantViolation(f"settling epoch {epoch} took {amount} of {executor}'s pending fees "
                                     f"of {remaining + amount}")
        if remaining:
            state.fees.put(executor, remaining)
        elif executor in state.fees:
            state.fees.delete(executor)
    minted_before = state.minted
    for row in summary.participants:
        state.mint(row.peer, row.executor_reward + row.validator_reward)
        participant = state.registry.rows[row.peer]
        state.registry.put(row.peer, replace(
            participant, reputation_ppm=row.reputation_after,
            weight=0 if row.caught else participant.weight,
            caught=participant.caught + bool(row.caught),
            overturned=participant.overturned + row.overturned))
    if state.minted - minted_before != summary.minted:
        raise InvariantViolation(f"epoch {epoch} minted {state.minted - minted_before}, "
                                 f"its summary says {summary.minted}")
    state.summaries.put(epoch, summary)
    state.prune_epochs_before(epoch)
    return summary


def process_epoch_start(state: LedgerState, ctx: BlockContext, epoch: int) -> None:
    """Rotate the validator set: freeze ``epoch``'s weights (the participants table's, after any
    settlement in this block) and its validation floor from the epoch that just ended."""
    ended = state.epochs.rows[epoch - 1]
    state.epochs.put(epoch, EpochInfo(traffic=ended.inferences,
                                      floor_ppm=validation_floor_ppm(ended.inferences, state.params),
                                      validators=tuple(state.weights().items())))


def end_block(state: LedgerState, ctx: BlockContext) -> None:
    process_expiries(state, ctx)
    process_held_deadlines(state, ctx)
    process_replay_memory(state, ctx)
    process_dispute_deadlines(state, ctx)
    settling = epoch_settled_at(ctx.height, state.params)
    if settling is not None:
        process_epoch_settlement(state, ctx, settling)
    if is_epoch_end(ctx.height, state.params):
        process_epoch_start(state, ctx, epoch_after(ctx.height, state.params))


def format_epoch_summary(summary: EpochSummary, names: Mapping[str, str] | None = None) -> str:
    """The settlement of an epoch as a table for people (``names``: peer id -> label)."""
    def name(peer: str) -> str:
        return (names or {}).get(peer, peer[-8:])

    lines = [f"epoch {summary.epoch} settled at height {summary.height}: "
             f"{summary.inferences} inferences ({summary.checked} checked, {summary.expired} expired), "
             f"floor m = {summary.floor_ppm / PPM:.0%}, {summary.disputes} disputes "
             f"({summary.disputes_invalid} invalid)",
             f"  fees paid {summary.fees_paid}, refunded {summary.fees_refunded}; reward {summary.reward}: "
             f"minted {summary.minted}, forfeited {summary.forfeited}",
             f"  {'participant':<12} {'weight':>6} {'inf':>4} {'fees':>7} {'refund':>7} {'duties':>9} "
             f"{'votes':>5} {'reward':>8} {'forfeit':>8}  {'reputation':<12} notes"]
    for row in sorted(summary.participants, key=lambda r: name(r.peer)):
        duties = f"{row.done}/{row.duties}" if row.revealed else ("unrevealed" if row.committed else "-")
        notes = []
        if row.caught:
            notes.append(f"CAUGHT ({row.caught})")
        if row.forfeit:
            notes.append("forfeits: " + ", ".join(row.forfeit))
        if row.overturned:
            notes.append(f"{row.overturned} accusation(s) overturned")
        if row.weight_after != row.weight:
            notes.append(f"weight -> {row.weight_after}")
        lines.append(
            f"  {name(row.peer):<12} {row.weight:>6} {row.inferences:>4} {row.fees_paid:>7} "
            f"{row.fees_refunded:>7} {duties:>9} {row.votes:>5} "
            f"{row.executor_reward + row.validator_reward:>8} {row.forfeited:>8}  "
            f"{row.reputation_before / PPM:.2f} -> {row.reputation_after / PPM:.2f} {'; '.join(notes)}")
    for client, amount in summary.refunds:
        lines.append(f"  refunded {amount} to client {name(client)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def apply_block(state: LedgerState, block: Block) -> tuple[LedgerState, list[Receipt]]:
    """Apply a committed block to ``state`` (mutated in place and returned) with one receipt per tx.

    Raises :class:`BlockMismatch` (nothing applied) if the block does not
    extend this state, and :class:`InvariantViolation` only on a bug.
    """
    check_block(state, block)
    ctx = BlockContext(height=block.height, time_ms=next_block_time(state.time_ms, block.time_ms),
                       block_hash=block.hash)
    receipts = [_deliver(state, ctx, raw) for raw in block.txs]
    end_block(state, ctx)
    state.height, state.time_ms, state.last_block_hash = ctx.height, ctx.time_ms, block.hash
    minted, state._block_minted = state._block_minted, 0
    state._commit(coins_created=minted)
    return state, receipts


def check_block(state: LedgerState, block: Block) -> None:
    """Does ``block`` extend ``state``? (consensus's ValidateBlock; apply_block checks it too).

    Transactions are not judged here: a committed block may carry rejected
    transactions (each gets its receipt), so only the chaining can make a
    block invalid.
    """
    if block.height != state.height + 1:
        raise BlockMismatch(f"block {block.height} does not follow height {state.height}")
    if block.prev_hash != state.last_block_hash:
        raise BlockMismatch(f"block {block.height} does not extend the last applied block")


def check_tx(state: LedgerState, raw: bytes) -> Receipt:
    """Mempool admission: every check a block would make, applied to nothing.

    Judged as if it were the first transaction of the next block, at the last
    block's time, except that a sequence *ahead* of the account's is accepted
    (the mempool orders them); balances are those committed, so txs queued
    in the mempool are not counted -- the block decides.
    """
    ctx = BlockContext(height=state.height + 1, time_ms=state.time_ms, mempool=True)
    return _run(state, ctx, raw, apply=False)


def _deliver(state: LedgerState, ctx: BlockContext, raw: bytes) -> Receipt:
    return _run(state, ctx, raw, apply=True)


def _run(state: LedgerState, ctx: BlockContext, raw: Any, apply: bool) -> Receipt:
    if not isinstance(raw, (bytes, bytearray)):
        return Receipt(b"", Reason.MALFORMED, "a transaction is bytes")
    raw = bytes(raw)
    tx_hash = digest(raw)
    try:
        signed: Signed[Tx] = decode_tx(raw, state.params.max_tx_bytes)
    except WireError as e:
        return Receipt(tx_hash, reason_of(e), str(e))
    tx = signed.message
    signer = _peer_id(signed.signer)
    try:
        if tx.chain_id != state.chain_id:
            raise TxRejected(Reason.WRONG_CHAIN, f"signed for chain {tx.chain_id!r}")
        account = state.accounts.get(signer)
        if account is None:
            raise TxRejected(Reason.UNKNOWN_ACCOUNT, f"{signer} has no account")
        if not sequence_acceptable(account.sequence, tx.sequence, mempool=ctx.mempool):
            raise TxRejected(Reason.BAD_SEQUENCE, f"sequence {tx.sequence}, expected {account.sequence}")
        detail = _PROCESSORS[type(tx)](state, ctx, signed, signer, apply)
    except TxRejected as r:
        return Receipt(tx_hash, r.reason, r.detail, tx.KIND, signer, tx.sequence)
    if apply:
        state.bump_sequence(signer)
    return Receipt(tx_hash, Reason.OK, detail, tx.KIND, signer, tx.sequence)

