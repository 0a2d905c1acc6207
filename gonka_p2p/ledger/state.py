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
client's signed request timestamp.

``apply_block`` first checks that the block extends this state (height + 1,
``prev_hash``) and raises :class:`BlockMismatch` otherwise -- the caller
fed the wrong block, nothing was applied. Then, in order:

1. each transaction, in block order, is decoded and verified and either
   applied whole or rejected whole (a rule raises :class:`TxRejected` before
   touching anything); each yields a :class:`Receipt`, and a transaction
   never makes ``apply_block`` raise;
2. end of block: inferences whose deadline is this height expire (full
   refund, a miss for the executor); Finishes held past their deadline are
   dropped; request ids older than the replay window are forgotten; if the
   height ends an epoch, :func:`process_epoch_settlement` runs;
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
                                   escrow - cost back to the client;
                                   no such inference yet: held (bounded) until its Start

    inference status:  STARTED --Finish--> SETTLED
                       STARTED --deadline passes--> EXPIRED
                       (FINISHED: a Finish is held, its Start not yet committed)

Memory stays bounded: a request id is remembered (``seen``) only while its
timestamp can still be fresh, since a stale request is refused anyway;
closed inference records are pruned at the first epoch end at least one
full epoch after they closed; held Finishes are capped per executor and in
total and dropped after the deadline; running inferences are bounded by
the clients' balances (every model costs >= 1 coin per token).

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

Invariants, checked as every block commits (an :class:`InvariantViolation`
means a bug: the replica must stop, never limp on):

- conservation: sum(balances) + sum(escrow of STARTED inferences) +
  sum(pending fees) == genesis supply + minted (minted is 0 until the reward
  schedule lands). Checked incrementally: the coins carried by the records
  a block changed must change by exactly what the block minted; since the
  genesis state satisfies the equation (checked in full: every record is
  new), every state does; a loaded snapshot is checked in full the same
  way, and :func:`check_invariants` re-checks any state in full (tests);
- no balance, escrow, cost or pending fee is ever negative; cost <= escrow.

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
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np

from gonka_p2p.identity import digest, peer_id_from_pubkey
from gonka_p2p.ledger.genesis import MAX_ADDR_LEN, Genesis, GenesisError, Params, genesis_from_obj
from gonka_p2p.ledger.rules import (
    epoch_after,
    escrow_for,
    held_finish_deadline,
    inference_cost,
    inference_deadline,
    is_account_address,
    is_epoch_end,
    next_block_time,
    prompt_token_bound,
    replay_memory_until,
    request_is_fresh,
    sequence_acceptable,
)
from gonka_p2p.ledger.transactions import (
    MAX_PEER_ID,
    FinishInference,
    Reason,
    RegisterParticipant,
    StartInference,
    Transfer,
    Tx,
    TxRejected,
    decode_tx,
    reason_of,
)
from gonka_p2p.wire.envelope import Signed, open_envelope
from gonka_p2p.wire.messages import HASH_BYTES, InferenceRequest
from gonka_p2p.wire.schema import Malformed, Message, WireError, bounded

SNAPSHOT_FORMAT = 1
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


_FROM_WIRE: dict[str, Callable[[Any], Any]] = {
    "addrs": tuple, "models": tuple, "status": InferenceStatus}  # msgpack gives lists and str


def _record_codec(cls: type, coins: Callable[[Any], int]) -> _Codec[Any]:
    """A record is encoded as the list of its field values, in declaration order."""
    names = [f.name for f in fields(cls)]

    def encode(row: Any) -> list[Any]:
        return [getattr(row, n) for n in names]

    def decode(obj: Any) -> Any:
        return cls(*[_FROM_WIRE[n](v) if n in _FROM_WIRE else v
                     for n, v in zip(names, obj, strict=True)])

    return _Codec(encode, decode, coins)


