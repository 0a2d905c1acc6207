"""The ledger's tables: maps of records that log their changes, how records are hashed, and
the invariants every changed record must keep.

App hash
--------
The state is a set of records (table, key, value). Its hash is an LtHash
(lattice-based homomorphic set hash: each record expands to 1024 lanes of
16 bits by SHAKE-256, and the set hash is their lane-wise sum mod 2^16),
so a block costs two SHAKE calls per record it changed, not a pass over the
whole state. :func:`fold_changes` does that at each commit, from the log of
changes each :class:`Table` keeps; ``LedgerState.app_hash`` is SHA-256 of a
header and the sum. Only tables the rules read are hashed; indexes derived
from them are rebuilt by ``LedgerState.from_bytes``.

Invariants, checked as every block commits (an :class:`InvariantViolation`
means a bug: the replica must stop, never limp on):

- conservation: sum(balances) + sum(escrow of STARTED inferences) +
  sum(pending fees) == genesis supply + minted. Nothing is ever burnt: a
  forfeited reward is not minted, forfeited fees go back to the clients
  that paid them. Checked incrementally: the coins carried by the records
  a block changed must change by exactly what the block minted (each
  table's :class:`Codec` says how many coins a record holds); since the
  genesis state satisfies the equation (checked in full: every record is
  new), every state does; a loaded snapshot is checked in full the same
  way, and ``state.check_invariants`` re-checks any state in full (tests);
- no balance, escrow, cost or pending fee is ever negative; cost <= escrow;
  reputation within [0, 1]; a payout is pending only on a settled inference;
  a verdict is consistent (valid names no failure); a dispute seats neither
  its executor nor its accuser (:func:`check_record`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np

from gonka_p2p.ledger.records import (
    Account,
    Check,
    Dispute,
    EpochInfo,
    EpochSummary,
    HeldFinish,
    Inference,
    InferenceStatus,
    Participant,
    ParticipantOutcome,
    Payout,
    PocEntry,
    PocRound,
    SeedCommitment,
)
from gonka_p2p.ledger.rules import PPM, DisputeOutcome, verdict_is_consistent

_LEAF_DOMAIN = b"gonka-p2p/state-leaf/v1\x00"
_LANES = 1024


class InvariantViolation(AssertionError):
    """A ledger invariant broke: a bug in the state machine. The replica must stop."""


K = TypeVar("K")
V = TypeVar("V")
_ABSENT: Any = object()


@dataclass(frozen=True)
class Codec(Generic[V]):
    """How one table's values become msgpack objects and back, and the coins each one holds."""

    encode: Callable[[V], Any]
    decode: Callable[[Any], V]
    coins: Callable[[V], int]


_FROM_WIRE: dict[str, Callable[[Any], Any]] = {  # msgpack gives lists and str
    "addrs": tuple, "models": tuple, "status": InferenceStatus, "payout": Payout,
    "committee": tuple, "seats": tuple, "members": tuple, "silent": tuple, "outcome": DisputeOutcome,
    "forfeit": tuple, "leaves": tuple, "voters": tuple, "sprt_carry": tuple,
    "model_weights": lambda v: tuple((str(m), int(w)) for m, w in v),
    "draw_weights": lambda v: tuple((str(m), tuple((str(p), int(w)) for p, w in t)) for m, t in v),
    "validators": lambda v: tuple((str(p), int(w)) for p, w in v),
    "refunds": lambda v: tuple((str(c), int(a)) for c, a in v),
    "participants": lambda v: tuple(_OUTCOME_CODEC.decode(row) for row in v),
}


def _record_codec(cls: type, coins: Callable[[Any], int]) -> Codec[Any]:
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

    return Codec(encode, decode, coins)


def _encode_value(value: Any) -> Any:
    if isinstance(value, ParticipantOutcome):
        return _OUTCOME_CODEC.encode(value)
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    return value


_OUTCOME_CODEC = _record_codec(ParticipantOutcome, lambda o: 0)  # nested in a summary
_CHECK_CODEC = _record_codec(Check, lambda c: 0)
_CODECS: dict[str, Codec[Any]] = {  # every table of the state, by tag: how it stores a value, its coins
    "account": _record_codec(Account, lambda a: a.balance),
    "participant": _record_codec(Participant, lambda p: 0),
    "inference": _record_codec(Inference, lambda r: r.locked),
    "seen_request": Codec(lambda v: v, int, lambda v: 0),
    "held_finish": _record_codec(HeldFinish, lambda h: 0),
    "pending_fee": Codec(lambda v: v, int, lambda v: v),
    "epoch": _record_codec(EpochInfo, lambda e: 0),
    "seed_commitment": _record_codec(SeedCommitment, lambda c: 0),
    "validation": _CHECK_CODEC,
    "dispute_vote": _CHECK_CODEC,
    "dispute": _record_codec(Dispute, lambda d: 0),
    "epoch_summary": _record_codec(EpochSummary, lambda s: 0),
    "equivocation": Codec(lambda v: v, int, lambda v: 0),  # offender -> epoch it is punished in
    "poc_round": _record_codec(PocRound, lambda r: 0),
    "poc_entry": _record_codec(PocEntry, lambda e: 0),
}


class Table(Generic[K, V]):
    """A map of immutable records that remembers, per block, what each changed key held before.

    Only :meth:`put` and :meth:`delete` change it, so the commit step sees
    every change: the app hash and the coin invariant are maintained from
    that log alone.
    """

    __slots__ = ("tag", "codec", "rows", "dirty")

    def __init__(self, tag: str, codec: Codec[V]) -> None:
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


def new_table(tag: str) -> Table[Any, Any]:
    """An empty table of the state; its tag names it in the hash and the snapshot."""
    return Table(tag, _CODECS[tag])


def _leaf(tag: str, key: Any, value: Any) -> np.ndarray:
    data = msgpack.packb([tag, key, value], use_bin_type=True)
    return np.frombuffer(hashlib.shake_256(_LEAF_DOMAIN + data).digest(2 * _LANES), dtype="<u2")


def check_record(tag: str, key: Any, value: Any, coins: int) -> None:
    """Raise :class:`InvariantViolation` if one record breaks a bound of its kind; ``coins`` is
    what its table's codec says it holds."""
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


class LtHash:
    """The set hash of the state's records: the lane-wise sum mod 2^16 of one leaf per record,
    so adding or removing a record costs one leaf whatever the size of the state."""

    __slots__ = ("lanes",)

    def __init__(self) -> None:
        self.lanes = np.zeros(_LANES, dtype="<u2")

    def add(self, tag: str, key: Any, value: Any) -> None:
        self.lanes += _leaf(tag, key, value)

    def remove(self, tag: str, key: Any, value: Any) -> None:
        self.lanes -= _leaf(tag, key, value)

    def to_bytes(self) -> bytes:
        return self.lanes.tobytes()


def fold_changes(tables: Iterable[Table[Any, Any]], lthash: LtHash) -> int:
    """Fold every table's logged changes into ``lthash``, check each new record, clear the logs;
    return how many coins the changed records gained (negative: lost)."""
    delta = 0
    for table in tables:
        codec = table.codec
        for key, old in table.dirty.items():
            new = table.rows.get(key, _ABSENT)
            if new is old or new == old:
                continue
            if old is not _ABSENT:
                lthash.remove(table.tag, key, codec.encode(old))
                delta -= codec.coins(old)
            if new is not _ABSENT:
                coins = codec.coins(new)
                check_record(table.tag, key, new, coins)
                lthash.add(table.tag, key, codec.encode(new))
                delta += coins
        table.dirty.clear()
    return delta
