"""The consensus driver: the one task that calls the consensus core, and the I/O that executes its actions.

**One driver.** Every call into the consensus core is an *event* (a
zero-argument callable returning the core's actions) put on one queue; a
single driver task takes them in order and executes the actions exactly as
the core's "Driving it" contract says (``ledger/consensus.py``):

    PersistSafety   -> store.save_safety, synced, before anything later runs
    Broadcast       -> queued for the consensus sender task (so after its PersistSafety)
    ScheduleTimeout -> loop.call_later(..., event on_timeout)
    RequestProposal -> reap the mempool into a block (proposals.py) -> on_proposal_value
    ValidateBlock   -> decode, chaining, time, proposer, stateless tx checks -> on_block_validated
    Commit          -> store block + certificate (synced) -> apply -> mempool update -> next height
    RequestCommit   -> fetch (block, certificate)s from peers (sync.py) -> on_commit_certificate
    ReportEvidence  -> store it; vote equivocation also goes to the ledger (``report_evidence``)

Network handlers never touch the core themselves: they decode, and post an
event (waiting for room when ``MAX_QUEUED_NETWORK_EVENTS`` are already
queued, which back-pressures gossip delivery). Timers only post events, so
whatever the core does runs in the driver task, and a failure there (an
:class:`InvariantViolation` is a bug) ends the replica's TaskGroup.

**Heights without spinning.** After a commit the next height starts only
when there is something to decide: transactions in the mempool (after
``commit_wait_s``), a message from a validator already at a later height,
a fetched certificate for it, or ``empty_block_interval_s`` since the last
commit (so inference deadlines and epochs still advance on an idle chain).
Until then the core sits in its COMMIT step, buffering next-height messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import (
    Action,
    Broadcast,
    Commit,
    Evidence,
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
    Vote,
)
from gonka_p2p.ledger.mempool import Mempool
from gonka_p2p.ledger.block import decode_block

from gonka_p2p.actors.replica.chain import Chain
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.proposals import ProposalBodies
from gonka_p2p.actors.replica.runtime import Runtime
from gonka_p2p.actors.replica.sync import Sync

log = logging.getLogger(__name__)

TIMER_SLACK_S = 0.005  # asyncio may fire a timer a hair early; waits are compared with this slack

class Driver:
    """Runs events one at a time and executes the core's actions (module docstring)."""

    def __init__(self, name: str, core: ConsensusState, runtime: Runtime, chain: Chain, mempool: Mempool,
                 proposals: ProposalBodies, sync: Sync, broadcast: Callable[[Proposal | Vote], None],
                 report_evidence: Callable[[Evidence], None], params: ReplicaParams,
                 metrics: ReplicaMetrics) -> None:
        self._name = name
        self._core = core
        self._runtime = runtime
        self._chain = chain
        self._mempool = mempool
        self._proposals = proposals
        self._sync = sync
        self._broadcast = broadcast
        self._report_evidence = report_evidence  # submits the evidence transaction
        self._params = params
        self._metrics = metrics
        self._timers: set[asyncio.TimerHandle] = set()  # pending only: fired ones are dropped at each new one
        self._next_start: int | None = None  # the height to start once there is reason to
        self._committed_at = 0.0  # loop time of the last commit
        self._started_at = 0.0  # loop time the current height started
        self._signed_at: dict[Step, float] = {}  # loop time of our first signature of each step here
        self._max_seen_height = 0  # highest height a validator's signed message named (capped: note_height)

    async def start(self) -> None:
        """Start the height after the committed one (catch-up is done)."""
        self._committed_at = asyncio.get_running_loop().time()
        await self.execute(self._start_height(self._chain.state.height + 1))

    async def drive(self) -> None:
        """Run events one at a time: the only place the core is called once the replica runs."""
        while True:
            event, from_network = await self._runtime.next_event()
            try:
                await self.execute(event())
            except Exception:
                log.critical("replica %s stops: its driver failed", self._name, exc_info=True)
                raise
            finally:
                self._runtime.event_done(from_network)

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    async def execute(self, actions: list[Action]) -> None:
        """Execute the core's actions in order (see the module docstring for each)."""
        for action in actions:
            if isinstance(action, PersistSafety):
                self._signed_at.setdefault(action.state.step, asyncio.get_running_loop().time())
                started = time.perf_counter()
                await self._chain.store.save_safety(action.state)
                self._metrics.store_safety_s += time.perf_counter() - started
                self._metrics.safety_writes += 1
            elif isinstance(action, Broadcast):
                self._broadcast(action.message)
            elif isinstance(action, ScheduleTimeout):
                self._call_later(action.duration_ms / 1000, self._post_timeout, action.timeout)
            elif isinstance(action, RequestProposal):
                if not self._sync.holds(action.height):  # decided already; its verified certificate is queued
                    block = self._proposals.build(action.height)
                    await self.execute(self._core.on_proposal_value(action.height, action.round, block))
            elif isinstance(action, ValidateBlock):
                valid = self._proposals.is_valid(action.height, action.block)
                await self.execute(self._core.on_block_validated(action.block_hash, valid))
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, RequestCommit):
                self._sync.request_commit(action)
            elif isinstance(action, ReportEvidence):
                await self._chain.record_evidence(action.evidence)
                self._report_evidence(action.evidence)

    def _call_later(self, delay: float, callback: Callable[..., None], *args: object) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._timers = {t for t in self._timers if t.when() > now}
        self._timers.add(loop.call_later(delay, callback, *args))

    def _post_timeout(self, timeout: Timeout) -> None:
        def fire() -> list[Action]:
            actions = self._core.on_timeout(timeout)
            if actions and timeout.kind is not TimeoutKind.REBROADCAST:
                log.debug("timeout %s fired at %d/%d", timeout.kind.value, timeout.height, timeout.round)
            return actions

        self._runtime.post(fire)

    # ---- heights -------------------------------------------------------------------------

    def note_height(self, height: int, signed: Callable[[], bool]) -> None:
        """A validator's message named ``height``: if we are behind it, that is reason to start.

        It counts for at most the height after the core's (all it can be a
        reason for is starting our next height), and only once ``signed``
        confirms its signature, which the core has not checked yet: else one
        forged vote naming a far height, relayed by every topic validator,
        would make every replica start each later height at once.
        """
        height = min(height, self._core.height + 1)
        if height > self._max_seen_height and signed():
            self._max_seen_height = height
            self.maybe_start()

    def maybe_start(self) -> None:
        """Start the awaited height if there is a reason to now (module docstring)."""
        height = self._next_start
        if height is None or not self._runtime.running:
            return
        waited = asyncio.get_running_loop().time() - self._committed_at + TIMER_SLACK_S
        if (self._sync.holds(height) or self._max_seen_height >= height
                or (len(self._mempool) > 0 and waited >= self._params.commit_wait_s)
                or waited >= self._params.empty_block_interval_s):
            self._next_start = None
            self._runtime.post(lambda: self._start_height(height))

    def _start_height(self, height: int) -> list[Action]:
        self._started_at = asyncio.get_running_loop().time()
        self._signed_at = {}
        log.debug("start height %d (mempool %d)", height, len(self._mempool))
        actions = self._core.start(height, self._chain.validators)
        if self._sync.holds(height):
            self._runtime.post(self._sync.offer)
        return actions

    def _await_next_height(self, height: int) -> None:
        """The height before ``height`` committed: start it once there is a reason (module docstring)."""
        self._next_start = height
        self._committed_at = asyncio.get_running_loop().time()
        self._call_later(self._params.commit_wait_s, self.maybe_start)
        self._call_later(self._params.empty_block_interval_s, self.maybe_start)
        self.maybe_start()

    async def _commit(self, commit: Commit) -> None:
        """Consensus decided ``commit.height``: make it durable, apply it, and wait for the next height."""
        block = decode_block(commit.block)  # >2/3 validated it: a failure here is a bug, and fatal
        loop = asyncio.get_running_loop()
        decided = loop.time()
        await self._chain.commit_block(commit.height, commit.block, block, commit.certificate)
        self._proposals.forget_below(commit.height + 1)
        self._sync.forget_below(commit.height + 1)
        log.debug("committed height %d round %d: %d txs", commit.height, commit.certificate.round, len(block.txs))
        m = self._metrics
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
