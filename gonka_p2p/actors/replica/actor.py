"""The ledger replica actor: what the node sees of its replica, and the owner of the replica's tasks.

One replica per node. :class:`Replica` holds the committed chain
(``chain.py``), a :class:`Mempool` and one :class:`ConsensusState`, wires
the collaborators of this package to them, and runs their tasks in one
TaskGroup under :meth:`Replica.run`: the consensus sender, the transaction
flusher, the driver, and the sync and body fetches they start. A task that
crashes ends ``run`` with its error (an :class:`InvariantViolation` from the
state machine is a bug: the driver dies and ``run`` raises); nothing is
only logged.

Life cycle: ``await open()`` (recover from the store, serve the sync, block
and query streams), ``await run()`` (wait for a quorum of validators, catch
up, then take part in consensus until cancelled), ``await close()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from gonka_p2p.actors.replica.chain import Chain, Committed
from gonka_p2p.actors.replica.consensus_gossip import ConsensusGossip
from gonka_p2p.actors.replica.driver import Driver
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.proposals import ProposalBodies
from gonka_p2p.actors.replica.runtime import Runtime
from gonka_p2p.actors.replica.sync import Sync
from gonka_p2p.actors.replica.tx_gossip import TxGossip
from gonka_p2p.gossip.service import NetworkService, PublishError, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import Evidence
from gonka_p2p.ledger.consensus_wire import evidence_transaction
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.mempool import Mempool, TxRefused
from gonka_p2p.ledger.query_answer import answer_frame
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.protocols import BLOCK_PROTOCOL, CONSENSUS_TOPIC, QUERY_PROTOCOL, SYNC_PROTOCOL, TX_TOPIC

log = logging.getLogger(__name__)


class Replica:
    """One ledger replica. ``await open()``, then ``await run()`` (until cancelled), then ``await close()``."""

    # The collaborators, made by open() around the recovered core:
    _txs: TxGossip
    _proposals: ProposalBodies
    _sync: Sync
    _consensus: ConsensusGossip
    _driver: Driver

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
        self._chain = Chain(genesis, self.data_dir, self._mempool, params, self.metrics)
        self._runtime = Runtime()
        self._core: ConsensusState | None = None
        self._lag_listeners: list[Callable[[int], None]] = []

    # ---- reading -------------------------------------------------------------------------

    @property
    def state(self) -> LedgerState:
        """The committed state (read-only to callers)."""
        return self._chain.state

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
        return self._chain.evidence_count

    @property
    def mempool_size(self) -> int:
        return len(self._mempool)

    def app_hash_at(self, height: int) -> bytes | None:
        """The app hash after ``height`` (recent heights, and every height replayed since start-up)."""
        return self._chain.app_hash_at(height)

    def next_sequence(self, account: str) -> int:
        """The sequence ``account``'s next transaction must carry, counting its pending ones."""
        return self._mempool.next_sequence(self.state, account)

    def add_commit_listener(self, listener: Callable[[LedgerState], None]) -> None:
        """Called with the new state after every block is stored and applied."""
        self._chain.add_commit_listener(listener)

    def add_lag_listener(self, listener: Callable[[int], None]) -> None:
        """Called with how many decided heights the replica fetched from peers at once, whenever
        that is ``LAGGING_HEIGHTS`` or more: it had fallen behind the chain (sync.py)."""
        self._lag_listeners.append(listener)

    def _lagged(self, heights: int) -> None:
        for listener in self._lag_listeners:
            listener(heights)

    # ---- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, recover the acknowledged state, and serve sync, block and query streams."""
        recovered = await self._chain.open()
        core = self._core = ConsensusState(chain_id=self.chain_id, verify=self._chain.signatures.admit,
                                           address=self._key.peer_id, sign=self._key.sign,
                                           clock_ms=lambda: int(self._clock() * 1000),
                                           params=self.params.consensus, safety=recovered.safety)
        if recovered.replayed:
            log.info("replica %s recovered height %d (%d blocks replayed)", self.peer_id[-8:],
                     self.state.height, recovered.replayed)
        chain, runtime, params, metrics = self._chain, self._runtime, self.params, self.metrics
        consensus_idle = asyncio.Event()
        # The driver is made last, around the others; until then nobody calls these two.
        self._txs = TxGossip(chain, self._mempool, lambda: self._driver.maybe_start(), self._publish,
                             consensus_idle, params, metrics)
        chain.add_commit_listener(self._txs.on_commit)
        self._proposals = ProposalBodies(self.peer_id, self._service, core, runtime, chain, self._mempool,
                                         self._txs.announced, self._clock, params, metrics)
        self._sync = Sync(self.peer_id, self._service, core, runtime, chain, params, metrics, self._lagged)
        self._consensus = ConsensusGossip(core, runtime, chain, self._proposals,
                                          lambda height, signed: self._driver.note_height(height, signed),
                                          self._publish, consensus_idle, metrics, self._clock)
        self._driver = Driver(self.peer_id[-8:], core, runtime, chain, self._mempool, self._proposals,
                              self._sync, self._consensus.broadcast, self._submit_evidence, params, metrics)
        self._service.set_stream_handler(SYNC_PROTOCOL, self._sync.serve)
        self._service.set_stream_handler(BLOCK_PROTOCOL, self._proposals.serve)
        self._service.set_stream_handler(QUERY_PROTOCOL, self._serve_query)

    async def close(self) -> None:
        await self._chain.close()

    async def run(self) -> None:
        """Catch up with the peers, then take part in consensus until cancelled. Raises if a task crashes."""
        assert self._core is not None and not self._runtime.running, "open() once, run() once"
        self._runtime.running = True
        try:
            await self._service.subscribe(CONSENSUS_TOPIC, self._consensus.on_message, self._consensus.validator())
            await self._service.subscribe(TX_TOPIC, self._txs.on_message, self._txs.validator())
            async with asyncio.TaskGroup() as tasks:
                self._runtime.own(tasks)
                tasks.create_task(self._consensus.send())
                tasks.create_task(self._txs.flush())
                await self._sync.await_quorum()
                await self._sync.catch_up()
                await self._driver.start()
                tasks.create_task(self._driver.drive())
        finally:
            self._runtime.running = False
            self._runtime.own(None)
            self._driver.stop()
            self._chain.stop()

    # ---- transactions --------------------------------------------------------------------

    def submit(self, raw: bytes) -> bytes:
        """Admit a signed transaction to the mempool and gossip it soon; returns its hash.

        Never waits for the network or a block; raises :class:`TxRefused` with
        the mempool's or ``check_tx``'s code.
        """
        return self._txs.submit(raw)

    def _submit_evidence(self, evidence: Evidence) -> None:
        """Vote equivocation seen here goes to the ledger, signed by this replica (any account may
        submit it; once one copy commits, the others are refused as already punished)."""
        tx = evidence_transaction(evidence, self.chain_id, self.next_sequence(self.peer_id))
        if tx is None:
            return
        try:
            self.submit(seal(tx, self._key))
        except TxRefused as e:
            log.info("evidence against %s not submitted: %s", evidence.validator, e)

    async def wait_for_commit(self, tx_hash: bytes, timeout: float | None = None) -> Committed:
        """The height and receipt of ``tx_hash`` once a block holding it is stored and applied.

        Raises :class:`TxDropped` if the mempool drops it first, TimeoutError
        after ``timeout`` seconds.
        """
        return await self._chain.wait_for_commit(tx_hash, timeout)

    async def wait_for_height(self, height: int, timeout: float | None = None) -> None:
        """Return once ``height`` is committed and applied here."""
        await self._chain.wait_for_height(height, timeout)

    # ---- network -------------------------------------------------------------------------

    async def _publish(self, topic: str, frame: bytes) -> None:
        started = time.perf_counter()
        try:
            await self._service.publish(topic, frame)
        except PublishError as e:  # nobody to tell yet: rebroadcasts and proposals cover it
            log.debug("publish on %s failed: %s", topic, e)
        self.metrics.publish_s += time.perf_counter() - started

    async def _serve_query(self, opener: str, frame: bytes, send: SendFrame) -> None:
        await send(answer_frame(self, frame))
