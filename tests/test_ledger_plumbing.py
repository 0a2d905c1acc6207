"""The replica's parts on their own: consensus wire schemas, the mempool, the SQLite store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gonka_p2p.identity import Keypair, digest, verify_signature
from gonka_p2p.ledger.block import Block
from gonka_p2p.ledger.commit_checks import verify_commit
from gonka_p2p.ledger.consensus_types import (
    CommitCertificate,
    Evidence,
    SafetyState,
    Step,
    Validator,
    ValidatorSet,
    VoteType,
    make_proposal,
    make_vote,
)
from gonka_p2p.ledger.consensus_wire import (
    CertificateWire,
    CompactBlock,
    ConsensusMessage,
    EvidenceWire,
    TxBatch,
    ValidatorSetWire,
    VoteWire,
    certificate_from_wire,
    certificate_to_wire,
    compact_block,
    evidence_from_wire,
    evidence_to_wire,
    expand_block,
    proposal_from_wire,
    proposal_to_wire,
    validator_set_from_wire,
    validator_set_to_wire,
    vote_from_wire,
    vote_to_wire,
)
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.mempool import Mempool, MempoolParams, TxRefused
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.store import LedgerStore, StoreError
from gonka_p2p.ledger.transactions import Transfer
from gonka_p2p.ledger.validators import initial_validator_set, validator_set_after
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

CHAIN = "gonka-plumbing"
VALS = [Keypair.from_seed(f"v{i}".encode()) for i in range(4)]
USERS = [Keypair.from_seed(f"u{i}".encode()) for i in range(3)]
GENESIS = Genesis(chain_id=CHAIN, params=Params(price_per_token={"m": 1}),
                  participants=tuple(GenesisParticipant(k.public_key, 10 + i) for i, k in enumerate(VALS)),
                  allocations={u.peer_id: 1000 for u in USERS})


def transfer(user: Keypair, sequence: int, amount: int = 1) -> bytes:
    return seal(Transfer(chain_id=CHAIN, to=VALS[0].peer_id, amount=amount, sequence=sequence), user)


def certify(validators: ValidatorSet, height: int, block: bytes) -> CommitCertificate:
    votes = tuple(sorted((make_vote(CHAIN, k.sign, k.peer_id, VoteType.PRECOMMIT, height, 0, digest(block), 0)
                          for k in VALS), key=lambda v: v.validator))
    return CommitCertificate(height, 0, digest(block), votes)


# --------------------------------------------------------------------------- wire


def test_consensus_values_survive_the_wire() -> None:
    k = VALS[0]
    for block_hash in (None, b"\x05" * 32):
        vote = make_vote(CHAIN, k.sign, k.peer_id, VoteType.PREVOTE, 3, 1, block_hash, 0)
        frame = encode_frame(ConsensusMessage(seq=7, proposals=[], votes=[vote_to_wire(vote)]))
        assert vote_from_wire(decode_frame(frame, ConsensusMessage).votes[0]) == vote
    proposal = make_proposal(CHAIN, k.sign, k.peer_id, 3, 1, 0, b"block bytes")
    for inline in (True, False):
        wire = proposal_to_wire(proposal, inline)
        assert proposal_from_wire(wire, proposal.block) == proposal
        assert (wire.block == b"") is not inline
    with pytest.raises(WireError):
        proposal_from_wire(proposal_to_wire(proposal, True), b"another block")

    vs = ValidatorSet([Validator(v.peer_id, v.public_key, 3) for v in VALS]).next_height()
    again = validator_set_from_wire(decode_frame(encode_frame(validator_set_to_wire(vs)), ValidatorSetWire))
    assert again.priorities == vs.priorities and [again.proposer(r) for r in range(8)] == [
        vs.proposer(r) for r in range(8)]

    cert = certify(vs, 3, b"block bytes")
    back = certificate_from_wire(decode_frame(encode_frame(certificate_to_wire(cert)), CertificateWire))
    assert back == cert
    verify_commit(vs, 3, digest(b"block bytes"), back, verify_signature, chain_id=CHAIN)

    twin = make_vote(CHAIN, k.sign, k.peer_id, VoteType.PREVOTE, 3, 1, b"\x06" * 32, 0)
    evidence = Evidence(make_vote(CHAIN, k.sign, k.peer_id, VoteType.PREVOTE, 3, 1, None, 0), twin)
    assert evidence_from_wire(decode_frame(encode_frame(evidence_to_wire(evidence)), EvidenceWire)) == evidence
    other = make_proposal(CHAIN, k.sign, k.peer_id, 3, 1, 0, b"another block")
    assert evidence_from_wire(evidence_to_wire(Evidence(proposal, other))) == Evidence(proposal, other)


def test_a_compact_block_rebuilds_the_exact_block_from_known_transactions() -> None:
    txs = [transfer(USERS[i % 3], i // 3) for i in range(7)]
    block = Block(height=4, prev_hash=b"\x02" * 32, proposer=VALS[1].peer_id, time_ms=99, txs=txs)
    known = {digest(tx): tx for tx in txs[:5]}  # the last two were not gossiped: they travel whole
    compact = CompactBlock.decode(compact_block(block, lambda h: h in known).encode())
    assert [len(e) for e in compact.entries][:5] == [32] * 5 and len(compact.entries[6]) > 32
    size = sum(len(tx) for tx in txs)
    assert expand_block(compact, known.get, max_bytes=size) == block.encode()
    assert expand_block(compact, known.get, max_bytes=size - 1) is None  # never built past the bound
    del known[digest(txs[3])]
    assert expand_block(compact, known.get, max_bytes=size) is None


def test_frames_refuse_other_kinds_versions_and_garbage() -> None:
    frame = encode_frame(TxBatch(txs=[b"x"]))
    assert decode_frame(frame, TxBatch).txs == [b"x"]
    with pytest.raises(WireError):
        decode_frame(frame, ConsensusMessage)
    version, kind, schema_version, body = msgpack.unpackb(frame)
    for bad in ([version + 1, kind, schema_version, body], [version, kind, schema_version + 1, body],
                [version, kind, schema_version], "frame"):
        with pytest.raises(WireError):
            decode_frame(msgpack.packb(bad), TxBatch)
    with pytest.raises(WireError):  # a block hash is 32 bytes, or empty for nil
        vote_from_wire(VoteWire(type=1, height=1, round=0, block_hash=b"\x01", validator="v", time_ms=0, signature=b""))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_frame_is_total(data: bytes) -> None:
    for kind in (ConsensusMessage, TxBatch, CertificateWire):
        try:
            decode_frame(data, kind)
        except WireError:
            pass


def test_every_gossip_publication_is_unique() -> None:
    """Rebroadcasts repeat votes on purpose; the seq field keeps gossip from taking them for duplicates."""
    vote = vote_to_wire(make_vote(CHAIN, VALS[0].sign, VALS[0].peer_id, VoteType.PREVOTE, 1, 0, None, 0))
    frames = {encode_frame(ConsensusMessage(seq=s, proposals=[], votes=[vote])) for s in range(3)}
    assert len(frames) == 3


# --------------------------------------------------------------------------- mempool


def test_mempool_admission_codes() -> None:
    state = LedgerState.from_genesis(GENESIS)
    pool = Mempool(MempoolParams(max_txs=3, max_ahead=5))
    pool.add(state, transfer(USERS[0], 0))
    refusals = {
        "duplicate": transfer(USERS[0], 0),
        "sequence_taken": transfer(USERS[0], 0, amount=2),
        "too_far_ahead": transfer(USERS[0], 6),
        "insufficient_balance": transfer(USERS[1], 0, amount=10**6),
        "unknown_account": transfer(Keypair.from_seed(b"nobody"), 0),
        "bad_sequence": b"",  # replaced below: a sequence already used
    }
    state2 = LedgerState.from_genesis(GENESIS)
    apply_block(state2, Block(height=1, prev_hash=state2.last_block_hash, proposer="p", time_ms=1,
                              txs=[transfer(USERS[2], 0)]))
    refusals["bad_sequence"] = transfer(USERS[2], 0, amount=3)
    for code, raw in refusals.items():
        with pytest.raises(TxRefused) as e:
            pool.add(state2 if code == "bad_sequence" else state, raw)
        assert e.value.code == code, (code, e.value)
    pool.add(state, transfer(USERS[1], 0))
    pool.add(state, transfer(USERS[1], 1))
    with pytest.raises(TxRefused) as e:
        pool.add(state, transfer(USERS[2], 0))
    assert e.value.code == "mempool_full" and len(pool) == 3


def test_reaping_orders_each_signer_by_sequence_and_interleaves_by_arrival() -> None:
    state = LedgerState.from_genesis(GENESIS)
    pool = Mempool()
    arrivals = [(0, 2), (1, 0), (0, 1), (2, 1), (0, 0), (1, 1)]  # (user, sequence): out of order
    raws = {(u, s): transfer(USERS[u], s) for u, s in arrivals}
    for u, s in arrivals:
        pool.add(state, raws[(u, s)])
    block = pool.reap(state, max_txs=100, max_bytes=10**6)
    order = [next(k for k, raw in raws.items() if raw == b) for b in block]
    # user 2 has no sequence 0 pending: its sequence 1 must wait; the others go in order.
    assert [s for u, s in order if u == 0] == [0, 1, 2] and [s for u, s in order if u == 1] == [0, 1]
    assert (2, 1) not in order
    assert order[0] == (1, 0)  # the earliest arrival that can go first
    assert pool.next_sequence(state, USERS[0].peer_id) == 3
    assert pool.next_sequence(state, USERS[2].peer_id) == 0  # the gap is the next sequence
    assert len(pool.reap(state, max_txs=2, max_bytes=10**6)) == 2
    assert pool.reap(state, max_txs=100, max_bytes=len(block[0])) == [block[0]]

    applied, _ = apply_block(state, Block(height=1, prev_hash=state.last_block_hash, proposer="p", time_ms=1,
                                          txs=block))
    dropped = pool.update(applied, block)
    assert dropped == [] and len(pool) == 1 and pool.size_bytes == len(raws[(2, 1)])


def test_mempool_update_drops_what_no_longer_passes() -> None:
    state = LedgerState.from_genesis(GENESIS)
    pool = Mempool()
    mine = pool.add(state, transfer(USERS[0], 0, amount=600))
    spend = transfer(USERS[0], 0, amount=900)  # another tx with the same sequence, committed elsewhere
    apply_block(state, Block(height=1, prev_hash=state.last_block_hash, proposer="p", time_ms=1, txs=[spend]))
    dropped = pool.update(state, [spend])
    assert [(h, e.code) for h, e in dropped] == [(mine.tx_hash, "bad_sequence")] and len(pool) == 0


# --------------------------------------------------------------------------- store


async def _commit_blocks(store: LedgerStore, last: int,
                         snapshots: tuple[int, ...]) -> tuple[dict[int, bytes], ValidatorSet]:
    """Blocks 1..``last`` of transfers committed to ``store``, with snapshots at ``snapshots``;
    the app hash after each block and the validators after the last."""
    state = LedgerState.from_genesis(GENESIS)
    validators = initial_validator_set(state)
    hashes = {}
    for height in range(1, last + 1):
        block = Block(height=height, prev_hash=state.last_block_hash, proposer=VALS[0].peer_id,
                      time_ms=height, txs=[transfer(USERS[height % 3], (height - 1) // 3)]).encode()
        await store.commit_block(height, block, certify(validators, height, block), validators)
        apply_block(state, Block.decode(block))
        validators = validator_set_after(validators, state)
        hashes[height] = state.app_hash()
        if height in snapshots:
            await store.save_snapshot(state)
    return hashes, validators


async def test_store_recovers_the_acknowledged_state(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    store = await LedgerStore.open(path, GENESIS)
    assert await store.load_safety() is None
    safety = SafetyState(5, 2, Step.PRECOMMIT, 1, b"\x09" * 32)
    await store.save_safety(safety)
    hashes, validators = await _commit_blocks(store, 7, (2, 4, 6))
    await store.close()

    store = await LedgerStore.open(path, GENESIS)
    try:
        recovered = await store.recover(GENESIS)
        assert recovered.state.height == 7 and recovered.state.app_hash() == hashes[7]
        assert recovered.replayed == 1  # the snapshot at 6, then block 7
        assert recovered.safety == safety
        assert recovered.validators.priorities == validators.priorities
        assert [h for h, *_ in await store.blocks(3, 3)] == [3, 4, 5]
        rows = await store._db.execute_fetchall("SELECT height FROM snapshots ORDER BY height")
        assert [r[0] for r in rows] == [4, 6]  # only the latest two are kept
    finally:
        await store.close()


async def test_store_refuses_another_networks_file(tmp_path: Path) -> None:
    store = await LedgerStore.open(tmp_path / "ledger.sqlite", GENESIS)
    await store.close()
    other = Genesis(chain_id="other", params=GENESIS.params, participants=GENESIS.participants)
    with pytest.raises(StoreError, match="another network"):
        await LedgerStore.open(tmp_path / "ledger.sqlite", other)


def test_validator_sets_follow_the_state_weights() -> None:
    state = LedgerState.from_genesis(GENESIS)
    vs = initial_validator_set(state)
    assert {v.address: v.power for v in vs.validators} == state.weights()
    after = validator_set_after(vs, state)
    assert after.priorities == vs.next_height().priorities  # nothing changed: one election later
    proposers = [vs.proposer(0)]
    for _ in range(sum(v.power for v in vs.validators) - 1):
        vs = validator_set_after(vs, state)
        proposers.append(vs.proposer(0))
    assert {a: proposers.count(a) for a in set(proposers)} == state.weights()  # weighted round robin


async def test_a_snapshot_an_upgrade_cannot_read_is_rebuilt_from_the_blocks(tmp_path: Path) -> None:
    """An upgrade that changes the state's encoding must not leave a participant unable to
    start (the testnet's rolling upgrade did: every restarted node crashed on its snapshot)."""
    path = tmp_path / "ledger.sqlite"
    store = await LedgerStore.open(path, GENESIS)
    hashes, _ = await _commit_blocks(store, 5, (4,))
    await store.close()
    height, app_hash = 5, hashes[5]
    db = sqlite3.connect(path)
    db.execute("UPDATE snapshots SET state = ?", (b"\x93written by another version",))
    db.commit()
    db.close()
    store = await LedgerStore.open(path, GENESIS)
    try:
        recovered = await store.recover(GENESIS)
        assert (recovered.state.height, recovered.state.app_hash()) == (height, app_hash)
        assert recovered.replayed == height  # from genesis
    finally:
        await store.close()

    db = sqlite3.connect(path)  # and one whose rules differ from the writer's reaches another state
    db.execute("UPDATE snapshots SET app_hash = ?", (bytes(32),))
    db.commit()
    db.close()
    store = await LedgerStore.open(path, GENESIS)
    try:
        with pytest.raises(StoreError, match="computes another ledger"):
            await store.recover(GENESIS)
    finally:
        await store.close()