_ACCOUNT_CODEC = _record_codec(Account, lambda a: a.balance)
_PARTICIPANT_CODEC = _record_codec(Participant, lambda p: 0)
_INFERENCE_CODEC = _record_codec(Inference, lambda r: r.locked)
_HELD_CODEC = _record_codec(HeldFinish, lambda h: 0)
_SEEN_CODEC: _Codec[int] = _Codec(lambda v: v, int, lambda v: 0)
_FEE_CODEC: _Codec[int] = _Codec(lambda v: v, int, lambda v: v)


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
    if isinstance(value, Inference) and not 0 <= value.cost <= value.escrow:
        raise InvariantViolation(f"inference {key.hex()} costs {value.cost} of {value.escrow} escrow")


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
        self._tables: tuple[Table[Any, Any], ...] = (
            self.accounts, self.registry, self.inferences, self.seen, self.held, self.fees)
        self._lthash = np.zeros(_LANES, dtype="<u2")
        # Indexes derived from the tables (not hashed, rebuilt on load).
        self._expiring: dict[int, list[bytes]] = {}  # height -> inference ids to expire
        self._held_expiring: dict[int, list[tuple[bytes, str]]] = {}
        self._held_by_id: dict[bytes, set[str]] = {}
        self._held_per_executor: dict[str, int] = {}
        self._forget_heap: list[tuple[int, bytes]] = []  # (remember until ms, id)

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> LedgerState:
        state = cls(genesis)
        for p in genesis.participants:
            state.registry.put(p.peer_id, Participant(
                p.pubkey, p.weight, tuple(p.addrs), tuple(sorted(set(p.models))), 0, 0))
            state.accounts.put(p.peer_id, Account(0, 0))  # so that it can sign transactions
        for address, amount in genesis.allocations.items():
            state.accounts.put(address, Account(amount, 0))
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
        state.registry.put(signer, Participant(
            pubkey=signed.signer, weight=old.weight if old else 0, addrs=tuple(tx.addrs),
            models=tuple(sorted(set(tx.models))), completed=old.completed if old else 0,
            missed=old.missed if old else 0))
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
    """Charge the work (capped at escrow) to the executor's pending fees; refund the rest."""
    cost = inference_cost(prompt_tokens, completion_tokens, record.price, record.escrow)
    if record.escrow > cost:
        state.credit(record.client, record.escrow - cost)
    if cost:
        state.fees.put(record.executor, state.pending_fees(record.executor) + cost)
    state.inferences.put(iid, replace(
        record, status=InferenceStatus.SETTLED, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, response_hash=response_hash,
        artifact_commitment=artifact_commitment, cost=cost, closed_height=ctx.height))
    executor = state.registry.rows[record.executor]
    state.registry.put(record.executor, replace(executor, completed=executor.completed + 1))


_PROCESSORS: dict[type, Callable[..., str]] = {
    Transfer: process_transfer,
    RegisterParticipant: process_register_participant,
    StartInference: process_start_inference,
    FinishInference: process_finish_inference,
}


# --------------------------------------------------------------------------- end of block


def process_expiries(state: LedgerState, ctx: BlockContext) -> None:
    """Inferences still running at the end of their deadline height: full refund, a miss counted."""
    for iid in state._expiring.pop(ctx.height, ()):
        record = state.inferences.get(iid)
        if record is None or record.status is not InferenceStatus.STARTED:
            continue  # settled in time
        state.credit(record.client, record.escrow)
        state.inferences.put(iid, replace(record, status=InferenceStatus.EXPIRED,
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


def process_epoch_settlement(state: LedgerState, ctx: BlockContext) -> None:
    """The one place an epoch's economics close, at the end of its last block.

    Today: every executor's pending fees for the epoch are paid into its
    balance, and inference records that closed before this epoch began are
    pruned (each was kept for at least one full epoch after it closed, for
    the validators of the verification issue). The verification issue adds
    here, in this order: forfeit the fees of executors proven invalid and
    refund their clients, mint and split the epoch reward by weight and
    validated work (updating ``state.minted``), update reputations, rotate
    the validator set.
    """
    for executor, amount in sorted(state.fees.rows.items()):
        state.credit(executor, amount)
        state.fees.delete(executor)
    epoch_start = ctx.height - state.params.epoch_length_blocks
    stale = [iid for iid, r in state.inferences.rows.items()
             if r.status is not InferenceStatus.STARTED and r.closed_height <= epoch_start]
    for iid in stale:
        state.inferences.delete(iid)


def end_block(state: LedgerState, ctx: BlockContext) -> None:
    process_expiries(state, ctx)
    process_held_deadlines(state, ctx)
    process_replay_memory(state, ctx)
    if is_epoch_end(ctx.height, state.params):
        process_epoch_settlement(state, ctx)


# --------------------------------------------------------------------------- entry points


def apply_block(state: LedgerState, block: Block) -> tuple[LedgerState, list[Receipt]]:
    """Apply a committed block to ``state`` (mutated in place and returned) with one receipt per tx.

    Raises :class:`BlockMismatch` (nothing applied) if the block does not
    extend this state, and :class:`InvariantViolation` only on a bug.
    """
    check_block(state, block)
    ctx = BlockContext(height=block.height, time_ms=next_block_time(state.time_ms, block.time_ms))
    receipts = [_deliver(state, ctx, raw) for raw in block.txs]
    end_block(state, ctx)
    state.height, state.time_ms, state.last_block_hash = ctx.height, ctx.time_ms, block.hash
    state._commit(coins_created=0)  # minted rewards will be passed here by the reward schedule
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

