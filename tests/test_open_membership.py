"""Open membership on the in-memory network: a stranger's key earns weight by proof of compute.

Three genesis participants and one node with a key the ledger has never seen, all serving
the tiny model, on a genesis with proof of compute on. The stranger joins through its
first commitment (no account, no faucet), its sample is recomputed by the others, and
from the next epoch it holds weight, is in the validator set and the draw table, and
signs blocks. Then a genesis participant stops: the rest keep committing, and its weight
falls at the next round, by a missed round's bounded step (``poc.declined_targets``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FAST, MODEL, eventually

from gonka_p2p.actors.node import Node
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.rules import epoch_last_height, shift_budget
from gonka_p2p.ledger.state import check_invariants

GENESIS_KEYS = [Keypair.from_seed(f"open-membership-{i}".encode()) for i in range(3)]
STRANGER = Keypair.from_seed(b"open-membership-stranger")
EPOCH = 90  # windows of several blocks: blocks come every ~0.1-0.3 s here, and four nodes share one engine
GENESIS = devnet_genesis([k.public_key for k in GENESIS_KEYS], [], models=(MODEL,), epoch_length_blocks=EPOCH,
                         validation_window_blocks=10, poc_enabled=1, poc_start_offset_blocks=3,
                         poc_compute_blocks=8, poc_secret_blocks=8, poc_reveal_blocks=8, poc_verdict_blocks=16,
                         poc_confirm_compute_blocks=12, poc_join_pow_bits=8)

pytestmark = pytest.mark.slow


@pytest.fixture
async def network(engine: Engine, tmp_path: Path) -> AsyncIterator[tuple[list[Node], dict[str, asyncio.Event]]]:
    hub = MemoryHub()
    nodes: list[Node] = []
    stops: dict[str, asyncio.Event] = {}
    serving = []
    for i, key in enumerate([*GENESIS_KEYS, STRANGER]):
        config = NodeConfig(models=[MODEL], engine="torch", data_dir=tmp_path / f"node{i}", announce_interval=0.5)
        node = Node(config, key, hub.service(key), None, GENESIS, FAST)
        node.engines[MODEL] = engine
        await node.join()
        for other in nodes:
            await node.service.connect(other.service.listen_addrs[0])
        nodes.append(node)
        stops[key.peer_id] = asyncio.Event()
        serving.append(asyncio.create_task(node.serve(stops[key.peer_id])))
    yield nodes, stops
    for stop in stops.values():
        stop.set()
    await asyncio.gather(*serving)
    for node in nodes:
        await node.close()


def state_of(node: Node):  # noqa: ANN201 -- the replica's live state
    assert node.replica is not None
    return node.replica.state


async def test_a_stranger_joins_by_proof_of_compute_and_a_leaver_loses_its_weight(
        network: tuple[list[Node], dict[str, asyncio.Event]]) -> None:
    nodes, stops = network
    observer = nodes[0]
    me = STRANGER.peer_id
    # Epoch 0's round: the stranger commits (joining), is sampled and judged; at the epoch's end
    # the weights become proven nonces.
    await eventually(lambda: state_of(observer).height > epoch_last_height(0, GENESIS.params), 120,
                     "the end of epoch 0", interval=0.2)
    state = state_of(observer)
    assert state.participant(me) is not None, "the stranger registered through its commitment"
    weights = state.weights()
    entries = {key: (entry.count, entry.passed, entry.failed, bool(entry.secret), entry.opened)
               for key, entry in state.poc_entries.rows.items() if key[0] == 0}
    assert weights.get(me, 0) > 0, f"the stranger earned no weight: {weights}, round entries {entries}"
    info = state.epoch_info(1)
    assert me in info.weights and me in info.model_weights(MODEL)
    assert state.commitment(1, me) is not None, "a newcomer validates from its first weighted epoch"
    # It signs blocks of epoch 1.
    stranger = nodes[-1]

    def signed_by_stranger() -> bool:
        cert = stranger.replica._chain.last_certificate  # type: ignore[union-attr]
        return cert is not None and any(v.validator == me for v in cert.precommits)

    await eventually(signed_by_stranger, 60, "a commit the stranger signed", interval=0.2)
    # A genesis participant leaves: the rest (3 of 4, with the stranger) keep committing and its
    # weight falls at the end of epoch 1's round, by the bounded step at most. It is the one with
    # the least voting power: how many nonces each proved in a round of a few blocks depends on
    # the machine (four nodes share one engine), and a leaver with a third of the power would
    # halt the chain, as it should.
    power = dict(info.validators)
    leaver = min((key.peer_id for key in GENESIS_KEYS), key=lambda peer: power.get(peer, 0))
    assert 3 * (sum(power.values()) - power.get(leaver, 0)) > 2 * sum(power.values()), power
    observer = next(node for node in nodes if node.key.peer_id != leaver)
    held = {peer: p.weight for peer, p in state_of(observer).registry.rows.items() if p.weight}
    stops[leaver].set()
    await eventually(lambda: state_of(observer).height > epoch_last_height(1, GENESIS.params), 180,
                     "the end of epoch 1 without the leaver", interval=0.2)
    state = state_of(observer)
    rounds = {key: (entry.count, entry.passed, entry.failed, bool(entry.secret), entry.opened)
              for key, entry in state.poc_entries.rows.items() if key[0] == 1}
    step = shift_budget(sum(held.values()), GENESIS.params.max_weight_shift_ppm)
    kept = state.registry.rows[leaver].weight
    assert held[leaver] - step <= kept < held[leaver], f"the leaver: {held} -> {kept}, {rounds}"
    assert state.weights().get(me, 0) > 0, rounds
    check_invariants(state)
