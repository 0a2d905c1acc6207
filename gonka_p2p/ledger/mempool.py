"""The mempool: transactions admitted but not yet committed, and how blocks are reaped from it.

Theory of operation
-------------------
Sans-I/O, like the state machine it serves: every method takes the
committed :class:`~gonka_p2p.ledger.state.LedgerState` it must judge against
and nothing else, so the replica actor owns all timing.

* **Admission** (:meth:`Mempool.add`): a transaction is kept only if its
  hash is new, no other pending transaction of its signer holds the same
  sequence, the pool has room (count and bytes), its sequence is at most
  ``max_ahead`` past the signer's account, ``check_tx`` accepts it --
  every rule a block would apply, against committed state -- and its class
  has room (below). Refusals raise :class:`TxRefused` with a stable code: a
  :class:`Reason` value from ``check_tx``, or one of the pool's own
  (``duplicate``, ``sequence_taken``, ``mempool_full``, ``too_far_ahead``,
  ``account_quota``).
* **Room by class** (the defence against crowding out): protocol-critical
  transactions (``transactions.DUTY_KINDS``: Finish, seeds, Validation,
  DisputeVote, evidence) are free on the ledger, so here they are bounded
  by a per-account quota (``max_duties_per_account``) and, all of them
  together, by the capacity left once ``reserved_ppm`` of it is kept for
  paying transactions; ``check_tx`` admits only duties the ledger would
  take (a Finish only from an executor a Start can still name, so a
  zero-weight Sybil's made-up Finishes are refused here too). Every other
  transaction pays a fee, and its signer may hold at most
  ``max_per_account`` of them pending (and ``max_bytes_per_account``), no
  more than its balance pays the fees of, and all of them together at most
  the capacity left once ``reserved_ppm`` of it (count and bytes) is kept
  for the protocol-critical ones. When that share is full, a newcomer evicts
  the newest paying transaction of the account holding the most, if that
  account holds more than the newcomer would (fair share: every account can
  always hold about share / accounts); evictions are reported by the next
  :meth:`Mempool.update` as ``evicted``. So a key that cannot pay holds
  nothing here, however many funded accounts spam an honest Finish or
  Validation still finds room, and however many free duties queue, an
  honest TA's Start or a client's transfer still finds its fair share.
* **Novelty** (:meth:`Mempool.novelty`), for the transaction topic's relay
  rule: what a peer's transaction would add to this pool -- ``NEW`` (the
  admission checks above pass, room aside: room is this node's, not a
  property of the transaction), ``HELD`` (pending here already),
  ``COMMITTED`` (its sequence was used by a committed block: a sender that
  raced the block, or replayed history) or ``REFUSED`` (``check_tx``, a
  sequence another pending transaction holds, or too far ahead). It reads
  the pool without changing it; its dictionary lookups are safe from the
  network thread while the loop changes the pool.
* **Reaping** (:meth:`Mempool.reap`): a block may only carry a signer's
  transactions in sequence order starting at its account's next sequence,
  so each signer's pending transactions are taken as the contiguous run
  from there; runs are interleaved round by round (every signer's first
  transaction, then every second one, ..., by arrival within a round),
  protocol-critical transactions first, so one busy signer cannot starve
  the others, no amount of paid traffic delays a duty, and a signer's
  in-flight transactions land in one block, in order.
* **Update** (:meth:`Mempool.update`, after every committed block): the
  block's transactions leave the pool, whatever their receipts said; every
  remaining one is re-checked against the new state and dropped if it no
  longer passes (its sequence was used, its request went stale, ...).
  One shortcut keeps a backlog cheap: a transfer's validity depends on its
  signer's account record alone (``TxKind.account_only`` in the registry of
  transaction kinds), so such transactions whose signer's record is the
  very object they were last checked against (records are immutable and
  replaced on change) are not checked again.

Invariants: at most one pending transaction per (signer, sequence); count
and byte totals (all, and per class and signer) match the contents and never
exceed the limits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from gonka_p2p.identity import digest
from gonka_p2p.ledger.records import Account
from gonka_p2p.ledger.rules import PPM
from gonka_p2p.ledger.state import LedgerState, check_tx
from gonka_p2p.ledger.transactions import ACCOUNT_ONLY_KINDS, DUTY_KINDS, Reason, signer_fee


class TxRefused(Exception):
    """The mempool would not take a transaction; ``code`` is stable, ``detail`` for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Novelty(Enum):
    """What a peer's transaction would add to this pool (:meth:`Mempool.novelty`)."""

    NEW = "new"
    HELD = "held"
    COMMITTED = "committed"
    REFUSED = "refused"


