"""Ledger replicas on the in-memory network: they commit, agree, restart, catch up, and refuse bad input.

Every replica here is the real actor (consensus core, mempool, SQLite store,
gossip and streams) on a :class:`MemoryHub`, with consensus timeouts cut to
a few hundred milliseconds so that each test runs in seconds.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from helpers import FAST, eventually

from gonka_p2p.actors.replica import Replica, ReplicaParams
from gonka_p2p.actors.replica.proposals import BODIES_PER_PROPOSAL
from gonka_p2p.actors.replica.sync import LAGGING_HEIGHTS
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.ledger.consensus_types import NEVER_SIGNED, VoteType, make_vote, proposal_sign_bytes
from gonka_p2p.ledger.consensus_wire import (
    BlockBody,
    BlockRequest,
    CertificateWire,
    CommitRecord,
    CompactBlock,
    ConsensusMessage,
    ProposalWire,
    SyncRequest,
    certificate_from_wire,
    vote_to_wire,
)
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.block import MAX_BLOCK_TXS, Block, decode_block
from gonka_p2p.ledger.store import LedgerStore
from gonka_p2p.ledger.transactions import Reason, RegisterParticipant, Transfer
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.protocols import BLOCK_PROTOCOL, CONSENSUS_TOPIC, SYNC_PROTOCOL
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
    lags: list[int] = []  # what its validator hears: its own links failed it (evidence_fetch.py)
    cut_off.add_lag_listener(lags.append)
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
    assert lags and max(lags) >= 8 and all(n >= LAGGING_HEIGHTS for n in lags)
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


# --------------------------------------------------------------------------- what byzantine peers send the shell


@asynccontextmanager
async def replica_and_peer(tmp_path: Path) -> AsyncIterator[tuple[Replica, MemoryService]]:
    """Replica 0, open but not running, connected to validator 1's bare service (the attacker's)."""
    hub = MemoryHub()
    service, peer = hub.service(VALIDATORS[0]), hub.service(VALIDATORS[1])
    await service.start()
    await peer.start()
    await service.connect(peer.listen_addrs[0])
    replica = Replica(service, VALIDATORS[0], GENESIS, tmp_path / "replica0", FAST)
    await replica.open()
    try:
        yield replica, peer
    finally:
        await replica.close()
        await peer.stop()
        await service.stop()


def unproven_record(height: int, block: bytes = b"junk") -> CommitRecord:
    """A CommitRecord whose certificate holds no signature: it never verifies."""
    return CommitRecord(height=height, block=block, certificate=CertificateWire(
        height=height, round=0, block_hash=digest(block), signatures=[]))


async def test_a_sync_reply_ends_at_the_records_asked_for_and_at_its_deadline(tmp_path: Path) -> None:
    """Attack: a peer answering a SyncRequest sent frame after frame (each up to 8 MiB, each within the
    per-frame timeout) and the replica kept them all in memory, its one sync task (or its start-up
    catch-up) busy for as long as the peer trickled them. It reads at most ``sync_batch`` records,
    within ``request_timeout_s`` for the whole reply."""
    async with replica_and_peer(tmp_path) as (replica, peer):
        sent = 0

        async def flood(opener: str, frame: bytes, send) -> None:  # type: ignore[no-untyped-def]
            nonlocal sent
            request = decode_frame(frame, SyncRequest)
            for i in range(50 * request.max_count):
                await send(encode_frame(unproven_record(request.from_height + i)))
                sent += 1

        peer.set_stream_handler(SYNC_PROTOCOL, flood)
        assert await replica._sync._fetch_records(1, peer.peer_id) == []  # (they do not verify either)
        assert sent < 50 * FAST.sync_batch, "the replica read the whole flood"

        async def trickle(opener: str, frame: bytes, send) -> None:  # type: ignore[no-untyped-def]
            request = decode_frame(frame, SyncRequest)
            for i in range(request.max_count):
                await asyncio.sleep(0.6 * FAST.request_timeout_s)  # each frame in time, the reply not
                await send(encode_frame(unproven_record(request.from_height + i)))

        peer.set_stream_handler(SYNC_PROTOCOL, trickle)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await replica._sync._fetch_records(1, peer.peer_id)
        assert loop.time() - started < FAST.request_timeout_s + 0.5


async def test_a_fetched_record_that_does_not_verify_is_dropped_not_held(tmp_path: Path) -> None:
    """Attack: fetched records were held unverified until their height committed, so one bad record
    made the driver start its height at once and skip proposing in it (``holds``), and was re-offered
    to the core at every RequestCommit instead of being fetched anew."""
    async with replica_and_peer(tmp_path) as (replica, _):
        sync, bad = replica._sync, unproven_record(1)
        sync._fetched[1] = (bad.block, certificate_from_wire(bad.certificate))
        assert not sync.holds(1) and not sync._fetched
        replica.core.start(1, replica._chain.validators)
        sync._fetched[1] = (bad.block, certificate_from_wire(bad.certificate))
        assert sync.offer() == [] and not sync._fetched


async def test_a_sync_reply_padded_with_made_up_heights_does_not_make_a_replica_think_it_lagged(
        tmp_path: Path) -> None:
    """Attack: a replica one height behind asks a peer, which answers the height it lacked and pads
    the reply with made-up records. Counted as heights missed, they would tell the node's
    validator that its own links failed it, and it would accuse no withholder for
    ``RECOVERY_S``. Only a proven height reaching ``LAGGING_HEIGHTS`` counts."""
    async with replica_and_peer(tmp_path) as (replica, _):
        lags: list[int] = []
        replica.add_lag_listener(lags.append)
        padded = [unproven_record(h) for h in range(1, LAGGING_HEIGHTS + 3)]
        batch = [(r.height, r.block, certificate_from_wire(r.certificate)) for r in padded]
        assert replica._sync._note_lag(0, batch) == len(batch)
        assert replica._sync._note_lag(LAGGING_HEIGHTS - 1, batch[:1]) == LAGGING_HEIGHTS
        assert lags == []
        replica._sync._note_lag(LAGGING_HEIGHTS, batch[:1])  # after committed batches: no proof needed
        assert lags == [LAGGING_HEIGHTS + 1]


async def test_one_bad_sync_reply_does_not_stop_a_lagging_replica_from_catching_up(tmp_path: Path) -> None:
    """Attack: a byzantine validator shows a lagging replica a vote of a later height (so that it is
    asked first for the commit) and answers with a record whose certificate does not verify. The
    replica kept that record and re-offered it to the core for ever: it never caught up, and skipped
    its proposer turns. It must fetch from another peer instead."""
    victim_index, evil_index = 2, 3
    asked = asyncio.Event()

    def byzantine(evil: Replica) -> None:
        async def serve(opener: str, frame: bytes, send) -> None:  # type: ignore[no-untyped-def]
            if opener != VALIDATORS[victim_index].peer_id:
                return await evil._sync.serve(opener, frame, send)
            asked.set()
            request = decode_frame(frame, SyncRequest)
            for height, block, _ in await evil._chain.store.blocks(request.from_height, 1):
                await send(encode_frame(unproven_record(height, block)))

        evil._service.set_stream_handler(SYNC_PROTOCOL, serve)

    cluster = Cluster(tmp_path, tamper={evil_index: byzantine})
    try:
        replicas = [await cluster.start(i) for i in range(4)]
        await cluster.wait_all(2)
        victim, deaf = replicas[victim_index], cluster.services[victim_index]
        # The victim lags: its consensus gossip is lost for a while (30 of 40 power goes on).
        await deaf.subscribe(CONSENSUS_TOPIC, victim._consensus.on_message, lambda sender, data: False)
        stalled_at = victim.height
        await asyncio.gather(*(replicas[i].wait_for_height(stalled_at + 3, 15) for i in (0, 1, 3)))
        evil = VALIDATORS[evil_index]

        async def show_a_later_height() -> bool:
            ahead = make_vote(CHAIN, evil.sign, evil.peer_id, VoteType.PREVOTE, victim.core.height + 2, 0, None, 0)
            await victim._consensus.on_message(evil.peer_id, encode_frame(
                ConsensusMessage(seq=1, proposals=[], votes=[vote_to_wire(ahead)])))
            return asked.is_set()

        await eventually(show_a_later_height, what="the victim asking the byzantine peer", interval=0.1)
        # Its gossip is back; every honest peer answers a catch-up correctly.
        await deaf.subscribe(CONSENSUS_TOPIC, victim._consensus.on_message, victim._consensus.validator())
        target = replicas[0].height + 2
        await victim.wait_for_height(target, 20)
    finally:
        await cluster.close()


async def test_an_unsigned_compact_proposal_is_not_expanded(tmp_path: Path) -> None:
    """Attack: a compact block (up to MAX_BLOCK_TXS entries, each naming the same large pending
    transaction) was rebuilt from the mempool before its signature was checked and without a size
    bound: anyone's one ~700 KB gossip message, relayed as valid by every topic validator, made every
    replica build and hash a block of 20,000 times the transaction's size on its event loop."""
    async with replica_and_peer(tmp_path) as (replica, _):
        client = CLIENTS[0]
        big = seal(RegisterParticipant(chain_id=CHAIN, addrs=["/dns/" + "a" * 251] * 8, models=["m"], sequence=0),
                   client)
        tx_hash = replica.submit(big)  # any funded account can put it in every mempool
        compact = CompactBlock(height=1, prev_hash=replica.state.last_block_hash, proposer=VALIDATORS[1].peer_id,
                               time_ms=0, entries=[tx_hash] * MAX_BLOCK_TXS, last_commit_round=0, last_commit=[])
        wire = ProposalWire(height=1, round=0, pol_round=-1, block_hash=b"\x01" * 32, inline=False, block=b"",
                            compact=compact.encode(), proposer=VALIDATORS[1].peer_id, signature=b"\x30" * 70)
        frame = encode_frame(ConsensusMessage(seq=1, proposals=[wire], votes=[]))
        assert not replica._consensus.validator()(VALIDATORS[2].peer_id, frame)  # relays no longer forward it
        # ... but a handler that a message reaches without its validator must not expand it either
        tracemalloc.start()
        try:
            await replica._consensus.on_message(VALIDATORS[2].peer_id, frame)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= max(8 * len(frame), FAST.max_block_bytes), f"{peak // 2**20} MiB allocated"


