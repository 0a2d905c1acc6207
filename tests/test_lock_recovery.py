"""A height survives every replica restarting in it, even with locks on a block nobody kept.

The attack (issue 14's review): replicas persist their lock (round and block
hash) across a restart, but neither the locked block nor the prevotes that
justify it, nor the votes they signed. Crash every replica of a 4-validator
network after two of them locked on block A in round 0 and before anyone
committed: afterwards the two locked replicas prevote nil on every other
block, nobody can re-propose A (its body is gone, and so is its
proof-of-lock), and nobody can even finish round 0 (every vote of it is gone
and nobody may sign it again). The height never commits.

The fix, as Tendermint's write-ahead log does: each ``PersistSafety`` carries
the replica's validValue with its proof-of-lock and its own recent votes; a
restarted replica re-gossips those votes and re-proposes its validValue at
its turn, which every locked replica accepts (its lock is never later than
the newest proof-of-lock). Driven twice here: the pure cores on a
deterministic virtual network, and the replica actors from their stores.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import FAST, running_replicas

from gonka_p2p.identity import Keypair, digest, verify_signature
from gonka_p2p.ledger.block import Block
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import (
    NEVER_SIGNED,
    Action,
    Broadcast,
    Commit,
    CommitCertificate,
    PersistSafety,
    Proposal,
    RequestCommit,
    RequestProposal,
    SafetyState,
    ScheduleTimeout,
    ValidateBlock,
    Validator,
    ValidatorSet,
    Vote,
)
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.store import LedgerStore

CHAIN = "gonka-lock-recovery"
KEYS = [Keypair.from_seed(f"lock-recovery-{i}".encode()) for i in range(4)]
GENESIS = Genesis(chain_id=CHAIN, params=Params(price_per_token={"m": 1}, epoch_length_blocks=1000),
                  participants=tuple(GenesisParticipant(k.public_key, 10, models=("m",)) for k in KEYS))
VALIDATORS = ValidatorSet(Validator(k.peer_id, k.public_key, 10) for k in KEYS)
PARAMS = FAST.consensus


class VirtualNet:
    """The four cores on virtual time: every broadcast reaches every other replica 1 ms later, unless
    the receiver is cut off by then or ``drop_rate`` drops it; a restart drops every timer and delivery
    of the old process. A replica that committed height 1 keeps it (its store has it) and serves it."""

    def __init__(self, first_block: bytes, rng: random.Random | None = None) -> None:
        self.first_block = first_block  # what the proposer of height 1, round 0 builds
        self.persisted: list[SafetyState] = [NEVER_SIGNED] * len(KEYS)
        self.incarnation = [0] * len(KEYS)
        self.cut_off: set[int] = set()  # replicas that receive nothing
        self.rng = rng or random.Random(0)
        self.drop_rate = 0.0
        self.certificate: tuple[bytes, CommitCertificate] | None = None  # height 1, once decided
        self.cores = [self._core(i) for i in range(len(KEYS))]
        self.decided: dict[int, bytes] = {}  # replica -> the block it committed at height 1
        self.now = 0
        self._queue: list[tuple[int, int, int, int, Callable[[], list[Action]]]] = []
        self._seq = 0

    def _core(self, i: int) -> ConsensusState:
        safety = self.persisted[i]
        return ConsensusState(chain_id=CHAIN, verify=verify_signature, address=KEYS[i].peer_id,
                              sign=KEYS[i].sign, clock_ms=lambda: 1_700_000_000_000 + self.now, params=PARAMS,
                              safety=None if safety is NEVER_SIGNED else safety)

    def start(self, i: int) -> None:
        self._execute(i, self.cores[i].start(1, VALIDATORS))

    def restart_all(self) -> None:
        """Every process dies at once, losing all it did not persist, and comes back from its safety state."""
        restarted = [i for i in range(len(KEYS)) if i not in self.decided]
        for i in restarted:
            self.incarnation[i] += 1
            self.cores[i] = self._core(i)
        self.cut_off.clear()
        for i in restarted:
            self.start(i)
            if self.certificate is not None:  # catch-up at start-up, as Replica.run does
                self._execute(i, self.cores[i].on_commit_certificate(*self.certificate))

    def run_until(self, until_ms: int, done: Callable[[], bool] = lambda: False) -> None:
        while self._queue and self._queue[0][0] <= until_ms and not done():
            at, _, i, incarnation, event = heapq.heappop(self._queue)
            self.now = at
            if incarnation == self.incarnation[i]:
                self._execute(i, event())

    def _later(self, delay_ms: int, i: int, event: Callable[[], list[Action]]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay_ms, self._seq, i, self.incarnation[i], event))

    def _execute(self, i: int, actions: list[Action]) -> None:
        core = self.cores[i]
        for action in actions:
            if isinstance(action, PersistSafety):
                assert self.persisted[i].allows(action.state.height, action.state.round, action.state.step), \
                    f"replica {i} signed {action.state} after {self.persisted[i]}"
                self.persisted[i] = action.state
            elif isinstance(action, Broadcast):
                for j in range(len(KEYS)):
                    if j != i:
                        self._later(1, j, self._delivery(j, action.message))
            elif isinstance(action, ScheduleTimeout):
                self._later(action.duration_ms, i, lambda c=core, t=action.timeout: c.on_timeout(t))
            elif isinstance(action, RequestProposal):
                block = self.first_block if action.round == 0 else f"fresh {action.round}".encode()
                self._execute(i, core.on_proposal_value(action.height, action.round, block))
            elif isinstance(action, ValidateBlock):
                self._execute(i, core.on_block_validated(action.block_hash, True))
            elif isinstance(action, Commit):
                self.decided[i] = action.block
                self.certificate = (action.block, action.certificate)
            elif isinstance(action, RequestCommit) and self.certificate is not None:
                self._later(1, i, lambda c=core, got=self.certificate: c.on_commit_certificate(*got))

    def _delivery(self, j: int, message: Proposal | Vote) -> Callable[[], list[Action]]:
        core = self.cores[j]

        def deliver() -> list[Action]:
            if j in self.cut_off or self.rng.random() < self.drop_rate:
                return []
            return core.on_proposal(message) if isinstance(message, Proposal) else core.on_vote(message)

        return deliver


def lock_two_then_crash_all(first_block: bytes) -> tuple[VirtualNet, list[int]]:
    """Round 0 of height 1: everyone prevotes A, only two replicas see the prevotes and lock on A, then
    every replica crashes before anything else happens. Returns the network and the locked replicas."""
    net = VirtualNet(first_block)
    proposer = KEYS.index(next(k for k in KEYS if k.peer_id == VALIDATORS.proposer(0)))
    unlocked = [proposer, (proposer + 1) % 4]
    for i in range(len(KEYS)):
        net.start(i)
    net.run_until(1)  # the proposal reaches everyone, everyone prevotes A
    net.cut_off.update(unlocked)  # the prevotes reach only the two others
    net.run_until(4)
    locked = [i for i in range(len(KEYS)) if i not in unlocked]
    assert [net.persisted[i].locked_hash for i in locked] == [digest(first_block)] * 2
    assert all(net.persisted[i].locked_hash is None for i in unlocked)
    assert not net.decided
    net.restart_all()
    return net, locked


def test_a_height_whose_locked_block_nobody_kept_still_commits_after_every_replica_restarts() -> None:
    block = b"block A"
    net, locked = lock_two_then_crash_all(block)
    net.run_until(120_000, done=lambda: len(net.decided) == len(KEYS))
    assert len(net.decided) == len(KEYS), f"height 1 never committed after the restart (decided: {net.decided})"
    assert set(net.decided.values()) == {block}  # the locks held: A, the locked block, is what commits
    for i in locked:
        assert net.persisted[i].locked_hash == digest(block)


def test_a_restarted_replica_re_gossips_its_votes_so_the_round_it_crashed_in_can_end() -> None:
    """Nobody locked: every replica prevoted and crashed. Without its own votes back, no replica could
    finish round 0 (its votes are lost and it may not sign them again)."""
    net = VirtualNet(b"block B")
    for i in range(len(KEYS)):
        net.start(i)
    net.run_until(1)
    net.cut_off.update(range(len(KEYS)))  # the prevotes reach nobody
    net.run_until(4)
    assert all(s.step == 1 and s.round == 0 for s in net.persisted)  # each signed its round-0 prevote
    net.restart_all()
    net.run_until(60_000, done=lambda: len(net.decided) == len(KEYS))
    assert len(net.decided) == len(KEYS), "round 0 never ended after every replica restarted"


@pytest.mark.parametrize("seed", range(24))
def test_every_replica_restarting_at_any_moment_of_a_lossy_height_still_commits_one_block(seed: int) -> None:
    """Most messages dropped, then every replica crashes at a random moment or when the first of
    them commits, once or twice; after the last restart the network is reliable and height 1 must
    commit, one block everywhere."""
    rng = random.Random(seed)
    net = VirtualNet(b"block A", rng)
    net.drop_rate = rng.uniform(0.3, 0.9)
    for i in range(len(KEYS)):
        net.start(i)
    for _ in range(rng.randint(1, 2)):
        net.run_until(net.now + rng.randint(1, 3000), done=lambda: bool(net.decided))
        net.restart_all()
    net.drop_rate = 0.0
    net.run_until(net.now + 120_000, done=lambda: len(net.decided) == len(KEYS))
    assert len(net.decided) == len(KEYS), f"seed {seed}: height 1 never committed after the restarts"
    assert len(set(net.decided.values())) == 1, f"seed {seed}: conflicting commits {net.decided}"


# --------------------------------------------------------------------------- the replica actors


async def test_replicas_restarted_from_their_stores_with_locks_on_a_lost_block_commit(tmp_path: Path) -> None:
    """The same crash, persisted through the real store; then the replica actors start from it."""
    genesis_state = LedgerState.from_genesis(GENESIS)
    proposer = VALIDATORS.proposer(0)
    block = Block(height=1, prev_hash=genesis_state.last_block_hash, proposer=proposer,
                  time_ms=int(time.time() * 1000), txs=[]).encode()
    net, locked = lock_two_then_crash_all(block)
    for i, safety in enumerate(net.persisted):
        store = await LedgerStore.open(tmp_path / f"replica{i}" / "ledger.sqlite", GENESIS)
        await store.save_safety(safety)
        await store.close()

    dirs = [tmp_path / f"replica{i}" for i in range(len(KEYS))]
    async with running_replicas(KEYS, GENESIS, dirs, FAST) as (replicas, tasks):
        for i in locked:
            assert replicas[i].core.safety.locked_hash == digest(block)  # the lock came back from disk
        await asyncio.gather(*(r.wait_for_height(1, timeout=30) for r in replicas))
        for task in tasks:
            assert not task.done(), task
        assert {r.state.last_block_hash for r in replicas} == {digest(block)}


async def test_the_store_keeps_the_valid_value_and_votes_with_the_safety_state(tmp_path: Path) -> None:
    net, locked = lock_two_then_crash_all(b"block C")
    safety = net.persisted[locked[0]]
    # locked when the third prevote came: those three prove it
    assert safety.valid_block == b"block C" and len(safety.proof_of_lock) == 3 and len(safety.votes) == 2
    path = tmp_path / "ledger.sqlite"
    store = await LedgerStore.open(path, GENESIS)
    try:
        await store.save_safety(safety)
        later = SafetyState(2, 0, safety.step)  # the next height: nothing valid yet, no votes
        await store.save_safety(later)
        assert await store.load_safety() == later  # height 1's validValue is not carried over
        await store.save_safety(safety)
    finally:
        await store.close()
    store = await LedgerStore.open(path, GENESIS)
    try:
        assert await store.load_safety() == safety
    finally:
        await store.close()
