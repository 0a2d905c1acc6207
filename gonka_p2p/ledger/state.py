"""The ledger state machine: committed blocks in, state and receipts out.

Theory of operation
-------------------
A :class:`LedgerState` is built from a :class:`~gonka_p2p.ledger.genesis.Genesis`
and then changes only through :func:`apply_block`, a deterministic function of
(genesis, blocks) -- no I/O, clocks, threads or randomness -- so replicas that
apply the same blocks hold the same :meth:`LedgerState.app_hash`. The only
clock is the block's ``time_ms`` (the proposer's, bounded by consensus, never
going backwards here), used solely to judge client request timestamps; the
only "randomness" is committed data: validators' seeds and block hashes.

``apply_block`` first checks that the block extends this state (height + 1,
``prev_hash``) and raises :class:`BlockMismatch` otherwise -- the caller
fed the wrong block, nothing was applied. Then, in order:

1. each transaction, in block order, is decoded and verified and either applied whole
   or rejected whole by its kind's rule (:mod:`~gonka_p2p.ledger.tx_rules`, which raises
   :class:`TxRejected` before touching anything); each yields a :class:`Receipt`, and a
   transaction never makes ``apply_block`` raise. An applied transaction of a paying kind
   burns its fee (``tx_fee``, ``transactions.Payer``): coins are conserved as genesis
   supply + minted - burned;
2. end of block (:mod:`~gonka_p2p.ledger.end_of_block`): expiries,
   deadlines, and at epoch boundaries settlement and the next validator set;
3. the block is committed: the app hash is updated and the invariants are
   checked on every record the block changed (:mod:`~gonka_p2p.ledger.tables`).

This module holds the state itself -- its tables, the indexes derived from them
(rebuilt on load, never hashed), its queries and its snapshot -- and the entry points.
A query returns records or fresh containers, never a live view of a table, so a
caller may hold its answer across an ``await``.

Memory stays bounded: a request id is remembered only while its timestamp can be
fresh; closed inferences (with their checks, votes and disputes), seed commitments and
epoch records go when the epoch after theirs settles, summaries after
``SUMMARY_EPOCHS_KEPT`` epochs; held Finishes are capped and dropped at their deadline;
running inferences are bounded by the clients' balances.

Using it: ``LedgerState.from_genesis(load_genesis(path))`` or ``.from_bytes(snapshot)``;
``check_block`` on consensus's ValidateBlock, ``apply_block`` on Commit (then persist
``to_bytes()``, compare ``app_hash()``); the mempool admits with ``check_tx``. Who
submits which transaction, and when: :mod:`~gonka_p2p.ledger.tx_rules`.
"""

from __future__ import annotations

import heapq
from typing import Any

import msgpack

from gonka_p2p.identity import digest
from gonka_p2p.ledger.block import Block, BlockContext, Receipt
from gonka_p2p.ledger.duties import DutyRing, Eligible, Entry, is_validation_duty
from gonka_p2p.ledger.end_of_block import end_block
from gonka_p2p.ledger.genesis import Genesis, GenesisError, Params, genesis_from_obj
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
    PocEntry,
    PocRound,
    SeedCommitment,
)
from gonka_p2p.ledger.rules import (
    DisputeOutcome,
    epoch_after,
    epoch_of,
    next_block_time,
    sequence_acceptable,
    validation_floor_ppm,
    validation_ppm,
)
from gonka_p2p.ledger.tables import InvariantViolation, LtHash, Table, check_record, fold_changes, new_table
from gonka_p2p.ledger.executor_draw import ExecutorTables, draw_table
from gonka_p2p.ledger.poc import capped_voting_power
from gonka_p2p.ledger.poc_rules import RULES
from gonka_p2p.ledger.transactions import PocCommit, Reason, Tx, TxRejected, decode_tx, reason_of, signer_fee
from gonka_p2p.ledger.tx_rules import peer_id_of
from gonka_p2p.wire.envelope import Signed
from gonka_p2p.wire.schema import WireError

SNAPSHOT_FORMAT = 5  # 5: the epoch test carries three runs (distance_test.py)
SUMMARY_EPOCHS_KEPT = 16  # epoch summaries kept for queries (the rest of an epoch goes sooner)
_APP_HASH_DOMAIN = b"gonka-p2p/app-hash/v1\x00"


