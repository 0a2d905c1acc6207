"""The mempool: transactions admitted but not yet committed, and how blocks are reaped from it.

Theory of operation
-------------------
Sans-I/O, like the state machine it serves: every method takes the
committed :class:`~gonka_p2p.ledger.state.LedgerState` it must judge against
and nothing else, so the replica actor owns all timing.

* **Admission** (:meth:`Mempool.add`): a transaction is kept only if its
  hash is new, no other pending transaction of its signer holds the same
  sequence, the pool has room (count and bytes), its sequence is at most
  ``max_ahead`` past the signer's account, and ``check_tx`` accepts it --
  every rule a block would apply, against committed state. Refusals raise
  :class:`TxRefused` with a stable code: a :class:`Reason` value from
  ``check_tx``, or one of the pool's own (``duplicate``, ``sequence_taken``,
  ``mempool_full``, ``too_far_ahead``).
* **Reaping** (:meth:`Mempool.reap`): a block may only carry a signer's
  transactions in sequence order starting at its account's next sequence,
  so each signer's pending transactions are taken as the contiguous run
  from there; runs are interleaved by arrival (a k-way merge on arrival
  order), so one busy signer cannot starve the others and a signer's
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
and byte totals match the contents and never exceed the limits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from gonka_p2p.identity import digest
from gonka_p2p.ledger.records import Account
from gonka_p2p.ledger.state import LedgerState, check_tx
from gonka_p2p.ledger.transactions import ACCOUNT_ONLY_KINDS


class TxRefused(Exception):
    """The mempool would not take a transaction; ``code`` is stable, ``detail`` for people."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class MempoolParams:
    max_txs: int = 50_000  # pending transactions
    max_bytes: int = 64 * 1024 * 1024  # their total size
    max_ahead: int = 1_000  # how far past its account's sequence a signer may queue


@dataclass(frozen=True)
class PendingTx:
    raw: bytes
    tx_hash: bytes
    signer: str
    sequence: int
    kind: str
    arrival: int  # admission order, for fair interleaving when reaping


class Mempool:
    def __init__(self, params: MempoolParams = MempoolParams()) -> None:
        self.params = params
        self._by_hash: dict[bytes, PendingTx] = {}
        self._by_signer: dict[str, dict[int, PendingTx]] = {}  # signer -> sequence -> tx
        self._checked_against: dict[str, Account | None] = {}  # signer -> the record its txs passed on
        self._bytes = 0
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
        next_sequence = account.sequence if account is not None else 0
        if receipt.sequence > next_sequence + self.params.max_ahead:
            raise TxRefused("too_far_ahead", f"sequence {receipt.sequence}; the account is at {next_sequence}")
        queued = self._by_signer.setdefault(receipt.signer, {})
        if receipt.sequence in queued:
            raise TxRefused("sequence_taken", f"another pending transaction of {receipt.signer} "
                                              f"has sequence {receipt.sequence}")
        tx = PendingTx(bytes(raw), tx_hash, receipt.signer, receipt.sequence, receipt.kind, next(self._arrivals))
        if not queued:
            self._checked_against[tx.signer] = account
        elif self._checked_against.get(tx.signer) is not account:
            self._checked_against[tx.signer] = None  # checked against different records: check all again
        queued[tx.sequence] = tx
        self._by_hash[tx_hash] = tx
        self._bytes += len(tx.raw)
        return tx

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
        heads = [(run[0].arrival, signer, 0) for signer, run in runs.items()]
        heapq.heapify(heads)
        block: list[bytes] = []
        size = 0
        while heads and len(block) < max_txs:
            _, signer, i = heapq.heappop(heads)
            tx = runs[signer][i]
            if size + len(tx.raw) > max_bytes:
                continue  # this signer's run stops here (its later sequences would not apply)
            block.append(tx.raw)
            size += len(tx.raw)
            if i + 1 < len(runs[signer]):
                heapq.heappush(heads, (runs[signer][i + 1].arrival, signer, i + 1))
        return block

    def update(self, state: LedgerState, committed: Iterable[bytes]) -> list[tuple[bytes, TxRefused]]:
        """After a block: drop its transactions (raw bytes), re-check the rest; return what was dropped and why."""
        for raw in committed:
            self._remove(digest(raw))
        dropped = []
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