async def test_a_validator_cannot_make_replicas_fetch_and_hold_bodies_without_bound(tmp_path: Path) -> None:
    """Attack: a replica fetched (and held until the next height committed) the body of any proposal
    some validator signed: for rounds like 10**12 that the core drops at once, for rounds that
    validator does not propose, as many bodies per round as it signed. Only proposals the core would
    take are fetched, and at most two bodies per proposer and round, for at most
    ``max_future_rounds`` rounds above the core's."""
    async with replica_and_peer(tmp_path) as (replica, peer):
        validators, evil = replica._chain.validators, VALIDATORS[1]
        own = [r for r in range(1, 100) if validators.proposer(r) == evil.peer_id][:4]  # its turns ahead of us
        others = [r for r in range(1, 100) if validators.proposer(r) != evil.peer_id][:4]
        signed: list[tuple[int, bytes]] = []  # (round, block hash), in the order sent
        bodies = {}
        for round_ in [10**12 + i for i in range(4)] + others + [r for r in own for _ in range(3)]:
            body = bytes([len(signed)]) * (64 * 1024)
            bodies[digest(body)] = body
            signed.append((round_, digest(body)))
        room = [[h for r, h in signed if r == turn][:BODIES_PER_PROPOSAL]
                for turn in own[:FAST.consensus.max_future_rounds]]
        expected = {h for hashes in room for h in hashes}  # its next turns, two bodies each

        async def serve(opener: str, frame: bytes, send) -> None:  # type: ignore[no-untyped-def]
            await send(encode_frame(BlockBody(block=bodies[decode_frame(frame, BlockRequest).block_hash])))

        peer.set_stream_handler(BLOCK_PROTOCOL, serve)
        replica.core.start(1, validators)  # the replica is deciding height 1, in round 0
        async with asyncio.TaskGroup() as tasks:
            replica._runtime.own(tasks)
            replica._runtime.running = True
            for i, (round_, block_hash) in enumerate(signed):
                signature = evil.sign(proposal_sign_bytes(CHAIN, 1, round_, -1, block_hash))
                wire = ProposalWire(height=1, round=round_, pol_round=-1, block_hash=block_hash, inline=False,
                                    block=b"", compact=b"", proposer=evil.peer_id, signature=signature)
                await replica._consensus.on_message(peer.peer_id, encode_frame(
                    ConsensusMessage(seq=i, proposals=[wire], votes=[])))
            await eventually(lambda: set(replica._proposals._bodies), what="the bodies of its next turns",
                             until=lambda held: held >= expected)
            await asyncio.sleep(0.2)  # any other fetch would have come by now
            replica._runtime.running = False
            replica._runtime.own(None)
        assert set(replica._proposals._bodies) == expected


