"""Ledger replicas on the in-memory network: they commit, agree, restart, catch up, and refuse bad input.

Every replica here is the real actor (consensus core, mempool, SQLite store,
gossip and streams) on a :class:`MemoryHub`, with consensus timeouts cut to
a few hundred milliseconds so that each test runs in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from helpers import FAST, eventually

from gonka_p2p.actors.replica import Replica, ReplicaParams
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.consensus_types import NEVER_SIGNED, VoteType, make_vote
from gonka_p2p.ledger.consensus_wire import (
    ConsensusMessage,
    vote_to_wire,
)
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.block import Block, decode_block
from gonka_p2p.ledger.store import LedgerStore
from gonka_p2p.ledger.transactions import Reason, Transfer
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.protocols import CONSENSUS_TOPIC
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

CHAIN = "gonka-replica-test"
VALIDATORS = [Keypair.from_seed(f"replica-{i}".encode()) for i in range(4)]
CLIENTS = [Keypair.from_seed(f"client-{i}".encode()) for i in range(4)]
OUTSIDER = Keypair.from_seed(b"outsider")
GENESIS = Genesis(
    chain_id=CHAIN, params=Params(price_per_token={"m": 1}, epoch_length_blocks=1000),
    participants=tuple(GenesisParticipant(k.public_key, 10, models=("m",)) for k in VALIDATORS),
    allocations={c.peer_id: 1_000_000 for c in CLIENTS})


class Cluster:
    """Replicas on one hub, every pair connected; each can be stopped and restarted from its directory."""

    def __init__(self, tmp_path: Path, params: ReplicaParams = FAST,
                 tamper: dict[int, Callable[[Replica], None]] | None = None):
        self.hub = MemoryHub()
        self.tmp_path = tmp_path
        self.params = params
        self.tamper = tamper or {}  # replica index -> what to change in it once it is open
        self.replicas: dict[int, Replica] = {}
        self.services: dict[int, MemoryService] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def key(self, i: int) -> Keypair:
        return VALIDATORS[i] if i < len(VALIDATORS) else OUTSIDER

    async def start(self, i: int, connect: bool = True) -> Replica:
        service = self.hub.service(self.key(i))
        await service.start()
        if connect:
            for other in self.services.values():
                await service.connect(other.listen_addrs[0])
        replica = Replica(service, self.key(i), GENESIS, self.tmp_path / f"replica{i}", self.params)
        await replica.open()
        if i in self.tamper:
            self.tamper[i](replica)
        self.services[i], self.replicas[i] = service, replica
        self.tasks[i] = asyncio.create_task(replica.run())
        return replica

    async def stop(self, i: int) -> None:
        task = self.tasks.pop(i)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.replicas.pop(i).close()
        await self.services.pop(i).stop()

    async def close(self) -> None:
        for i in list(self.tasks):
            await self.stop(i)

    def check_running(self) -> None:
        for i, task in self.tasks.items():
            if task.done():
                raise AssertionError(f"replica {i} stopped: {task.exception()!r}")

    async def wait_all(self, height: int, timeout: float = 15.0) -> None:
        await asyncio.gather(*(r.wait_for_height(height, timeout) for r in self.replicas.values()))
        self.check_running()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    await c.close()


def transfer(client: Keypair, sequence: int, amount: int = 1, to: Keypair = VALIDATORS[0]) -> bytes:
    return seal(Transfer(chain_id=CHAIN, to=to.peer_id, amount=amount, sequence=sequence), client)


def assert_same_state(replicas: list[Replica], height: int) -> bytes:
    hashes = {r.peer_id[-6:]: r.app_hash_at(height) for r in replicas}
    assert None not in hashes.values(), hashes
    assert len(set(hashes.values())) == 1, f"app hashes differ at height {height}: {hashes}"
    return next(iter(hashes.values()))  # type: ignore[return-value]


async def test_four_replicas_commit_submitted_transactions_and_agree(cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    hashes = []
    for round_ in range(3):  # each client submits a few txs in flight at once, through "its" replica
        for c, client in enumerate(CLIENTS):
            replica = replicas[c]
            for _ in range(5):
                raw = transfer(client, replica.next_sequence(client.peer_id), amount=1 + round_)
                hashes.append(replica.submit(raw))
        await asyncio.sleep(0.05)  # spreads the rounds over several blocks: the submission pattern under test
    committed = [await replicas[i % 4].wait_for_commit(h, timeout=15) for i, h in enumerate(hashes)]
    assert all(c.receipt.reason is Reason.OK for c in committed), [c.receipt for c in committed]
    top = max(c.height for c in committed)
    await cluster.wait_all(top)
    assert_same_state(replicas, top)
    fee = replicas[0].state.params.tx_fee
    for client in CLIENTS:  # 5 txs of 1, 2 and 3 coins each, and 15 fees
        assert all(r.state.balance(client.peer_id) == 1_000_000 - 30 - 15 * fee for r in replicas)
        assert all(r.state.account(client.peer_id).sequence == 15 for r in replicas)  # type: ignore[union-attr]
    assert all(r.evidence_count == 0 for r in replicas)


async def test_an_idle_chain_makes_empty_blocks_only_every_interval(cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    await cluster.wait_all(2)
    h0, t0 = replicas[0].height, asyncio.get_running_loop().time()
    await asyncio.sleep(1.5)  # the idle interval under test: its length bounds the blocks made in it
    blocks = replicas[0].height - h0
    elapsed = asyncio.get_running_loop().time() - t0
    assert 1 <= blocks <= elapsed / FAST.empty_block_interval_s + 1, (blocks, elapsed)


async def test_a_restarted_replica_recovers_from_its_store_and_catches_up(cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    client = CLIENTS[0]
    for _ in range(6):
        await replicas[0].wait_for_commit(replicas[0].submit(transfer(client, replicas[0].next_sequence(
            client.peer_id))), timeout=15)
    await cluster.wait_all(replicas[0].height)
    stopped_at = replicas[3].height
    safety_before = replicas[3].core.safety
    await cluster.stop(3)

    # The other three (30 of 40 power) keep committing.
    for _ in range(6):
        await replicas[0].wait_for_commit(replicas[0].submit(transfer(client, replicas[0].next_sequence(
            client.peer_id))), timeout=15)
    assert replicas[0].height >= stopped_at + 4

    restarted = await cluster.start(3)
    assert restarted.core.safety.height >= safety_before.height  # the safety state came back from disk
    target = replicas[0].height
    await restarted.wait_for_height(target, timeout=15)
    assert_same_state([replicas[0], replicas[1], restarted], target)
    # Heights up to the crash came from its own store (snapshot + replay), not from the peers.
    recovered = [h for h in range(1, stopped_at + 1) if restarted.app_hash_at(h) is not None]
    assert stopped_at in recovered and len(recovered) <= FAST.snapshot_interval
    assert all(restarted.app_hash_at(h) == replicas[0].app_hash_at(h) for h in recovered)
    # ... and it takes part again: the chain moves on with it.
    await cluster.wait_all(target + 2)
    # The heights it missed came from the peers, by catch-up before voting (read now: a height's waiters
    # wake before the catch-up loop counts it, and the others may commit more while it catches up).
    assert restarted.metrics.catchup_blocks >= target - stopped_at
    assert_same_state(list(cluster.replicas.values()), target + 2)
    assert all(r.evidence_count == 0 for r in cluster.replicas.values())


async def test_a_replica_cut_off_while_running_catches_up_through_request_commit(cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    await cluster.wait_all(2)
    cut_off = replicas[3]
    service = cluster.services[3]
    # Its consensus gossip is dropped on arrival (30 of 40 power commits without it) ...
    await service.subscribe(CONSENSUS_TOPIC, cut_off._consensus.on_message, lambda sender, data: False)
    stalled_at = cut_off.height
    # ... for more heights than one sync batch (4), so that several batches are needed.
    await asyncio.gather(*(r.wait_for_height(stalled_at + 10, 15) for r in replicas[:3]))
    assert cut_off.height <= stalled_at + 1
    await service.subscribe(CONSENSUS_TOPIC, cut_off._consensus.on_message, cut_off._consensus.validator())
    target = replicas[0].height + 2
    await cluster.wait_all(target)
    assert cut_off.metrics.catchup_blocks == 0  # not the start-up path ...
    assert cut_off.metrics.heights >= 10  # ... but the core's RequestCommit, height by height
    assert_same_state(list(cluster.replicas.values()), target)


async def test_a_replica_waits_for_a_quorum_of_validators_before_voting(cluster: Cluster) -> None:
    alone = await cluster.start(0)
    await asyncio.sleep(1.0)  # a window in which it must not start: an absence has no signal to wait for
    assert alone.core.height == -1 and alone.metrics.safety_writes == 0  # it has not started, nor signed
    for i in (1, 2):
        await cluster.start(i)
    await cluster.wait_all(2)  # 30 of 40 connected: they start together and commit


INVALID_KINDS = ("bad_prev_hash", "unsigned_tx", "future_time", "not_canonical")


def propose_invalid_blocks(replica: Replica) -> None:
    """Make ``replica`` propose a different kind of invalid block at each of its turns."""

    def build(height: int) -> bytes:
        kind = INVALID_KINDS[height % len(INVALID_KINDS)]
        state = replica.state
        block = Block(height=height, prev_hash=state.last_block_hash, proposer=replica.peer_id,
                      time_ms=state.time_ms + 1, txs=[])
        if kind == "bad_prev_hash":
            block = Block(height=height, prev_hash=b"\x01" * 32, proposer=replica.peer_id,
                          time_ms=state.time_ms + 1, txs=[])
        elif kind == "unsigned_tx":
            block = Block(height=height, prev_hash=state.last_block_hash, proposer=replica.peer_id,
                          time_ms=state.time_ms + 1, txs=[b"\x93garbage"])
        elif kind == "future_time":
            block = Block(height=height, prev_hash=state.last_block_hash, proposer=replica.peer_id,
                          time_ms=state.time_ms + 10**9, txs=[])
        raw = block.encode()
        return raw + b"\x00" if kind == "not_canonical" else raw

    replica._proposals.build = build  # type: ignore[method-assign]


async def test_a_proposal_with_an_invalid_block_is_never_applied(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, tamper={3: propose_invalid_blocks})
    try:
        replicas = [await cluster.start(i) for i in range(4)]
        await cluster.wait_all(12)
        honest = replicas[:3]
        assert_same_state(honest, 12)
        store = await LedgerStore.open(tmp_path / "replica0" / "ledger.sqlite", GENESIS)
        try:
            blocks = await store.blocks(1, 100)
        finally:
            await store.close()
        assert len(blocks) >= 12
        for height, raw, _ in blocks:  # every committed block decodes canonically and chains
            block = decode_block(raw)
            assert block.proposer != replicas[3].peer_id, f"height {height} committed the invalid proposer's block"
        # The invalid proposer had turns (one in four elections), which cost a round each.
        assert sum(r.metrics.rounds for r in honest) > 0
        assert all(r.evidence_count == 0 for r in replicas)
    finally:
        await cluster.close()


async def test_votes_from_non_validators_are_ignored(cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    follower = await cluster.start(4)  # OUTSIDER: not in the genesis set
    await cluster.wait_all(3)

    # Its own replica never signs: it follows the chain without voting.
    assert follower.core.safety == NEVER_SIGNED
    assert follower.metrics.safety_writes == 0

    # Votes it forges for the current height are dropped by the topic validator before delivery ...
    height = replicas[0].core.height
    forged = [make_vote(CHAIN, OUTSIDER.sign, OUTSIDER.peer_id, t, height, 0, b"\x07" * 32, 0)
              for t in (VoteType.PREVOTE, VoteType.PRECOMMIT)]
    frame = encode_frame(ConsensusMessage(seq=1, proposals=[], votes=[vote_to_wire(v) for v in forged]))
    validate = replicas[0]._consensus.validator()
    assert not validate(OUTSIDER.peer_id, frame)
    await cluster.services[4].publish(CONSENSUS_TOPIC, frame)
    # ... and the core ignores them even when handed over directly (here: for the next height).
    ahead = make_vote(CHAIN, OUTSIDER.sign, OUTSIDER.peer_id, VoteType.PREVOTE, height + 1, 0, None, 0)
    assert replicas[0].core.on_vote(ahead) == []
    assert replicas[0].core.ignored["not_a_validator"] >= 1

    await cluster.wait_all(height + 2)
    assert_same_state(list(cluster.replicas.values()), height + 2)
    assert decode_frame(frame, ConsensusMessage).votes[0].validator == OUTSIDER.peer_id


async def test_an_equivocating_validator_is_reported_to_the_ledger_by_the_replicas_that_saw_it(
        cluster: Cluster) -> None:
    replicas = [await cluster.start(i) for i in range(4)]
    await cluster.wait_all(2)
    byzantine = VALIDATORS[3]
    height = replicas[0].core.height
    # Two prevotes for different blocks in one round, at this height and the next (in case it moves on).
    split = [make_vote(CHAIN, byzantine.sign, byzantine.peer_id, VoteType.PREVOTE, h, 0, block_hash, 0)
             for h in (height, height + 1) for block_hash in (b"\x07" * 32, b"\x08" * 32)]
    await cluster.services[3].publish(CONSENSUS_TOPIC, encode_frame(
        ConsensusMessage(seq=1, proposals=[], votes=[vote_to_wire(v) for v in split])))

    def punished() -> bool:
        return all(byzantine.peer_id in r.state.equivocations for r in replicas)

    await eventually(punished, what="the evidence transaction committed on every replica")
    top = min(r.height for r in replicas)
    await cluster.wait_all(top)
    assert_same_state(replicas, top)
    assert all(r.state.registry.rows[byzantine.peer_id].reputation_ppm == 0 for r in replicas)
    assert sum(r.evidence_count for r in replicas[:3]) >= 1


@pytest.mark.parametrize("compact_block_bytes", [256 * 1024, 0], ids=["compact", "stream"])
async def test_large_proposals_travel_compact_or_by_stream(tmp_path: Path, compact_block_bytes: int) -> None:
    """Over inline_block_bytes, a proposal carries tx hashes that peers resolve from their mempools;
    a block too large even so (here: any) is fetched by hash over a stream."""
    params = ReplicaParams(**{**FAST.__dict__, "inline_block_bytes": 64,
                              "compact_block_bytes": compact_block_bytes})
    cluster = Cluster(tmp_path, params=params)
    try:
        replicas = [await cluster.start(i) for i in range(4)]
        client = CLIENTS[1]
        hashes = [replicas[1].submit(transfer(client, replicas[1].next_sequence(client.peer_id)))
                  for _ in range(10)]
        top = max([(await replicas[2].wait_for_commit(h, timeout=15)).height for h in hashes])
        await cluster.wait_all(top)
        assert_same_state(replicas, top)
        rebuilt = sum(r.metrics.proposals_rebuilt for r in replicas)
        fetched = sum(r.metrics.bodies_fetched for r in replicas)
        if compact_block_bytes:
            assert rebuilt > 0  # (a peer that got the proposal before the transactions fetches it)
        else:
            assert rebuilt == 0 and fetched > 0
    finally:
        await cluster.close()


async def test_submit_refuses_bad_transactions_with_a_code(cluster: Cluster) -> None:
    from gonka_p2p.ledger.mempool import TxRefused

    replica = await cluster.start(0)
    client = CLIENTS[0]
    raw = transfer(client, 0)
    replica.submit(raw)
    with pytest.raises(TxRefused) as e:
        replica.submit(raw)
    assert e.value.code == "duplicate"
    with pytest.raises(TxRefused) as e:
        replica.submit(transfer(client, 0, amount=2))
    assert e.value.code == "sequence_taken"
    with pytest.raises(TxRefused) as e:
        replica.submit(transfer(OUTSIDER, 0))
    assert e.value.code == "unknown_account"
    with pytest.raises(TxRefused) as e:
        replica.submit(transfer(client, 1, amount=10**9))
    assert e.value.code == "insufficient_balance"
    assert replica.next_sequence(client.peer_id) == 1


async def test_a_waiter_that_gives_up_leaves_nothing_behind(cluster: Cluster) -> None:
    """Waiting for a hash that never commits (nor enters the mempool) must not keep it in memory."""
    replica = await cluster.start(0)
    waiters = replica._chain._tx_waiters
    for i in range(3):
        with pytest.raises(TimeoutError):
            await replica.wait_for_commit(bytes([i]) * 32, timeout=0.01)
    await asyncio.sleep(0)  # the waiters' done callbacks run on the next loop turn
    assert waiters.futures == {}


async def test_a_crash_in_a_replica_task_ends_its_run(cluster: Cluster) -> None:
    """Structured concurrency: a failure in the driver is raised by run(), not only logged."""
    replicas = [await cluster.start(i) for i in range(4)]
    await cluster.wait_all(1)

    def broken(height: int) -> bytes:
        raise RuntimeError("proposal builder failed")

    for replica in replicas:
        replica._proposals.build = broken  # type: ignore[method-assign]
    done, _ = await asyncio.wait(cluster.tasks.values(), timeout=15, return_when=asyncio.FIRST_COMPLETED)
    assert done, "no replica stopped"
    with pytest.raises(ExceptionGroup) as e:
        done.pop().result()
    assert e.group_contains(RuntimeError, match="proposal builder failed")
