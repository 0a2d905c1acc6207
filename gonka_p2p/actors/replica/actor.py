"""The ledger replica actor: the I/O shell around consensus, the state machine, the mempool and the store.

Theory of operation
-------------------
One replica per node. It holds the committed :class:`LedgerState`, a
:class:`Mempool`, a :class:`LedgerStore` and one :class:`ConsensusState`,
and does only what the sans-I/O cores cannot: talk, wait, write.

**One driver.** Every call into the consensus core is an *event* (a
zero-argument callable returning the core's actions) put on one queue; a
single driver task takes them in order and executes the actions exactly as
the core's "Driving it" contract says:

    PersistSafety   -> store.save_safety, synced, before anything later runs
    Broadcast       -> queued for the sender task (so after its PersistSafety)
    ScheduleTimeout -> loop.call_later(..., event on_timeout)
    RequestProposal -> reap the mempool into a block -> on_proposal_value
    ValidateBlock   -> decode, chaining, time, proposer, stateless tx checks -> on_block_validated
    Commit          -> store block + certificate (synced) -> apply -> mempool update -> next height
    RequestCommit   -> fetch (block, certificate)s over /gonka/ledger/sync/1 -> on_commit_certificate
    ReportEvidence  -> store it (there is no evidence transaction yet)

Network handlers never touch the core themselves: they decode, and post an
event (waiting for room when ``MAX_QUEUED_NETWORK_EVENTS`` are already
queued, which back-pressures gossip delivery). The mempool is touched
synchronously only, so it always agrees with the state it was checked
against: no ``await`` separates ``apply_block`` from ``Mempool.update``.

**Transactions.** :meth:`Replica.submit` admits a signed transaction to the
mempool (or raises :class:`TxRefused`) and returns at once; the tx joins a
:class:`TxBatch` on the tx topic: one batch at most every ``tx_flush_s``
(at once after a quiet spell), or as soon as ``tx_flush_count`` are
waiting. The tx topic's validator (run before
delivery and forwarding, possibly on the network thread) drops any batch
holding a transaction that fails its stateless checks (size, envelope,
signature, schema, chain id).

**Heights without spinning.** After a commit the next height starts only
when there is something to decide: transactions in the mempool (after
``commit_wait_s``), a message from a validator already at a later height,
a fetched certificate for it, or ``empty_block_interval_s`` since the last
commit (so inference deadlines and epochs still advance on an idle chain).
Until then the core sits in its COMMIT step, buffering next-height messages.

**Proposals** carry their block inline when it is at most
``inline_block_bytes``; otherwise as a compact block (header + transaction
hashes) that receivers rebuild from their mempools, which gossip has
already filled; a receiver missing a transaction fetches the body by hash
from the proposer (or any peer holding it) over ``/gonka/ledger/block/1``,
after checking the proposal's signature over that hash.

**Catch-up.** At start-up, after recovering from its store and once
validators holding more than 2/3 of the power are connected (a replica
that voted alone would only run its rounds ahead of everybody else's), the
replica asks its peers for the blocks after its height (``/gonka/ledger/sync/1``) and
applies each only after :func:`verify_commit` accepts its certificate
against the validator set of that height. While running, the core's
``RequestCommit`` fetches a batch the same way and feeds it through
``on_commit_certificate``.

**Crash safety.** Nothing is acknowledged (receipts, waiters, queries)
before the block is on disk; a crash at any point restarts from the last
snapshot plus the stored blocks. An :class:`InvariantViolation` from the
state machine is a bug: the driver dies and :meth:`Replica.run` raises.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from gonka_p2p.gossip.service import (
    MessageValidator,
    NetworkError,
    NetworkService,
    PublishError,
    SendFrame,
    StreamReset,
)
from gonka_p2p.identity import Keypair, digest, verify_signature
from gonka_p2p.ledger.consensus import ConsensusState, verify_commit
from gonka_p2p.ledger.consensus_types import (
    DEFAULT_PARAMS,
    Action,
    Broadcast,
    Commit,
    CommitCertificate,
    ConsensusParams,
    Evidence,
    InvalidCommit,
    PersistSafety,
    Proposal,
    ReportEvidence,
    RequestCommit,
    RequestProposal,
    ScheduleTimeout,
    Step,
    Timeout,
    TimeoutKind,
    ValidateBlock,
    ValidatorSet,
    Vote,
    proposal_sign_bytes,
)
from gonka_p2p.ledger.consensus_wire import (
    MAX_SYNC_COUNT,
    MAX_TXS_PER_BATCH,
    BlockBody,
    BlockRequest,
    CommitRecord,
    CompactBlock,
    ConsensusMessage,
    ProposalWire,
    SyncRequest,
    TxBatch,
    certificate_from_wire,
    certificate_to_wire,
    compact_block,
    evidence_to_wire,
    expand_block,
    proposal_from_wire,
    proposal_to_wire,
    vote_from_wire,
    vote_to_wire,
)
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.mempool import Mempool, MempoolParams, TxRefused
from gonka_p2p.ledger.query_answer import answer_frame
from gonka_p2p.ledger.state import Block, BlockMismatch, LedgerState, Receipt, apply_block, check_block, decode_block
from gonka_p2p.ledger.store import LedgerStore
from gonka_p2p.ledger.transactions import decode_tx
from gonka_p2p.ledger.validators import validator_set_after
from gonka_p2p.wire.protocols import BLOCK_PROTOCOL, CONSENSUS_TOPIC, QUERY_PROTOCOL, SYNC_PROTOCOL, TX_TOPIC
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

log = logging.getLogger(__name__)

MAX_QUEUED_NETWORK_EVENTS = 1024
MAX_GOSSIP_BYTES = 900_000  # under the gossip layer's ~1 MB limit, with room for framing
VOTES_PER_MESSAGE = 1024
APP_HASHES_KEPT = 10_000
TIMER_SLACK_S = 0.005  # asyncio may fire a timer a hair early; waits are compared with this slack
QUORUM_POLL_S = 0.2  # how often a starting replica checks whether enough validators are connected


@dataclass(frozen=True)
class ReplicaParams:
    """Every tunable of the replica shell, with units."""

    consensus: ConsensusParams = DEFAULT_PARAMS
    mempool: MempoolParams = MempoolParams()
    # At most one batch of own transactions is gossiped per tx_flush_s (a first one at once), unless
    # tx_flush_count wait. Measured (benchmarks/ledger_bench.py, 4 processes on 2 shared cores):
    # 0.05 s batches overload py-libp2p at 1,200 tx/s (every batch costs each peer ms of CPU, per
    # copy) and commits collapse; 0.2 s batches commit it all with lower latency at every rate tried.
    tx_flush_s: float = 0.2
    tx_flush_count: int = 512
    # Blocks this replica proposes are capped so that one height's work (fetching, validating,
    # storing, applying) stays well inside the propose timeout even when the machine is busy:
    # a height that times out makes the next block bigger still.
    max_block_txs: int = 2_000
    max_block_bytes: int = 1024 * 1024
    commit_wait_s: float = 0.0  # pause after a commit before the next height (lets blocks fill)
    empty_block_interval_s: float = 5.0  # an idle chain still commits a block this often
    max_clock_drift_ms: int = 30_000  # a proposed block's time may lead our clock by this much
    # Gossip relays every message through every mesh peer, so each replica receives a proposal
    # several times: blocks over inline_block_bytes travel as a CompactBlock (tx hashes) if that is
    # at most compact_block_bytes, and are fetched over a stream by whoever cannot rebuild them.
    inline_block_bytes: int = 64 * 1024
    compact_block_bytes: int = 256 * 1024
    snapshot_interval: int = 100  # blocks between state snapshots in the store
    sync_batch: int = 32  # blocks per catch-up request (<= MAX_SYNC_COUNT)
    request_timeout_s: float = 10.0  # catch-up requests
    body_timeout_s: float = 2.0  # fetching a proposal's body from one peer, before asking the next
    receipts_kept: int = 100_000  # receipts remembered for wait_for_commit after the fact

    def __post_init__(self) -> None:
        if not (1 <= self.sync_batch <= MAX_SYNC_COUNT and 1 <= self.tx_flush_count <= MAX_TXS_PER_BATCH):
            raise ValueError(f"sync_batch must be in 1..{MAX_SYNC_COUNT}, tx_flush_count in 1..{MAX_TXS_PER_BATCH}")
        if self.max_block_bytes > self.consensus.max_block_bytes:
            raise ValueError("max_block_bytes exceeds what consensus accepts (consensus.max_block_bytes)")


@dataclass
class ReplicaMetrics:
    """Where the replica's time went (seconds, summed) and what it did (counts), for benchmarks.

    Work is measured in CPU seconds of the thread doing it (``time.thread_time``),
    so a busy machine does not inflate it; waits (the disk, the network, a
    height) in wall seconds.
    """

    tx_checks_s: float = 0.0  # CPU: stateless checks of gossiped batches (decoding, signatures)
    batches_checked: int = 0  # transaction batches received (each copy gossip delivers)
    mempool_s: float = 0.0  # CPU: admission and re-checks
    build_s: float = 0.0  # CPU
    validate_s: float = 0.0  # CPU
    apply_s: float = 0.0  # CPU: apply_block and the next validator set
    store_block_s: float = 0.0  # wall: block + certificate written and synced
    store_safety_s: float = 0.0  # wall: safety state written and synced, before each signed message
    safety_writes: int = 0
    snapshot_s: float = 0.0  # wall
    publish_s: float = 0.0  # wall: waiting for gossip to take a publication
    consensus_published: int = 0  # gossip messages sent: consensus ...
    batches_published: int = 0  # ... and transaction batches
    proposals_rebuilt: int = 0  # compact proposals rebuilt from the mempool
    bodies_fetched: int = 0  # proposal bodies fetched over a stream
    heights: int = 0
    rounds: int = 0  # sum of the commit round of each height (0 = decided in its first round)
    height_s: float = 0.0  # summed wall time from a height's start to its commit
    # The same, phase by phase, over the heights where this replica signed both its votes (wall):
    phased_heights: int = 0
    to_prevote_s: float = 0.0  # height start -> own prevote signed (proposal built or received, validated)
    to_precommit_s: float = 0.0  # -> own precommit signed (> 2/3 prevotes heard)
    to_decision_s: float = 0.0  # -> decision (> 2/3 precommits heard)
    commit_s: float = 0.0  # decision -> block stored, applied, acknowledged (every height)
    catchup_blocks: int = 0


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


Event = Callable[[], list[Action]]


@dataclass
class _Waiters:
    """Futures waiting for something identified by a key (a tx hash, a height)."""

    futures: dict[object, list[asyncio.Future[object]]] = field(default_factory=dict)

    def add(self, key: object) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.futures.setdefault(key, []).append(future)
        return future

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


class Replica:
    """One ledger replica. ``await open()``, then ``await run()`` (until cancelled), then ``await close()``."""

    _validators: ValidatorSet  # of the height being decided (or to be started next)

    def __init__(self, service: NetworkService, key: Keypair, genesis: Genesis, data_dir: Path,
                 params: ReplicaParams = ReplicaParams(), clock: Callable[[], float] = time.time) -> None:
        self._service = service
        self._key = key
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.data_dir = Path(data_dir)
        self.params = params
        self._clock = clock
        self.metrics = ReplicaMetrics()
        self._mempool = Mempool(params.mempool)
        self._store: LedgerStore | None = None
        self._state: LedgerState | None = None
        self._core: ConsensusState | None = None
        self._running = False
        self._tasks: asyncio.TaskGroup | None = None
        self._events: asyncio.Queue[tuple[Event, bool]] = asyncio.Queue()
        self._network_slots = asyncio.Semaphore(MAX_QUEUED_NETWORK_EVENTS)
        self._timers: set[asyncio.TimerHandle] = set()
        self._outgoing: list[Proposal | Vote] = []
        self._outgoing_ready = asyncio.Event()
        self._consensus_idle = asyncio.Event()  # set while no consensus message waits to be published
        self._consensus_idle.set()
        self._publication = itertools.count(time.time_ns())  # see consensus_wire: "Uniqueness on gossip"
        self._tx_outbox: list[bytes] = []
        self._unannounced: set[bytes] = set()  # hashes of own transactions not gossiped yet
        self._tx_waiting = asyncio.Event()
        self._tx_full = asyncio.Event()
        self._bodies: dict[bytes, tuple[int, bytes]] = {}  # block hash -> (height, block) we can serve
        self._fetching: set[tuple[int, int, str, bytes]] = set()  # proposal bodies being fetched
        self._fetched: dict[int, tuple[bytes, CommitCertificate]] = {}  # decided heights from catch-up
        self._sync_task: asyncio.Task[None] | None = None
        self._next_start: int | None = None  # the height to start once there is reason to
        self._committed_at = 0.0  # loop time of the last commit
        self._started_at = 0.0  # loop time the current height started
        self._signed_at: dict[Step, float] = {}  # loop time of our first signature of each step here
        self._max_seen_height = 0  # highest height a validator's message named
        self._known_validators: frozenset[str] = frozenset()  # read by topic validators (any thread)
        self._receipts: OrderedDict[bytes, Committed] = OrderedDict()
        self._tx_waiters = _Waiters()
        self._height_waiters = _Waiters()
        self._app_hashes: OrderedDict[int, bytes] = OrderedDict()
        self._evidence_count = 0
        self._commit_listeners: list[Callable[[LedgerState], None]] = []

    # ---- reading -------------------------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        """The committed state (read-only to callers)."""
        assert self._state is not None, "open() first"
        return self._state

    @property
    def height(self) -> int:
        return self.state.height

    @property
    def peer_id(self) -> str:
        return self._key.peer_id

    @property
    def core(self) -> ConsensusState:
        assert self._core is not None, "open() first"
        return self._core

    @property
    def evidence_count(self) -> int:
        return self._evidence_count

    @property
    def mempool_size(self) -> int:
        return len(self._mempool)

    def app_hash_at(self, height: int) -> bytes | None:
        """The app hash after ``height`` (recent heights, and every height replayed since start-up)."""
        return self._app_hashes.get(height)

    def next_sequence(self, account: str) -> int:
        """The sequence ``account``'s next transaction must carry, counting its pending ones."""
        return self._mempool.next_sequence(self.state, account)

    def add_commit_listener(self, listener: Callable[[LedgerState], None]) -> None:
        """Called with the new state after every block is stored and applied."""
        self._commit_listeners.append(listener)

    # ---- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, recover the acknowledged state, and serve sync, block and query streams."""
        self._store = await LedgerStore.open(self.data_dir / "ledger.sqlite", self.genesis)
        recovered = await self._store.recover(self.genesis)
        self._state, self._validators = recovered.state, recovered.validators
        self._app_hashes.update(recovered.app_hashes)
        self._known_validators = frozenset(v.address for v in self._validators.validators)
        self._evidence_count = len(await self._store.evidence())
        self._core = ConsensusState(chain_id=self.chain_id, verify=verify_signature, address=self._key.peer_id,
                                    sign=self._key.sign, params=self.params.consensus, safety=recovered.safety)
        if recovered.replayed:
            log.info("replica %s recovered height %d (%d blocks replayed)", self.peer_id[-8:],
                     self._state.height, recovered.replayed)
        self._service.set_stream_handler(SYNC_PROTOCOL, self._serve_sync)
        self._service.set_stream_handler(BLOCK_PROTOCOL, self._serve_block)
        self._service.set_stream_handler(QUERY_PROTOCOL, self._serve_query)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def run(self) -> None:
        """Catch up with the peers, then take part in consensus until cancelled. Raises if a task crashes."""
        assert self._core is not None and not self._running, "open() once, run() once"
        loop = asyncio.get_running_loop()
        self._running = True
        try:
            await self._service.subscribe(CONSENSUS_TOPIC, self._on_consensus, self._consensus_validator())
            await self._service.subscribe(TX_TOPIC, self._on_txs, self._tx_validator())
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._send_consensus())
                tasks.create_task(self._flush_txs())
                await self._await_quorum()
                await self._catch_up()
                self._committed_at = loop.time()
                await self._execute(self._start_height(self.state.height + 1))
                tasks.create_task(self._drive())
        finally:
            self._running = False
            self._tasks = None
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            self._tx_waiters.fail_all(ReplicaStopped("the replica stopped"))
            self._height_waiters.fail_all(ReplicaStopped("the replica stopped"))

    # ---- transactions --------------------------------------------------------------------

    def submit(self, raw: bytes) -> bytes:
        """Admit a signed transaction to the mempool and gossip it soon; returns its hash.

        Never waits for the network or a block; raises :class:`TxRefused` with
        the mempool's or ``check_tx``'s code.
        """
        started = time.thread_time()
        tx = self._mempool.add(self.state, raw)
        self.metrics.mempool_s += time.thread_time() - started
        self._tx_outbox.append(tx.raw)
        self._unannounced.add(tx.tx_hash)
        self._tx_waiting.set()
        if len(self._tx_outbox) >= self.params.tx_flush_count:
            self._tx_full.set()
        self._maybe_start()
        return tx.tx_hash

    async def wait_for_commit(self, tx_hash: bytes, timeout: float | None = None) -> Committed:
        """The height and receipt of ``tx_hash`` once a block holding it is stored and applied.

        Raises :class:`TxDropped` if the mempool drops it first, TimeoutError
        after ``timeout`` seconds.
        """
        known = self._receipts.get(tx_hash)
        if known is not None:
            return known
        return await asyncio.wait_for(self._tx_waiters.add(tx_hash), timeout)  # type: ignore[return-value]

    async def wait_for_height(self, height: int, timeout: float | None = None) -> None:
        """Return once ``height`` is committed and applied here."""
        if self.state.height >= height:
            return
        await asyncio.wait_for(self._height_waiters.add(height), timeout)

    # ---- the driver ----------------------------------------------------------------------

    def _post(self, event: Event) -> None:
        if self._running:
            self._events.put_nowait((event, False))

    async def _post_network(self, event: Event) -> None:
        await self._network_slots.acquire()
        if not self._running:
            self._network_slots.release()
            return
        self._events.put_nowait((event, True))

    async def _drive(self) -> None:
        """Run events one at a time: the only place the core is called once the replica runs."""
        while True:
            event, from_network = await self._events.get()
            try:
                await self._execute(event())
            except Exception:
                log.critical("replica %s stops: its driver failed", self.peer_id[-8:], exc_info=True)
                raise
            finally:
                if from_network:
                    self._network_slots.release()

    async def _execute(self, actions: list[Action]) -> None:
        """Execute the core's actions in order (see the module docstring for each)."""
        for action in actions:
            if isinstance(action, PersistSafety):
                self._signed_at.setdefault(action.state.step, asyncio.get_running_loop().time())
                started = time.perf_counter()
                await self._store_().save_safety(action.state)
                self.metrics.store_safety_s += time.perf_counter() - started
                self.metrics.safety_writes += 1
            elif isinstance(action, Broadcast):
                self._outgoing.append(action.message)
                self._outgoing_ready.set()
            elif isinstance(action, ScheduleTimeout):
                self._call_later(action.duration_ms / 1000, self._post_timeout, action.timeout)
            elif isinstance(action, RequestProposal):
                if action.height not in self._fetched:  # decided already; its certificate is queued
                    block = self._build_block(action.height)
                    await self._execute(self.core.on_proposal_value(action.height, action.round, block))
            elif isinstance(action, ValidateBlock):
                valid = self._block_is_valid(action.height, action.block)
                await self._execute(self.core.on_block_validated(action.block_hash, valid))
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, RequestCommit):
                self._request_commit(action)
            elif isinstance(action, ReportEvidence):
                await self._record_evidence(action.evidence)

    def _call_later(self, delay: float, callback: Callable[..., None], *args: object) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._timers = {t for t in self._timers if t.when() > now}
        self._timers.add(loop.call_later(delay, callback, *args))

    def _post_timeout(self, timeout: Timeout) -> None:
        def fire() -> list[Action]:
            actions = self.core.on_timeout(timeout)
            if actions and timeout.kind is not TimeoutKind.REBROADCAST:
                log.debug("timeout %s fired at %d/%d", timeout.kind.value, timeout.height, timeout.round)
            return actions

        self._post(fire)

    # ---- heights -------------------------------------------------------------------------

    def _start_height(self, height: int) -> list[Action]:
        self._started_at = asyncio.get_running_loop().time()
        self._signed_at = {}
        log.debug("start height %d (mempool %d)", height, len(self._mempool))
        actions = self.core.start(height, self._validators)
        if height in self._fetched:
            self._post(self._offer_fetched)
        return actions

    def _await_next_height(self, height: int) -> None:
        """The height before ``height`` committed: start it once there is a reason (module docstring)."""
        self._next_start = height
        self._committed_at = asyncio.get_running_loop().time()
        self._call_later(self.params.commit_wait_s, self._maybe_start)
        self._call_later(self.params.empty_block_interval_s, self._maybe_start)
        self._maybe_start()

    def _maybe_start(self) -> None:
        height = self._next_start
        if height is None or not self._running:
            return
        waited = asyncio.get_running_loop().time() - self._committed_at + TIMER_SLACK_S
        if (height in self._fetched or self._max_seen_height >= height
                or (len(self._mempool) > 0 and waited >= self.params.commit_wait_s)
                or waited >= self.params.empty_block_interval_s):
            self._next_start = None
            self._post(lambda: self._start_height(height))

    def _build_block(self, height: int) -> bytes:
        started = time.thread_time()
        state = self.state
        txs = self._mempool.reap(state, self.params.max_block_txs, self.params.max_block_bytes - 4096)
        block = Block(height=height, prev_hash=state.last_block_hash, proposer=self.peer_id,
                      time_ms=max(int(self._clock() * 1000), state.time_ms + 1), txs=txs).encode()
        self._bodies[digest(block)] = (height, block)
        self.metrics.build_s += time.thread_time() - started
        return block

    def _block_is_valid(self, height: int, raw: bytes) -> bool:
        """Would an honest proposer have built this block on our state? (consensus's valid(v))"""
        started = time.thread_time()
        try:
            return self._check_block(height, raw)
        finally:
            self.metrics.validate_s += time.thread_time() - started

    def _check_block(self, height: int, raw: bytes) -> bool:
        state = self.state
        try:
            block = decode_block(raw)
            check_block(state, block)
        except (WireError, BlockMismatch) as e:
            log.info("block at height %d rejected: %s", height, e)
            return False
        if block.height != height or self._validators.get(block.proposer) is None:
            return False
        if not state.time_ms < block.time_ms <= int(self._clock() * 1000) + self.params.max_clock_drift_ms:
            log.info("block at height %d rejected: time %d outside (%d, now + drift]", height, block.time_ms,
                     state.time_ms)
            return False
        if len(set(block.txs)) != len(block.txs):
            return False
        for tx in block.txs:
            try:
                if decode_tx(tx, state.params.max_tx_bytes).message.chain_id != self.chain_id:
                    return False
            except WireError:
                return False
        return True

    async def _commit(self, commit: Commit) -> None:
        """Consensus decided ``commit.height``: make it durable, apply it, and wait for the next height."""
        block = decode_block(commit.block)  # >2/3 validated it: a failure here is a bug, and fatal
        loop = asyncio.get_running_loop()
        decided = loop.time()
        await self._commit_block(commit.height, commit.block, block, commit.certificate)
        log.debug("committed height %d round %d: %d txs", commit.height, commit.certificate.round, len(block.txs))
        m = self.metrics
        m.heights += 1
        m.rounds += commit.certificate.round
        m.height_s += loop.time() - self._started_at
        m.commit_s += loop.time() - decided
        prevote, precommit = self._signed_at.get(Step.PREVOTE), self._signed_at.get(Step.PRECOMMIT)
        if prevote is not None and precommit is not None:
            m.phased_heights += 1
            m.to_prevote_s += prevote - self._started_at
            m.to_precommit_s += precommit - prevote
            m.to_decision_s += decided - precommit
        self._await_next_height(commit.height + 1)

    async def _commit_block(self, height: int, raw: bytes, block: Block, certificate: CommitCertificate) -> None:
        """Store, then apply, then acknowledge: the one path every committed block takes."""
        started = time.perf_counter()
        await self._store_().commit_block(height, raw, certificate, self._validators)
        self.metrics.store_block_s += time.perf_counter() - started
        started = time.thread_time()
        state, receipts = apply_block(self.state, block)
        self._validators = validator_set_after(self._validators, state)
        self.metrics.apply_s += time.thread_time() - started
        started = time.thread_time()
        dropped = self._mempool.update(state, block.txs)
        self.metrics.mempool_s += time.thread_time() - started
        self._known_validators = frozenset(v.address for v in self._validators.validators)
        self._remember(self._app_hashes, height, state.app_hash(), APP_HASHES_KEPT)
        for receipt in receipts:
            committed = Committed(height, receipt)
            self._remember(self._receipts, receipt.tx_hash, committed, self.params.receipts_kept)
            self._tx_waiters.resolve(receipt.tx_hash, committed)
        for tx_hash, refusal in dropped:
            self._tx_waiters.resolve(tx_hash, error=TxDropped(tx_hash, refusal))
        self._height_waiters.resolve(height)
        self._forget_below(height + 1)
        for listener in self._commit_listeners:
            listener(state)
        if height % self.params.snapshot_interval == 0:
            started = time.perf_counter()
            await self._store_().save_snapshot(state)
            self.metrics.snapshot_s += time.perf_counter() - started

    @staticmethod
    def _remember(table: OrderedDict, key: object, value: object, limit: int) -> None:  # type: ignore[type-arg]
        table[key] = value
        while len(table) > limit:
            table.popitem(last=False)

    def _forget_below(self, height: int) -> None:
        """Drop per-height caches of decided heights."""
        self._bodies = {h: b for h, b in self._bodies.items() if b[0] >= height}
        self._fetching = {k for k in self._fetching if k[0] >= height}
        self._fetched = {h: r for h, r in self._fetched.items() if h >= height}

    async def _record_evidence(self, evidence: Evidence) -> None:
        log.warning("validator %s equivocated at height %d", evidence.validator, evidence.height)
        await self._store_().add_evidence(evidence.height, evidence.validator,
                                          encode_frame(evidence_to_wire(evidence)))
        self._evidence_count += 1

    def _store_(self) -> LedgerStore:
        assert self._store is not None, "open() first"
        return self._store

    # ---- catch-up ------------------------------------------------------------------------

    async def _await_quorum(self) -> None:
        """Wait until validators holding > 2/3 of the power (ourselves included) are connected.

        Alone, or with too few of the validators, a replica could only time
        out round after round; its rounds would run ahead of the others',
        and since no f+1 of the power is ever in a later round than its own,
        it would not rejoin them until their (shorter) timeouts caught up.
        Starting together avoids that, and gives catch-up peers to ask.
        """
        announced = False
        while True:
            connected = {*self._service.connected_peers(), self.peer_id}
            if self._validators.is_quorum(sum(v.power for v in self._validators.validators
                                              if v.address in connected)):
                return
            if not announced:
                log.info("replica %s waits for validators holding > 2/3 of the power to connect",
                         self.peer_id[-8:])
                announced = True
            await asyncio.sleep(QUORUM_POLL_S)

    async def _catch_up(self) -> None:
        """Before voting: fetch, verify and apply every block the peers have beyond ours."""
        while records := await self._fetch_records(self.state.height + 1, None):
            for height, raw, certificate in records:
                try:
                    verify_commit(self._validators, height, digest(raw), certificate, verify_signature,
                                  chain_id=self.chain_id)
                    block = decode_block(raw)
                except (InvalidCommit, WireError) as e:
                    log.warning("catch-up stopped at height %d: a peer sent a bad record (%s)", height, e)
                    return
                await self._commit_block(height, raw, block, certificate)
                self.metrics.catchup_blocks += 1

    def _request_commit(self, request: RequestCommit) -> None:
        if request.height in self._fetched:
            self._post(self._offer_fetched)
        elif self._tasks is not None and (self._sync_task is None or self._sync_task.done()):
            self._sync_task = self._tasks.create_task(self._sync(request.height, request.peer))

    async def _sync(self, height: int, peer: str) -> None:
        """Fetch decided heights from ``height`` on for the core, batch after batch while we lag."""
        while records := await self._fetch_records(height, peer):
            for h, raw, certificate in records:
                self._fetched[h] = (raw, certificate)
            self._post(self._offer_fetched)
            last = records[-1][0]
            if len(records) < self.params.sync_batch:
                return
            try:
                await self.wait_for_height(last, self.params.request_timeout_s)
            except TimeoutError:
                return  # the records did not verify; the core will ask again
            height = last + 1

    def _offer_fetched(self) -> list[Action]:
        record = self._fetched.get(self.core.height)
        return self.core.on_commit_certificate(*record) if record is not None else []

    async def _fetch_records(self, height: int, preferred: str | None
                             ) -> list[tuple[int, bytes, CommitCertificate]]:
        """Consecutive (height, block, certificate) from ``height`` on, from the first peer that has any."""
        others = [p for p in self._service.connected_peers() if p not in (preferred, self.peer_id)]
        random.shuffle(others)
        request = encode_frame(SyncRequest(from_height=height, max_count=self.params.sync_batch))
        for peer in ([preferred] if preferred else []) + others:
            records: list[tuple[int, bytes, CommitCertificate]] = []
            try:
                frames = self._service.open_stream(peer, SYNC_PROTOCOL, request, self.params.request_timeout_s)
                async with aclosing(frames):  # type: ignore[type-var]
                    async for frame in frames:
                        record = decode_frame(frame, CommitRecord)
                        if record.height != height + len(records):
                            break
                        records.append((record.height, record.block, certificate_from_wire(record.certificate)))
            except (NetworkError, TimeoutError, WireError) as e:
                log.debug("sync from %s failed: %r", peer, e)
            if records:
                return records
        return []

    async def _serve_sync(self, opener: str, frame: bytes, send: SendFrame) -> None:
        request = decode_frame(frame, SyncRequest)
        count = min(request.max_count, self.params.sync_batch)
        for height, block, certificate in await self._store_().blocks(request.from_height, count):
            await send(encode_frame(CommitRecord(height=height, block=block,
                                                 certificate=certificate_to_wire(certificate))))

    # ---- consensus gossip ----------------------------------------------------------------

    def _consensus_validator(self) -> MessageValidator:
        """Shapes and membership only (the core checks signatures); safe on the network thread."""

        def validate(sender: str, data: bytes) -> bool:
            try:
                msg = decode_frame(data, ConsensusMessage)
            except WireError:
                return False
            known = self._known_validators
            return (all(p.proposer in known for p in msg.proposals)
                    and all(v.validator in known for v in msg.votes))

        return validate

    async def _on_consensus(self, sender: str, data: bytes) -> None:
        try:
            msg = decode_frame(data, ConsensusMessage)
            votes = [vote_from_wire(v) for v in msg.votes]
            inline = [proposal_from_wire(p, p.block) for p in msg.proposals if p.inline]
        except WireError:
            return
        for p in msg.proposals:
            self._note_height(p.height)
            if p.inline or p.height < self.core.height:
                continue
            held = self._bodies.get(p.block_hash)  # a rebroadcast, or a body we already rebuilt or fetched
            try:
                proposal = proposal_from_wire(p, held[1]) if held is not None else self._rebuild(p)
            except WireError:
                proposal = None
            if proposal is not None:
                inline.append(proposal)
            else:
                log.debug("proposal %d/%d from %s: fetching its block", p.height, p.round, p.proposer[-6:])
                self._fetch_body(p, sender)
        for v in votes:
            self._note_height(v.height)
        core = self.core
        await self._post_network(lambda: [a for p in inline for a in core.on_proposal(p)]
                                 + [a for v in votes for a in core.on_vote(v)])

    def _rebuild(self, p: ProposalWire) -> Proposal | None:
        """A compact proposal's block from the transactions our mempool holds, if it holds them all."""
        if not p.compact:
            return None
        try:
            raw = expand_block(CompactBlock.decode(p.compact), self._mempool.raw)
            proposal = proposal_from_wire(p, raw) if raw is not None else None
        except WireError:
            return None
        if proposal is not None:
            self._bodies[p.block_hash] = (p.height, proposal.block)  # others may fetch it from us
            self.metrics.proposals_rebuilt += 1
        return proposal

    def _note_height(self, height: int) -> None:
        if height > self._max_seen_height:
            self._max_seen_height = height
            self._maybe_start()

    async def _send_consensus(self) -> None:
        """Publish what the driver broadcast (already persisted), coalesced into few gossip messages.

        Consensus goes first: while it has something to publish, no transaction batch starts (both
        share the peers' outbound queues and the network thread), so an overloaded network queues
        transactions, not votes.
        """
        while True:
            if not self._outgoing:
                self._consensus_idle.set()
            await self._outgoing_ready.wait()
            self._consensus_idle.clear()
            self._outgoing_ready.clear()
            messages, self._outgoing = self._outgoing, []
            proposals = [m for m in messages if isinstance(m, Proposal)]
            votes = [vote_to_wire(m) for m in messages if isinstance(m, Vote)]
            frames = [self._proposal_frame(p) for p in proposals]
            frames += [encode_frame(ConsensusMessage(seq=next(self._publication), proposals=[],
                                                     votes=votes[i:i + VOTES_PER_MESSAGE]))
                       for i in range(0, len(votes), VOTES_PER_MESSAGE)]
            for frame in frames:
                await self._publish(CONSENSUS_TOPIC, frame)
                self.metrics.consensus_published += 1

    def _proposal_frame(self, p: Proposal) -> bytes:
        """Inline if small; else compact if that is small enough; the body stays here to be fetched."""
        inline = len(p.block) <= self.params.inline_block_bytes
        compact = b""
        if not inline:
            self._bodies[p.block_hash] = (p.height, p.block)
            block = decode_block(p.block)  # we validated or built it
            compact = compact_block(block, lambda h: h not in self._unannounced).encode()
            if len(compact) > self.params.compact_block_bytes:
                compact = b""
        return encode_frame(ConsensusMessage(seq=next(self._publication),
                                             proposals=[proposal_to_wire(p, inline, compact)], votes=[]))

    async def _publish(self, topic: str, frame: bytes) -> None:
        started = time.perf_counter()
        try:
            await self._service.publish(topic, frame)
        except PublishError as e:  # nobody to tell yet: rebroadcasts and proposals cover it
            log.debug("publish on %s failed: %s", topic, e)
        self.metrics.publish_s += time.perf_counter() - started

    def _fetch_body(self, p: ProposalWire, relay: str) -> None:
        """A proposal too large for gossip: check its signature, then fetch its block by hash."""
        key = (p.height, p.round, p.proposer, p.block_hash)
        if key in self._fetching or not self.core.height <= p.height <= self.core.height + 1:
            return
        validator = self._validators.get(p.proposer)
        message = proposal_sign_bytes(self.chain_id, p.height, p.round, p.pol_round, p.block_hash)
        if validator is None or not verify_signature(validator.public_key, p.signature, message):
            return
        if self._tasks is None:
            return
        self._fetching.add(key)
        others = [peer for peer in self._service.connected_peers() if peer not in (p.proposer, relay)]
        random.shuffle(others)  # every peer that validated the proposal holds the body too
        self._tasks.create_task(self._fetch_body_from(p, [p.proposer, relay, *others]))

    async def _fetch_body_from(self, p: ProposalWire, peers: list[str]) -> None:
        request = encode_frame(BlockRequest(block_hash=p.block_hash))
        for peer in dict.fromkeys(peers):
            try:
                body = decode_frame(await self._service.request(peer, BLOCK_PROTOCOL, request,
                                                                self.params.body_timeout_s), BlockBody)
                proposal = proposal_from_wire(p, body.block)
            except (NetworkError, TimeoutError, WireError) as e:
                log.debug("block %s from %s: %r", p.block_hash.hex()[:12], peer, e)
                continue
            self._bodies[p.block_hash] = (p.height, body.block)
            self.metrics.bodies_fetched += 1
            log.debug("proposal %d/%d: fetched its %d-byte block from %s", p.height, p.round, len(body.block),
                      peer[-6:])
            core = self.core
            await self._post_network(lambda: core.on_proposal(proposal))
            return
        # Nobody answered in time: the proposer re-broadcasts the proposal while its height is open,
        # and that copy may try again.
        self._fetching.discard((p.height, p.round, p.proposer, p.block_hash))

    async def _serve_block(self, opener: str, frame: bytes, send: SendFrame) -> None:
        """A proposal's body: of this height (held in memory) or, for a late peer, already committed."""
        request = decode_frame(frame, BlockRequest)
        held = self._bodies.get(request.block_hash)
        block = held[1] if held is not None else await self._store_().block_by_hash(request.block_hash)
        if block is None:
            raise StreamReset("no such block here")  # the opener tries elsewhere
        await send(encode_frame(BlockBody(block=block)))

    # ---- transaction gossip --------------------------------------------------------------

    def _tx_validator(self) -> MessageValidator:
        """Every transaction of a batch must pass its stateless checks; safe on the network thread."""
        max_tx_bytes = self.genesis.params.max_tx_bytes

        def validate(sender: str, data: bytes) -> bool:
            started = time.thread_time()
            try:
                batch = decode_frame(data, TxBatch)
                return all(decode_tx(raw, max_tx_bytes).message.chain_id == self.chain_id for raw in batch.txs)
            except WireError:
                return False
            finally:
                self.metrics.tx_checks_s += time.thread_time() - started
                self.metrics.batches_checked += 1

        return validate

    async def _on_txs(self, sender: str, data: bytes) -> None:
        try:
            batch = decode_frame(data, TxBatch)
        except WireError:
            return
        started = time.thread_time()
        for raw in batch.txs:
            try:
                self._mempool.add(self.state, raw)
            except TxRefused:
                pass  # known, already committed, or no longer valid: nothing to do
        self.metrics.mempool_s += time.thread_time() - started
        self._maybe_start()

    async def _flush_txs(self) -> None:
        """Gossip own transactions in batches, at most one every ``tx_flush_s`` unless a batch is full.

        Gossip costs per message (py-libp2p: milliseconds of CPU on every
        peer, for every copy), not per byte, so under load batches must be
        few and large; but a transaction arriving after a quiet spell goes
        out at once rather than waiting for company.
        """
        loop = asyncio.get_running_loop()
        last = -self.params.tx_flush_s
        while True:
            await self._tx_waiting.wait()
            wait = last + self.params.tx_flush_s - loop.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._tx_full.wait(), wait)
                except TimeoutError:
                    pass
            last = loop.time()
            txs, self._tx_outbox = self._tx_outbox, []
            self._tx_waiting.clear()
            self._tx_full.clear()
            batch: list[bytes] = []
            size = 0
            for raw in txs:  # a backlog goes out in batches of tx_flush_count: every peer checks a
                # whole batch on its network thread before relaying it, so batches must stay short
                if batch and (len(batch) >= self.params.tx_flush_count or size + len(raw) > MAX_GOSSIP_BYTES):
                    await self._publish_batch(batch)
                    batch, size = [], 0
                batch.append(raw)
                size += len(raw)
            if batch:
                await self._publish_batch(batch)

    async def _publish_batch(self, txs: list[bytes]) -> None:
        await self._consensus_idle.wait()
        await self._publish(TX_TOPIC, encode_frame(TxBatch(txs=txs)))
        self._unannounced.difference_update(digest(tx) for tx in txs)
        self.metrics.batches_published += 1

    # ---- queries -------------------------------------------------------------------------

    async def _serve_query(self, opener: str, frame: bytes, send: SendFrame) -> None:
        await send(answer_frame(self, frame))
