"""The committed chain of one replica: its SQLite store, the state and validator set, and who waits on them.

Every committed block, decided here or fetched by catch-up, takes the one
path :meth:`Chain.commit_block`: store (synced), then apply, then
acknowledge. Nothing is acknowledged (receipts, waiters, listeners) before
the block is on disk, so a crash at any point restarts from the last
snapshot plus the stored blocks (:meth:`Chain.open`). The mempool is updated
in the same synchronous stretch as ``apply_block``: no ``await`` separates
them, so the mempool always agrees with the state it was checked against.

Memory: receipts (``receipts_kept``) and app hashes (``APP_HASHES_KEPT``)
are bounded LRU tables; a waiter leaves its table when it is resolved or
when its caller stops waiting (a timeout), so a hash that never commits
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.commit_checks import verified
from gonka_p2p.ledger.consensus_types import CommitCertificate, Evidence, ValidatorSet, proposal_sign_bytes
from gonka_p2p.ledger.consensus_wire import ProposalWire, evidence_to_wire
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.mempool import Mempool, TxRefused
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.store import LedgerStore, Recovered
from gonka_p2p.ledger.validators import validator_set_after

from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.signatures import CheckedSignatures
from gonka_p2p.wire.unsigned import encode_frame

log = logging.getLogger(__name__)

APP_HASHES_KEPT = 10_000


@dataclass(frozen=True)
class Committed:
    height: int
    receipt: Receipt


class TxDropped(Exception):
    """A pending transaction left the mempool without being committed (``code`` says why)."""

    def __init__(self, tx_hash: bytes, refusal: TxRefused) -> None:
        super().__init__(f"transaction {tx_hash.hex()[:16]} dropped: {refusal}")
        self.code = refusal.code


class ReplicaStopped(Exception):
    """The replica stopped while somebody waited for it."""


@dataclass
class _Waiters:
    """Futures waiting for something identified by a key (a tx hash, a height)."""

    futures: dict[object, list[asyncio.Future[object]]] = field(default_factory=dict)

    def add(self, key: object) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(key, []).append(future)
        future.add_done_callback(lambda f: self._discard(key, f))
        return future

    def _discard(self, key: object, future: asyncio.Future[object]) -> None:
        """A waiter that gave up (timed out, cancelled) must not keep its key alive."""
        waiting = self.futures.get(key)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self.futures[key]

    def resolve(self, key: object, value: object = None, error: BaseException | None = None) -> None:
        for future in self.futures.pop(key, ()):
            if future.done():  # a waiter that timed out
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def fail_all(self, error: BaseException) -> None:
        for key in list(self.futures):
            self.resolve(key, error=error)


def _remember(table: OrderedDict, key: object, value: object, limit: int) -> None:  # type: ignore[type-arg]
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


class Chain:
    """The committed state, its store and validator set; ``await open()`` before anything else."""

    def __init__(self, genesis: Genesis, data_dir: Path, mempool: Mempool, params: ReplicaParams,
                 metrics: ReplicaMetrics) -> None:
        self._genesis = genesis
        self.chain_id = genesis.chain_id
        self._data_dir = data_dir
        self._mempool = mempool
        self._params = params
        self._metrics = metrics
        self._store: LedgerStore | None = None
        self._state: LedgerState | None = None
        self.validators: ValidatorSet  # of the next height to decide
        self.last_validators: ValidatorSet | None = None  # of the last committed height (None: genesis)
        self.last_certificate: CommitCertificate | None = None  # its commit: the next block's last_commit
        self.known_validators: frozenset[str] = frozenset()  # read by topic validators (any thread)
        self.signatures = CheckedSignatures()  # every check of a validator's signature, any thread
        self.evidence_count = 0
        self._app_hashes: OrderedDict[int, bytes] = OrderedDict()
        self._receipts: OrderedDict[bytes, Committed] = OrderedDict()
        self._tx_waiters = _Waiters()
        self._height_waiters = _Waiters()
        self._listeners: list[Callable[[LedgerState], None]] = []

    async def open(self) -> Recovered:
        """Restart from SQLite: the last snapshot plus the stored blocks (and the saved safety state)."""
        self._store = await LedgerStore.open(self._data_dir / "ledger.sqlite", self._genesis)
        recovered = await self._store.recover(self._genesis)
        self._state, self.validators = recovered.state, recovered.validators
        if self._state.height > 0:
            ((_, _, self.last_certificate),) = await self._store.blocks(self._state.height, 1)
            self.last_validators = await self._store.validators(self._state.height)
        self._app_hashes.update(recovered.app_hashes)
        self.known_validators = frozenset(v.address for v in self.validators.validators)
        self.evidence_count = len(await self._store.evidence())
        return recovered

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    @property
    def store(self) -> LedgerStore:
        assert self._store is not None, "open() first"
        return self._store

    @property
    def state(self) -> LedgerState:
        assert self._state is not None, "open() first"
        return self._state

    def app_hash_at(self, height: int) -> bytes | None:
        return self._app_hashes.get(height)

    def add_commit_listener(self, listener: Callable[[LedgerState], None]) -> None:
        self._listeners.append(listener)

    def signed_by_validator(self, address: str, message: bytes, signature: bytes) -> bool:
        """``signature`` is by ``address``, a validator of the next height to decide, over ``message``.

        For the shell's own checks of a gossiped message before it relays or acts on it
        (fetching a body, starting a height); the core checks every message again, which
        ``signatures`` makes a lookup. Safe from any thread (the set is replaced, not changed).
        """
        validator = self.validators.get(address)
        return validator is not None and verified(self.signatures.verify, validator, message, signature)

    def signed_proposal(self, p: ProposalWire) -> bool:
        """:meth:`signed_by_validator` for a gossiped proposal: its proposer's signature over it."""
        return self.signed_by_validator(p.proposer, self.proposal_sign_bytes(p), p.signature)

    def proposal_sign_bytes(self, p: ProposalWire) -> bytes:
        return proposal_sign_bytes(self.chain_id, p.height, p.round, p.pol_round, p.block_hash)

    def relay_due(self, address: str, message: bytes, signature: bytes, now: float, every: float) -> bool:
        """Whether to pass on this validator's message, already checked good (``signatures.due``)."""
        validator = self.validators.get(address)
        return validator is not None and self.signatures.due(validator.public_key, signature, message, now, every)

    async def wait_for_commit(self, tx_hash: bytes, timeout: float | None) -> Committed:
        known = self._receipts.get(tx_hash)
        if known is not None:
            return known
        return await asyncio.wait_for(self._tx_waiters.add(tx_hash), timeout)  # type: ignore[return-value]

    async def wait_for_height(self, height: int, timeout: float | None) -> None:
        if self.state.height >= height:
            return
        await asyncio.wait_for(self._height_waiters.add(height), timeout)

    def stop(self) -> None:
        """Nobody waits for a replica that stopped."""
        self._tx_waiters.fail_all(ReplicaStopped("the replica stopped"))
        self._height_waiters.fail_all(ReplicaStopped("the replica stopped"))

    async def commit_block(self, height: int, raw: bytes, block: Block, certificate: CommitCertificate) -> None:
        """Store, then apply, then acknowledge: the one path every committed block takes."""
        m = self._metrics
        started = time.perf_counter()
        await self.store.commit_block(height, raw, certificate, self.validators)
        m.store_block_s += time.perf_counter() - started
        started = time.thread_time()
        state, receipts = apply_block(self.state, block)  # in place: self.state is state
        self.last_validators, self.last_certificate = self.validators, certificate
        self.validators = validator_set_after(self.validators, state)
        m.apply_s += time.thread_time() - started
        started = time.thread_time()
        dropped = self._mempool.update(state, block.txs)
        m.mempool_s += time.thread_time() - started
        self.known_validators = frozenset(v.address for v in self.validators.validators)
        _remember(self._app_hashes, height, state.app_hash(), APP_HASHES_KEPT)
        for receipt in receipts:
            committed = Committed(height, receipt)
            _remember(self._receipts, receipt.tx_hash, committed, self._params.receipts_kept)
            self._tx_waiters.resolve(receipt.tx_hash, committed)
        for tx_hash, refusal in dropped:
            self._tx_waiters.resolve(tx_hash, error=TxDropped(tx_hash, refusal))
        self._height_waiters.resolve(height)
        for listener in self._listeners:
            listener(state)
        if height % self._params.snapshot_interval == 0:
            started = time.perf_counter()
            await self.store.save_snapshot(state)
            m.snapshot_s += time.perf_counter() - started

    async def record_evidence(self, evidence: Evidence) -> None:
        """Keep it in the store (the ledger learns of vote equivocation by a SubmitEvidence transaction)."""
        log.warning("validator %s equivocated at height %d", evidence.validator, evidence.height)
        await self.store.add_evidence(evidence.height, evidence.validator, encode_frame(evidence_to_wire(evidence)))
        self.evidence_count += 1