class BlockMismatch(Exception):
    """The block does not extend this state (wrong height or previous hash). Nothing was applied."""


class SnapshotError(Exception):
    """Bytes given to :meth:`LedgerState.from_bytes` are not a consistent state snapshot."""


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
        self.burned = 0  # transaction fees
        self.accounts: Table[str, Account] = new_table("account")
        self.registry: Table[str, Participant] = new_table("participant")
        self.inferences: Table[bytes, Inference] = new_table("inference")
        self.seen: Table[bytes, int] = new_table("seen_request")  # id -> keep until (ms)
        self.held: Table[tuple[bytes, str], HeldFinish] = new_table("held_finish")
        self.fees: Table[str, int] = new_table("pending_fee")  # executor -> coin units
        self.epochs: Table[int, EpochInfo] = new_table("epoch")
        self.commitments: Table[tuple[int, str], SeedCommitment] = new_table("seed_commitment")
        self.checks: Table[tuple[bytes, str], Check] = new_table("validation")
        self.votes: Table[tuple[bytes, str], Check] = new_table("dispute_vote")
        self.disputes: Table[bytes, Dispute] = new_table("dispute")
        self.summaries: Table[int, EpochSummary] = new_table("epoch_summary")
        self.equivocations: Table[str, int] = new_table("equivocation")  # offender -> epoch punished
        self.poc_rounds: Table[tuple[int, int], PocRound] = new_table("poc_round")
        self.poc_entries: Table[tuple[int, int, str, str], PocEntry] = new_table("poc_entry")
        self.tables: tuple[Table[Any, Any], ...] = (  # in snapshot and hash order
            self.accounts, self.registry, self.inferences, self.seen, self.held, self.fees, self.epochs,
            self.commitments, self.checks, self.votes, self.disputes, self.summaries, self.equivocations,
            self.poc_rounds, self.poc_entries)
        self._lthash = LtHash()
        self._block_created = 0  # coins minted minus coins burned since the last commit
        # Indexes derived from the tables (not hashed, rebuilt on load).
        self._expiring: dict[int, set[bytes]] = {}  # height -> inference ids to expire
        self._held_expiring: dict[int, set[tuple[bytes, str]]] = {}
        self._held_by_id: dict[bytes, set[str]] = {}
        self._held_per_executor: dict[str, int] = {}
        self._forget_heap: list[tuple[int, bytes]] = []  # (remember until ms, id)
        self._closed: dict[int, set[bytes]] = {}  # epoch -> ids of inferences closed in it
        self._checkers: dict[bytes, set[str]] = {}  # inference id -> validators that checked it
        self._committed: dict[int, set[str]] = {}  # epoch -> validators with a seed commitment
        self._eligible: dict[int, Eligible] = {}  # epoch -> its eligible validators, once asked
        self._rings: dict[int, DutyRing] = {}  # epoch -> its settled inferences by duty point
        self._disputes_due: dict[int, set[bytes]] = {}  # deadline height -> open disputes
        self.executor_tables = ExecutorTables()  # the executor draw's, laid out (derived, not hashed)

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
                                      validators=tuple(state.weights().items()), draw_weights=draw_table(state)))
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
        return (self.accounts.get(address) or Account(0, 0)).balance

    def account(self, address: str) -> Account | None:
        return self.accounts.get(address)

    def participant(self, address: str) -> Participant | None:
        return self.registry.get(address)

    def participants(self) -> dict[str, Participant]:
        """Every participant by peer id, sorted: genesis ones and those registered since."""
        return dict(sorted(self.registry.rows.items()))

    def weights(self) -> dict[str, int]:
        """Peer id -> voting power (> 0 only): weight, capped per participant where weight is
        earned by proof of compute (``poc.capped_voting_power``)."""
        weights = {p: r.weight for p, r in sorted(self.registry.rows.items()) if r.weight > 0}
        if self.params.poc_enabled:
            return capped_voting_power(weights, self.params.voting_power_cap_ppm)
        return weights

    def pending_fees(self, executor: str) -> int:
        """Fees earned in the current epoch, paid at its end."""
        return self.fees.get(executor) or 0

    def inference(self, inference_id: bytes) -> Inference | None:
        """The inference's record; status FINISHED (with only the executor's claims) while a
        Finish is held for it; None if never seen, or pruned (one full epoch after it closed)."""
        record = self.inferences.get(inference_id)
        claimants = self._held_by_id.get(inference_id)
        if record is not None or not claimants:
            return record
        executor = min(claimants)
        return self.held.rows[(inference_id, executor)].as_inference(executor)

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
        return dict(self.eligible(epoch).weights)

    def eligible(self, epoch: int) -> Eligible:
        """:meth:`epoch_validators` and the sums of its duty thresholds, until a commitment."""
        if epoch not in self._eligible:
            committed = self._committed.get(epoch, ())
            self._eligible[epoch] = Eligible.of(
                {peer: w for peer, w in self.epochs.rows[epoch].validators if peer in committed})
        return self._eligible[epoch]

    def inference_epoch(self, record: Inference) -> int:
        """The epoch a closed inference belongs to: the one in which it closed."""
        return epoch_of(record.closed_height, self.params)

    def validation_candidates(self, inference_id: bytes) -> dict[str, int]:
        """Who may check a settled inference, by weight: its epoch's eligible validators but
        its executor and its TA. Their total weight is the W of its duty thresholds."""
        record = self.inferences.rows[inference_id]
        candidates = dict(self.eligible(self.inference_epoch(record)).weights)
        candidates.pop(record.executor, None)
        candidates.pop(record.ta, None)
        return candidates

    def is_validation_duty(self, inference_id: bytes, validator: str, seed: bytes) -> bool:
        """Must ``validator``, holding its secret ``seed`` for the inference's epoch, check it?
        (What a validator actor asks for every inference that settles.)"""
        record = self.inferences.get(inference_id)
        if record is None or record.status is not InferenceStatus.SETTLED or validator in (record.executor, record.ta):
            return False
        eligible = self.eligible(self.inference_epoch(record))
        weight = eligible.weights.get(validator)
        return weight is not None and is_validation_duty(
            seed, record.duty_point, record.validation_ppm, weight, eligible.others(record.executor, record.ta))

    def epoch_inferences(self, epoch: int) -> list[bytes]:
        """Ids of the inferences closed in ``epoch`` (settled or expired), in closing order."""
        ids = self._closed.get(epoch, ())
        return sorted(ids, key=lambda iid: (self.inferences.rows[iid].closed_height, iid))

    def validation_duties(self, epoch: int, validator: str, seed: bytes) -> list[bytes]:
        """Every inference of ``epoch`` (so far) that ``validator`` must check with ``seed``, in
        closing order (what a reveal recomputes): a range query on the epoch's duty ring."""
        eligible, ring = self.eligible(epoch), self._rings.get(epoch)
        if ring is None or validator not in eligible.weights:
            return []
        rows = self.inferences.rows
        return sorted(ring.duties(seed, validator, eligible), key=lambda iid: (rows[iid].closed_height, iid))

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
                                self.last_block_hash, self.minted, self.burned], use_bin_type=True)
        return digest(_APP_HASH_DOMAIN + header + self._lthash.to_bytes())

    def _commit(self, coins_created: int) -> None:
        """Fold every change since the last commit into the hash and check the invariants on it."""
        self.executor_tables.committed(self.registry.dirty, self.registry.rows)
        delta = fold_changes(self.tables, self._lthash)
        if delta != coins_created:
            raise InvariantViolation(
                f"coins changed by {delta} at height {self.height}, but {coins_created} were created")

    # ------------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        """Canonical snapshot: equal states give equal bytes (tables sorted by key)."""
        if any(t.dirty for t in self.tables):
            raise RuntimeError("snapshot of a state in the middle of a block")
        tables = [[t.tag, [[k, t.codec.encode(v)] for k, v in sorted(t.rows.items())]]
                  for t in self.tables]
        return msgpack.packb([SNAPSHOT_FORMAT, self.genesis.to_obj(), self.height, self.time_ms,
                              self.last_block_hash, self.minted, self.burned, tables], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> LedgerState:
        """Rebuild a state from :meth:`to_bytes`; recomputes the hash and checks the invariants."""
        try:
            fmt, genesis_obj, height, time_ms, last_hash, minted, burned, tables = msgpack.unpackb(
                data, raw=False, strict_map_key=False, use_list=True)
            if fmt != SNAPSHOT_FORMAT:
                raise SnapshotError(f"snapshot format {fmt!r}, expected {SNAPSHOT_FORMAT}")
            state = cls(genesis_from_obj(genesis_obj))
            state.height, state.time_ms, state.minted, state.burned = map(int, (height, time_ms, minted, burned))
            state.last_block_hash = bytes(last_hash)
            if [tag for tag, _ in tables] != [t.tag for t in state.tables]:
                raise SnapshotError("snapshot tables do not match this version")
            for table, (_tag, rows) in zip(state.tables, tables, strict=True):
                for key, value in rows:
                    table.put(tuple(key) if isinstance(key, list) else key, table.codec.decode(value))
            state._commit(coins_created=state.genesis.supply + state.minted - state.burned)
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
                self._expiring.setdefault(record.deadline, set()).add(iid)
            else:
                self._index_closed(iid, record)
        for iid, validator in self.checks.rows:
            self._checkers.setdefault(iid, set()).add(validator)
        for epoch, validator in self.commitments.rows:
            self._committed.setdefault(epoch, set()).add(validator)
        for iid, dispute in self.disputes.rows.items():
            if dispute.outcome is DisputeOutcome.OPEN:
                self._disputes_due.setdefault(dispute.deadline, set()).add(iid)
        for key, held in self.held.rows.items():
            self._index_held(key, held)
        self._forget_heap = [(until, iid) for iid, until in self.seen.rows.items()]
        heapq.heapify(self._forget_heap)

    def _index_held(self, key: tuple[bytes, str], held: HeldFinish) -> None:
        iid, executor = key
        self._held_expiring.setdefault(held.deadline, set()).add(key)
        self._held_by_id.setdefault(iid, set()).add(executor)
        self._held_per_executor[executor] = self._held_per_executor.get(executor, 0) + 1

    # ------------------------------------------------------------------ mutations used by the rules

    def credit(self, address: str, amount: int) -> None:
        account = self.accounts.get(address) or Account(0, 0)
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
            self._block_created += amount

    def burn(self, address: str, amount: int) -> None:
        """Destroy ``amount`` of ``address``'s coins (transaction fees; nothing else burns)."""
        self.debit(address, amount)
        self.burned += amount
        self._block_created -= amount

    def close_inference(self, inference_id: bytes, record: Inference) -> None:
        """Store a settled or expired record and index it under its epoch."""
        assert record.status in (InferenceStatus.SETTLED, InferenceStatus.EXPIRED)
        self.inferences.put(inference_id, record)
        self._index_closed(inference_id, record)

    def _index_closed(self, inference_id: bytes, record: Inference) -> None:
        epoch = self.inference_epoch(record)
        self._closed.setdefault(epoch, set()).add(inference_id)
        if record.status is InferenceStatus.SETTLED:
            self._rings.setdefault(epoch, DutyRing()).add(
                Entry(record.duty_point, inference_id, record.validation_ppm, record.executor, record.ta))

    def add_check(self, inference_id: bytes, validator: str, check: Check) -> None:
        self.checks.put((inference_id, validator), check)
        self._checkers.setdefault(inference_id, set()).add(validator)

    def add_commitment(self, epoch: int, validator: str, commitment: SeedCommitment) -> None:
        self.commitments.put((epoch, validator), commitment)
        self._committed.setdefault(epoch, set()).add(validator)
        self._eligible.pop(epoch, None)

    def open_dispute(self, inference_id: bytes, dispute: Dispute) -> None:
        self.disputes.put(inference_id, dispute)
        self._disputes_due.setdefault(dispute.deadline, set()).add(inference_id)

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
                    for member in dispute.members:
                        if (iid, member) in self.votes:
                            self.votes.delete((iid, member))
                    self.disputes.delete(iid)
        for key in sorted(k for k in self.commitments.rows if k[0] < epoch):
            self.commitments.delete(key)
        for index in (self._committed, self._eligible, self._rings):
            for old in [e for e in index if e < epoch]:
                del index[old]
        for old in sorted(e for e in self.epochs.rows if e < epoch):
            self.epochs.delete(old)
        for table in (self.poc_rounds, self.poc_entries):
            for key in sorted(k for k in table.rows if k[0] < epoch):
                table.delete(key)
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
        remaining = self._held_per_executor.pop(executor) - 1
        if remaining:
            self._held_per_executor[executor] = remaining
        return held

    def held_count(self, executor: str) -> int:
        return self._held_per_executor.get(executor, 0)

    def remember_request(self, inference_id: bytes, until_ms: int) -> None:
        self.seen.put(inference_id, until_ms)
        heapq.heappush(self._forget_heap, (until_ms, inference_id))

    def schedule_expiry(self, inference_id: bytes, height: int) -> None:
        self._expiring.setdefault(height, set()).add(inference_id)

    # ---------------------- what falls due (end of block), sorted: restored replicas take it in the same order

    def take_expiring(self, height: int) -> list[bytes]:
        """Remove and return the ids scheduled to expire at ``height`` (some settled since)."""
        return sorted(self._expiring.pop(height, ()))

    def take_held_due(self, height: int) -> list[tuple[bytes, str]]:
        """Remove and return the held Finishes due at ``height`` (some released or dropped since)."""
        return sorted(self._held_expiring.pop(height, ()))

    def take_requests_remembered_before(self, time_ms: int) -> list[tuple[int, bytes]]:
        """Remove and return (remember until, id) of every request memory that ends before
        ``time_ms``, earliest first; an entry is stale if ``seen`` holds another time for its id."""
        due = []
        while self._forget_heap and self._forget_heap[0][0] < time_ms:
            due.append(heapq.heappop(self._forget_heap))
        return due

    def take_disputes_due(self, height: int) -> list[bytes]:
        """Remove and return the disputes whose voting ends at ``height`` (some resolved since)."""
        return sorted(self._disputes_due.pop(height, ()))


def check_invariants(state: LedgerState) -> None:
    """Full pass over the state: conservation of coins and no negative amounts. O(state)."""
    for table in state.tables:
        for key, value in table.rows.items():
            check_record(table.tag, key, value, table.codec.coins(value))
    total, expected = state.total_coins(), state.genesis.supply + state.minted - state.burned
    if total != expected:
        raise InvariantViolation(f"state holds {total} coins, genesis supply + minted - burned is {expected}")


# --------------------------------------------------------------------------- entry points


def apply_block(state: LedgerState, block: Block) -> tuple[LedgerState, list[Receipt]]:
    """Apply a committed block to ``state`` (mutated in place and returned) with one receipt per tx.

    Raises :class:`BlockMismatch` (nothing applied) if the block does not
    extend this state, and :class:`InvariantViolation` only on a bug.
    """
    check_block(state, block)
    ctx = BlockContext(height=block.height, time_ms=next_block_time(state.time_ms, block.time_ms),
                       block_hash=block.hash)
    receipts = [_run(state, ctx, raw, apply=True) for raw in block.txs]
    end_block(state, ctx)
    state.height, state.time_ms, state.last_block_hash = ctx.height, ctx.time_ms, block.hash
    created, state._block_created = state._block_created, 0
    state._commit(coins_created=created)
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
    signer = peer_id_of(signed.signer)
    try:
        if tx.chain_id != state.chain_id:
            raise TxRejected(Reason.WRONG_CHAIN, f"signed for chain {tx.chain_id!r}")
        account = state.accounts.get(signer)
        if account is None and isinstance(tx, PocCommit):
            account = Account(0, 0)  # a newcomer joins by its first commitment (poc_rules)
        if account is None:
            raise TxRejected(Reason.UNKNOWN_ACCOUNT, f"{signer} has no account")
        if not sequence_acceptable(account.sequence, tx.sequence, mempool=ctx.mempool):
            raise TxRejected(Reason.BAD_SEQUENCE, f"sequence {tx.sequence}, expected {account.sequence}")
        fee = signer_fee(tx.KIND, state.params.tx_fee)
        if fee > account.balance:
            raise TxRejected(Reason.INSUFFICIENT_BALANCE, f"fee {fee}, balance {account.balance}")
        detail = RULES[type(tx)](state, ctx, signed, signer, apply)
    except TxRejected as r:
        return Receipt(tx_hash, r.reason, r.detail, tx.KIND, signer, tx.sequence)
    if apply:
        state.burn(signer, fee)
        state.bump_sequence(signer)
    return Receipt(tx_hash, Reason.OK, detail, tx.KIND, signer, tx.sequence)