@dataclass(frozen=True)
class MempoolParams:
    max_txs: int = 50_000  # pending transactions
    max_bytes: int = 64 * 1024 * 1024  # their total size
    max_ahead: int = 1_000  # how far past its account's sequence a signer may queue
    reserved_ppm: int = 200_000  # of max_txs and of max_bytes, held for each class: duties, and paying ones
    max_per_account: int = 256  # pending paying transactions of one signer
    max_bytes_per_account: int = 4 * 1024 * 1024  # their total size
    max_duties_per_account: int = 4_096  # pending protocol-critical transactions of one signer

    @property
    def class_txs(self) -> int:
        """How many of the ``max_txs`` transactions of one class (paying, or protocol-critical)
        may hold: the rest is kept for the other class."""
        return self.max_txs - self.max_txs * self.reserved_ppm // PPM

    @property
    def class_bytes(self) -> int:
        """How many of the ``max_bytes`` transactions of one class may hold."""
        return self.max_bytes - self.max_bytes * self.reserved_ppm // PPM


@dataclass(frozen=True)
class PendingTx:
    raw: bytes
    tx_hash: bytes
    signer: str
    sequence: int
    kind: str
    arrival: int  # admission order, for fair interleaving when reaping

    @property
    def duty(self) -> bool:
        """Protocol-critical: free on the ledger, reserved room here, reaped first."""
        return self.kind in DUTY_KINDS


@dataclass
class _Usage:
    """Pending transactions of one class (of the pool, or of one signer): count and bytes."""

    count: int = 0
    size: int = 0

    def change(self, tx: PendingTx, sign: int) -> None:
        self.count += sign
        self.size += sign * len(tx.raw)