async def test_an_unsigned_vote_naming_a_far_height_does_not_make_the_chain_spin(tmp_path: Path) -> None:
    """Attack: the height of every gossiped vote that passed the topic validator (which checks
    membership, not signatures) was noted as a reason to start the next height: one unsigned vote
    "from" a validator at height 2**62 made every replica start each later height at once, so the
    idle chain made blocks as fast as consensus runs and every deadline counted in blocks shrank."""
    params = ReplicaParams(**{**FAST.__dict__, "empty_block_interval_s": 3.0})
    cluster = Cluster(tmp_path, params=params)
    outsider = cluster.hub.service(OUTSIDER)
    await outsider.start()
    try:
        replicas = [await cluster.start(i) for i in range(4)]
        for service in cluster.services.values():
            await outsider.connect(service.listen_addrs[0])
        await cluster.wait_all(2)
        forged = make_vote(CHAIN, lambda message: b"\x30" * 70, VALIDATORS[0].peer_id, VoteType.PREVOTE, 2**62, 0,
                           None, 0)
        await outsider.publish(CONSENSUS_TOPIC, encode_frame(
            ConsensusMessage(seq=1, proposals=[], votes=[vote_to_wire(forged)])))
        h0, t0 = replicas[0].height, asyncio.get_running_loop().time()
        await asyncio.sleep(2.0)
        blocks = replicas[0].height - h0
        elapsed = asyncio.get_running_loop().time() - t0
        assert blocks <= elapsed / params.empty_block_interval_s + 1, f"{blocks} blocks in {elapsed:.1f} s"
    finally:
        await cluster.close()
        await outsider.stop()
