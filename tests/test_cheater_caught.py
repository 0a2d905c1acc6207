"""Verification end to end: a cheating executor on a network with a real ledger is caught
within the epoch, forfeits, and its clients are refunded, while honest participants are paid.

Four full nodes (directory, TA, executor, ledger replica, validator) on the in-memory
network with the tiny model; epochs of a few seconds. Node 3 cheats.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import FAST, MODEL, eventually

from gonka_p2p.actors.node import Node
from gonka_p2p.client import GonkaClient
from gonka_p2p.wire.stream import RequestRejected
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.adversary.engine import CheatingEngine
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.executor_draw import may_execute
from gonka_p2p.ledger.tx_rules import request_seen
from gonka_p2p.ledger.rules import settlement_height

pytestmark = pytest.mark.slow

KEYS = [Keypair.from_seed(f"verify-node-{i}".encode()) for i in range(4)]
CLIENT = Keypair.from_seed(b"verify-client")
CHEATER = 3
PARAMS = Params(price_per_token={MODEL: 1}, epoch_length_blocks=14, validation_window_blocks=6,
                dispute_voting_blocks=4, inference_deadline_blocks=6)
GENESIS = Genesis(chain_id="gonka-verify-test", params=PARAMS,
                  participants=tuple(GenesisParticipant(k.public_key, 10, models=(MODEL,)) for k in KEYS),
                  allocations={CLIENT.peer_id: 1_000_000})
REPLICA = replace(FAST, empty_block_interval_s=0.25, snapshot_interval=8, sync_batch=8)


@pytest.mark.parametrize("cheat", ["int4", "prefill", "small-model"])
async def test_cheater_is_caught_refunded_and_forfeits(engine: Engine, cheat: str, tmp_path: Path) -> None:
    hub = MemoryHub()
    nodes: list[Node] = []
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        for i, key in enumerate(KEYS):
            config = NodeConfig(models=[MODEL], engine="torch", data_dir=tmp_path / f"n{i}",
                                bootstrap=[nodes[0].service.listen_addrs[0]] if nodes else [])
            node = Node(config, key, hub.service(key), None, GENESIS, replica_params=REPLICA)
            node.engines[MODEL] = CheatingEngine(engine, cheat) if i == CHEATER else engine
            await node.join()
            nodes.append(node)
        for node in nodes[1:]:
            for other in nodes[1:]:
                if other is not node:
                    await node.service.connect(other.service.listen_addrs[0])
        tasks = [asyncio.create_task(node.serve(stop)) for node in nodes]
        ledger = nodes[0].replica
        assert ledger is not None
        # Epoch 0 is the bootstrap epoch (seeds for epoch 1 are committed during it).
        await eventually(lambda: ledger.state.epoch >= 1, 180, "epoch 1")

        service = hub.service(CLIENT)
        await service.start()
        client = GonkaClient(CLIENT, service, await service.connect(nodes[0].service.listen_addrs[0]))
        balance_before = ledger.state.balance(CLIENT.peer_id)
        by_executor: dict[str, int] = {}
        served: list[bytes] = []
        i = 0  # the draw is random: ask until the cheater served a few (a single cheat can look honest)
        cheater = KEYS[CHEATER].peer_id
        # Once convicted the cheater is routed around (may_execute): stop asking for more of it.
        while i < 12 or (by_executor.get(cheater, 0) < 3 and may_execute(ledger.state, cheater) and i < 40):
            try:
                completion = await client.chat([("user", f"Tell me about topic {i}.")], model=MODEL,
                                               max_tokens=16, temperature=0.7 if i % 2 else 0.0)
            except RequestRejected as e:
                # Once the cheater is convicted, every allowed draw of the epoch's frozen table
                # lands on it for 1 request in 27 here: the client asks again (new nonce).
                assert e.code == "no_executor" and not may_execute(ledger.state, cheater), e
                continue
            by_executor[completion.executor] = by_executor.get(completion.executor, 0) + 1
            served.append(completion.inference_id)
            i += 1
        assert by_executor.get(KEYS[CHEATER].peer_id, 0) >= 1, by_executor
        # Every Finish commits; the inferences close in this epoch at the latest.
        # Closed, or started, settled and already pruned with its epoch (still remembered as seen).
        await eventually(lambda: all(request_seen(ledger.state, iid)
                                     and ((r := ledger.state.inference(iid)) is None or r.status != "started")
                                     for iid in served), 120, "every request's Finish to commit")
        last_epoch = ledger.state.epoch
        await eventually(lambda: all(n.replica.height > settlement_height(last_epoch, PARAMS)  # type: ignore[union-attr]
                                     for n in nodes), 300, "settlement of the epochs that hold the requests")
        state = ledger.state
        honest = [k.peer_id for k in KEYS[1:CHEATER]]
        caught = [e for e in range(1, state.epoch) if (s := state.epoch_summary(e)) is not None
                  and (row := s.participant(cheater)) is not None and row.inferences and row.fees_refunded]
        assert caught, "the cheater was never caught"
        summary = state.epoch_summary(caught[0])
        assert summary is not None
        row = summary.participant(cheater)
        assert row is not None and row.fees_paid == 0 and row.executor_reward == 0 and row.caught
        # Weight falls at settlement by bounded steps (genesis max_weight_shift_ppm of the total
        # voting power per epoch), and the sanction names it for no new Start meanwhile.
        assert row.reputation_after == 0 and row.weight_after < row.weight
        assert not may_execute(state, cheater)  # and it is drawn no more
        assert dict(summary.refunds).get(CLIENT.peer_id, 0) == row.fees_refunded
        # Honest work is paid and never refunded, in whichever epochs of the run it fell.
        paid = [row for e in range(1, state.epoch) if (s := state.epoch_summary(e)) is not None
                for p in honest if (row := s.participant(p)) is not None]
        assert any(p.fees_paid > 0 for p in paid), "honest executors were not paid"
        assert all(p.fees_refunded == 0 for p in paid), "an honest executor was refunded away"
        assert state.balance(CLIENT.peer_id) <= balance_before
        hashes = {n.replica.app_hash_at(state.height) for n in nodes}  # type: ignore[union-attr]
        assert len(hashes - {None}) == 1
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in nodes:
            node.engines.clear()  # the engine belongs to the module fixture, not to the node
            await node.close()