class Mempool:
    def __init__(self, params: MempoolParams = MempoolParams()) -> None:
        self.params = params
        self._by_hash: dict[bytes, PendingTx] = {}
        self._by_signer: dict[str, dict[int, PendingTx]] = {}  # signer -> sequence -> tx
        self._checked_against: dict[str, Account | None] = {}  # signer -> the record its txs passed on
        self._bytes = 0
        self._paying = _Usage()  # every pending transaction that is not protocol-critical
        self._duties = _Usage()  # every pending protocol-critical transaction
        self._usage: dict[tuple[str, bool], _Usage] = {}  # (signer, duty?) -> its pending ones
        self._heaviest: dict[int, set[str]] = {}  # n -> signers with n pending paying transactions
        self._evicted: list[tuple[bytes, TxRefused]] = []  # since the last update
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._by_hash)

    def __contains__(self, tx_hash: object) -> bool:
        return tx_hash in self._by_hash

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def raw(self, tx_hash: bytes) -> bytes | None:
        """A pending transaction's bytes by hash (to rebuild a compact proposal)."""
        tx = self._by_hash.get(tx_hash)
        return tx.raw if tx is not None else None

    def add(self, state: LedgerState, raw: bytes) -> PendingTx:
        """Admit ``raw`` or raise :class:`TxRefused` (see the module docstring for the order of checks)."""
        tx_hash = digest(raw)
        if tx_hash in self._by_hash:
            raise TxRefused("duplicate", "this transaction is already pending")
        if len(self._by_hash) >= self.params.max_txs or self._bytes + len(raw) > self.params.max_bytes:
            raise TxRefused("mempool_full", f"{len(self._by_hash)} transactions ({self._bytes} bytes) pending")
        receipt = check_tx(state, raw)
        if not receipt.ok:
            raise TxRefused(receipt.reason.value, receipt.detail)
        account = state.account(receipt.signer)
        refused = self._slot_refusal(account, receipt.signer, receipt.sequence)
        if refused is not None:
            raise refused
        queued = self._by_signer.get(receipt.signer, {})
        tx = PendingTx(bytes(raw), tx_hash, receipt.signer, receipt.sequence, receipt.kind, next(self._arrivals))
        self._check_room(state, tx)
        queued = self._by_signer.setdefault(tx.signer, queued)
        if not queued:
            self._checked_against[tx.signer] = account
        elif self._checked_against.get(tx.signer) is not account:
            self._checked_against[tx.signer] = None  # checked against different records: check all again
        queued[tx.sequence] = tx
        self._by_hash[tx_hash] = tx
        self._bytes += len(tx.raw)
        self._count(tx, +1)
        return tx

    def novelty(self, state: LedgerState, raw: bytes) -> tuple[Novelty, tuple[str, int] | None]:
        """What ``raw`` would add here (module docstring), and for a ``NEW`` one its (signer,
        sequence): a batch may hold one transaction per slot."""
        if digest(raw) in self._by_hash:
            return Novelty.HELD, None
        receipt = check_tx(state, raw)
        account = state.account(receipt.signer) if receipt.signer else None
        if not receipt.ok:
            used = receipt.reason is Reason.BAD_SEQUENCE and account is not None and receipt.sequence < account.sequence
            return (Novelty.COMMITTED if used else Novelty.REFUSED), None
        if self._slot_refusal(account, receipt.signer, receipt.sequence) is not None:
            return Novelty.REFUSED, None
        return Novelty.NEW, (receipt.signer, receipt.sequence)

    def _slot_refusal(self, account: Account | None, signer: str, sequence: int) -> TxRefused | None:
        """Why the pool cannot queue ``signer``'s transaction of ``sequence`` whatever its room:
        too far past the account's sequence, or another pending transaction holds it."""
        next_sequence = account.sequence if account is not None else 0
        if sequence > next_sequence + self.params.max_ahead:
            return TxRefused("too_far_ahead", f"sequence {sequence}; the account is at {next_sequence}")
        if sequence in self._by_signer.get(signer, {}):
            return TxRefused("sequence_taken", f"another pending transaction of {signer} has sequence {sequence}")
        return None

    def _check_room(self, state: LedgerState, tx: PendingTx) -> None:
        """Raise :class:`TxRefused` unless ``tx``'s class and its signer's quota have room for it."""
        mine = self._usage.get((tx.signer, tx.duty), _Usage())
        p = self.params
        if tx.duty:
            if mine.count >= p.max_duties_per_account:
                raise TxRefused("account_quota", f"{tx.signer} has {mine.count} protocol transactions pending")
            if self._duties.count >= p.class_txs or self._duties.size + len(tx.raw) > p.class_bytes:
                raise TxRefused("mempool_full", f"{self._duties.count} protocol transactions "
                                                f"({self._duties.size} bytes) pending; the rest is reserved")
            return
        if mine.count >= p.max_per_account or mine.size + len(tx.raw) > p.max_bytes_per_account:
            raise TxRefused("account_quota", f"{tx.signer} has {mine.count} transactions "
                                             f"({mine.size} bytes) pending")
        fees = (mine.count + 1) * signer_fee(tx.kind, state.params.tx_fee)
        if fees > state.balance(tx.signer):
            raise TxRefused("insufficient_balance", f"{tx.signer}'s balance {state.balance(tx.signer)} "
                                                    f"does not pay the fees of {mine.count + 1} pending transactions")
        while self._paying.count >= p.class_txs or self._paying.size + len(tx.raw) > p.class_bytes:
            if not self._evict_for(mine.count + 1):
                raise TxRefused("mempool_full", f"{self._paying.count} paying transactions "
                                                f"({self._paying.size} bytes) pending; the rest is reserved")

    def _evict_for(self, needs: int) -> bool:
        """Evict the newest paying transaction of the account holding the most, if it holds more
        than ``needs`` (what the newcomer's account would hold); whether one was evicted."""
        most = max(self._heaviest, default=0)
        if most <= needs:
            return False
        for signer in self._heaviest[most]:  # any of them: the pool is local, not consensus
            newest = self._by_signer[signer][max(self._by_signer[signer])]
            if not newest.duty:  # only a run's last transaction goes: the rest still line up
                self._remove(newest.tx_hash)  # changes the set iterated: return at once
                self._evicted.append((newest.tx_hash, TxRefused(
                    "evicted", f"{signer} held {most} paying transactions of a full pool")))
                return True
        return False

    def _count(self, tx: PendingTx, sign: int) -> None:
        key = (tx.signer, tx.duty)
        usage = self._usage.setdefault(key, _Usage())
        if tx.duty:
            self._duties.change(tx, sign)
        else:
            self._paying.change(tx, sign)
            self._rank(tx.signer, usage.count, usage.count + sign)
        usage.change(tx, sign)
        if not usage.count:
            del self._usage[key]

    def _rank(self, signer: str, before: int, after: int) -> None:
        if before:
            bucket = self._heaviest[before]
            bucket.discard(signer)
            if not bucket:
                del self._heaviest[before]
        if after:
            self._heaviest.setdefault(after, set()).add(signer)

    def next_sequence(self, state: LedgerState, account: str) -> int:
        """The sequence ``account``'s next transaction should carry: past its committed and pending ones."""
        record = state.account(account)
        sequence = record.sequence if record is not None else 0
        queued = self._by_signer.get(account, {})
        while sequence in queued:
            sequence += 1
        return sequence

    def reap(self, state: LedgerState, max_txs: int, max_bytes: int) -> list[bytes]:
        """Transactions for the next block, in an order in which every signer's sequences line up."""
        runs: dict[str, list[PendingTx]] = {}
        for signer, queued in self._by_signer.items():
            account = state.account(signer)
            sequence = account.sequence if account is not None else 0
            run = []
            while sequence in queued:
                run.append(queued[sequence])
                sequence += 1
            if run:
                runs[signer] = run
        heads = [(not run[0].duty, 0, run[0].arrival, signer) for signer, run in runs.items()]
        heapq.heapify(heads)
        block: list[bytes] = []
        size = 0
        while heads and len(block) < max_txs:
            _, i, _, signer = heapq.heappop(heads)
            tx = runs[signer][i]
            if size + len(tx.raw) > max_bytes:
                continue  # this signer's run stops here (its later sequences would not apply)
            block.append(tx.raw)
            size += len(tx.raw)
            if i + 1 < len(runs[signer]):
                after = runs[signer][i + 1]
                heapq.heappush(heads, (not after.duty, i + 1, after.arrival, signer))
        return block

    def update(self, state: LedgerState, committed: Iterable[bytes]) -> list[tuple[bytes, TxRefused]]:
        """After a block: drop its transactions (raw bytes), re-check the rest; return what was
        dropped (or evicted since the last update) and why."""
        for raw in committed:
            self._remove(digest(raw))
        dropped, self._evicted = self._evicted, []
        for signer, queued in list(self._by_signer.items()):
            account = state.account(signer)
            unchanged = self._checked_against.get(signer) is account
            for tx in list(queued.values()):
                if unchanged and tx.kind in ACCOUNT_ONLY_KINDS:
                    continue
                receipt = check_tx(state, tx.raw)
                if not receipt.ok:
                    self._remove(tx.tx_hash)
                    dropped.append((tx.tx_hash, TxRefused(receipt.reason.value, receipt.detail)))
            if signer in self._by_signer:
                self._checked_against[signer] = account
        return dropped

    def _remove(self, tx_hash: bytes) -> None:
        tx = self._by_hash.pop(tx_hash, None)
        if tx is None:
            return
        queued = self._by_signer[tx.signer]
        del queued[tx.sequence]
        if not queued:
            del self._by_signer[tx.signer]
            del self._checked_against[tx.signer]
        self._bytes -= len(tx.raw)
        self._count(tx, -1)
