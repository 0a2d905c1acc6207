"""The evidence store: what an executor or TA keeps for validators survives a restart, goes
only when the epoch that holds it has settled, and a full store refuses new evidence (one
error, a counter) rather than evicting evidence the ledger still expects."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import msgpack
import pytest

from gonka_p2p.actors.artifact_store import ArtifactStore, EvidenceStoreFull, last_settled_epoch
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.records import Inference, InferenceStatus
from gonka_p2p.ledger.rules import settlement_height
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import ChatTurn, InferenceRequest, inference_id

CLIENT = Keypair.from_seed(b"store-client")
T0 = 1_700_000_000_000
WINDOW_MS = 60_000
# Epoch length 10: epoch e settles at rules.settlement_height(e) (validation window, then every dispute round).
GENESIS = devnet_genesis([Keypair.from_seed(b"store-node").public_key], [CLIENT.peer_id], models=("m",),
                         epoch_length_blocks=10, validation_window_blocks=3, dispute_voting_blocks=2,
                         request_window_ms=WINDOW_MS, genesis_time_ms=T0)


def request(n: int, timestamp_ms: int = T0) -> Signed[InferenceRequest]:
    raw = seal(InferenceRequest(chain_id=GENESIS.chain_id, model="m", messages=[ChatTurn(role="user", content=f"question {n}")],
                                max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5,
                                timestamp_ms=timestamp_ms, nonce=n.to_bytes(16, "big")), CLIENT)
    return open_envelope(raw, InferenceRequest)


def artifact(req: Signed[InferenceRequest], tokens: int = 4) -> InferenceArtifact:
    steps = tuple(TokenStep(7 + i, -0.5, (7 + i, 1, 2, 3, 4), (-0.5, -1.0, -2.0, -3.0, -4.0))
                  for i in range(tokens))
    return InferenceArtifact("m", (1, 2, 3), SamplingParams(max_tokens=tokens), inference_id(req), steps)


def size(req: Signed[InferenceRequest], art: InferenceArtifact) -> int:
    return len(req.raw) + len(art.encode()) + len(msgpack.packb([]))  # kept with no answer frames


async def opened(path: Path | None, max_bytes: int = 1 << 20) -> ArtifactStore:
    store = ArtifactStore(path, max_bytes)
    await store.open()
    return store


def ledger_at(height: int, time_ms: int, closed: dict[bytes, tuple[InferenceStatus, int]],
              running: tuple[bytes, ...] = ()) -> LedgerState:
    """Committed state at ``height``: ``closed`` inferences (status, closing height), ``running`` ones."""
    state = LedgerState.from_genesis(GENESIS)
    state.height, state.time_ms = height, time_ms
    for iid, (status, at) in closed.items():
        state.close_inference(iid, record(status, start=at - 1, closed=at))
    for iid in running:
        state.inferences.put(iid, record(InferenceStatus.STARTED, start=height, closed=0))
    return state


def record(status: InferenceStatus, start: int, closed: int) -> Inference:
    return Inference(client=CLIENT.peer_id, ta="ta", executor="ex", model="m", price=1, max_tokens=4,
                     prompt_bound=8, escrow=12, request_ms=T0, start_height=start, deadline=start + 3,
                     status=status, closed_height=closed)


def test_the_last_settled_epoch_is_the_inverse_of_settlement_height() -> None:
    params = GENESIS.params
    assert last_settled_epoch(0, params) == -1
    for epoch in range(4):
        assert last_settled_epoch(settlement_height(epoch, params) - 1, params) == epoch - 1
        assert last_settled_epoch(settlement_height(epoch, params), params) == epoch


async def test_evidence_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "artifacts.sqlite"
    store = await opened(path)
    kept = [(r, artifact(r)) for r in (request(1), request(2))]
    for req, art in kept:
        await store.put(req, art, [])
    await store.close()
    store = await opened(path)
    try:
        for req, art in kept:
            assert await store.get(inference_id(req)) == (req.raw, art.encode())
        assert len(store) == 2
        assert store.used_bytes == sum(size(r, a) for r, a in kept)
        assert await store.get(b"\0" * 32) is None
    finally:
        await store.close()


async def test_a_put_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    """What the executor acknowledges is readable by another connection: committed, not buffered."""
    path = tmp_path / "artifacts.sqlite"
    store = await opened(path)
    req = request(1)
    try:
        await store.put(req, artifact(req), [])
        other = sqlite3.connect(path)
        try:
            assert other.execute("SELECT COUNT(*) FROM artifacts").fetchone() == (1,)
        finally:
            other.close()
    finally:
        await store.close()


async def test_settlement_prunes_only_evidence_of_settled_epochs(tmp_path: Path) -> None:
    path = tmp_path / "artifacts.sqlite"
    store = await opened(path)
    old = T0 - WINDOW_MS - 1  # requests out of the replay window: no client still seeks their answers
    settled0, settled1, running, unstarted = request(1, old), request(2, old), request(3), request(4)
    stale = request(5, timestamp_ms=T0 - 2 * WINDOW_MS)  # never started, and now never can
    for req in (settled0, settled1, running, unstarted, stale):
        await store.put(req, artifact(req), [])
    closed = {inference_id(settled0): (InferenceStatus.SETTLED, 5), inference_id(settled1): (InferenceStatus.SETTLED, 12)}

    settles = [settlement_height(epoch, GENESIS.params) for epoch in range(3)]
    store.on_commit(ledger_at(settles[0] - 1, T0, closed, running=(inference_id(running),)))  # nothing settled yet
    assert len(store) == 5

    store.on_commit(ledger_at(settles[0], T0, closed, running=(inference_id(running),)))  # epoch 0 settles
    assert await store.get(inference_id(settled0)) is None
    assert await store.get(inference_id(stale)) is None
    for kept in (settled1, running, unstarted):
        assert await store.get(inference_id(kept)) is not None
    assert store.used_bytes == sum(size(r, artifact(r)) for r in (settled1, running, unstarted))
    await store.close()

    store = await opened(path)  # the pruning reached the disk
    try:
        assert len(store) == 3
        closed[inference_id(running)] = (InferenceStatus.EXPIRED, 21)
        store.on_commit(ledger_at(settles[1], T0 + WINDOW_MS, closed))  # epoch 1 settles
        assert await store.get(inference_id(settled1)) is None
        assert await store.get(inference_id(running)) is not None  # it closed in epoch 2
        assert await store.get(inference_id(unstarted)) is not None  # the ledger may still start it
        store.on_commit(ledger_at(settles[2], T0 + WINDOW_MS + 1, closed))  # epoch 2 settles
        assert len(store) == 0
    finally:
        await store.close()


async def test_a_full_store_refuses_new_evidence_and_evicts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    first, second, third = request(1), request(2), request(3)
    store = await opened(None, max_bytes=size(first, artifact(first)) + 10)
    try:
        await store.put(first, artifact(first), [])
        assert not store.full
        caplog.set_level(logging.ERROR)
        for refused in (second, third):
            with pytest.raises(EvidenceStoreFull, match="evidence store is full"):
                await store.put(refused, artifact(refused), [])
        assert store.full and store.refused == 2
        assert [r.levelno for r in caplog.records] == [logging.ERROR]  # one clear error, not one per refusal
        assert await store.get(inference_id(first)) is not None
        assert await store.get(inference_id(second)) is None

        store.on_commit(ledger_at(settlement_height(0, GENESIS.params), T0 + WINDOW_MS + 1,
                                  {inference_id(first): (InferenceStatus.SETTLED, 5)}))
        assert not store.full and store.used_bytes == 0
        await store.put(second, artifact(second), [])
        assert await store.get(inference_id(second)) is not None
    finally:
        await store.close()


async def test_an_answer_outlives_its_settled_epoch_while_its_client_may_still_recover_it() -> None:
    """Testnet run 17: the client's recovery (120 s) outlasted a 60-second epoch's settlement, and the
    executor had dropped the answer the client was charged for. A settled inference's evidence
    stays until its request is also out of the ledger's replay window (``request_window_ms``)."""
    store = await opened(None)
    req = request(1)
    await store.put(req, artifact(req), [b"frame"])
    closed = {inference_id(req): (InferenceStatus.SETTLED, 5)}
    settles = [settlement_height(epoch, GENESIS.params) for epoch in range(3)]
    try:
        store.on_commit(ledger_at(settles[0], T0 + WINDOW_MS, closed))  # its epoch settles, the window has not passed
        assert await store.answer(inference_id(req)) is not None
        store.on_commit(ledger_at(settles[1], T0 + WINDOW_MS + 1, closed))  # the next settlement, past the window
        assert await store.answer(inference_id(req)) is None
    finally:
        await store.close()
