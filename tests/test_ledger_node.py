"""Nodes with a ledger on the in-memory network: requests are paid for, on the ledger, end to end.

Four nodes (one TA-only, three executors sharing the tiny model), every one a
validator of a genesis that funds a client. The TA admits by the client's
available balance, records StartInference; the executor records
FinishInference; the escrow settles to the executor's pending fees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FAST, MODEL, all_announced, eventually

from gonka_p2p.actors.node import Node
from gonka_p2p.client import GonkaClient, build_request
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.wire.envelope import Signed, open_envelope
from gonka_p2p.wire.messages import InferenceRequest
from gonka_p2p.wire.stream import RequestRejected

NODE_KEYS = [Keypair.from_seed(f"ledger-node-{i}".encode()) for i in range(4)]
RICH, POOR = Keypair.from_seed(b"rich-client"), Keypair.from_seed(b"poor-client")
GENESIS = devnet_genesis([k.public_key for k in NODE_KEYS], [RICH.peer_id], models=(MODEL,))
GENESIS = type(GENESIS)(chain_id=GENESIS.chain_id, params=GENESIS.params, participants=GENESIS.participants,
                        allocations={RICH.peer_id: 10_000, POOR.peer_id: 30})


@pytest.fixture
async def nodes(engine: Engine, tmp_path: Path) -> AsyncIterator[list[Node]]:
    hub = MemoryHub()
    nodes: list[Node] = []
    for i, key in enumerate(NODE_KEYS):
        config = NodeConfig(models=[] if i == 0 else [MODEL], engine="torch", data_dir=tmp_path / f"node{i}",
                            announce_interval=0.5)
        node = Node(config, key, hub.service(key), None, GENESIS, FAST)
        if i:
            node.engines[MODEL] = engine
        await node.join()
        for other in nodes:
            await node.service.connect(other.service.listen_addrs[0])
        nodes.append(node)
    stop = asyncio.Event()
    serving = [asyncio.create_task(n.serve(stop)) for n in nodes]
    await all_announced(nodes)
    yield nodes
    stop.set()
    await asyncio.gather(*serving)
    for node in nodes:
        await node.close()


async def client(hub_node: Node, key: Keypair) -> GonkaClient:
    service = hub_node.service._hub.service(key)  # type: ignore[attr-defined]
    await service.start()
    return GonkaClient(key, service, await service.connect(hub_node.service.listen_addrs[0]))


async def settled(client: GonkaClient, inference_id: bytes, timeout: float = 15.0) -> int:
    record = await eventually(lambda: client.inference(inference_id), timeout, "the inference to settle",
                              until=lambda r: r.status == "settled", interval=0.05)
    return record.cost


async def test_a_request_is_escrowed_started_finished_and_settled(nodes: list[Node]) -> None:
    rich = await client(nodes[0], RICH)
    before = (await rich.balance()).balance
    completion = await rich.chat([("user", "Say hello.")], model=MODEL, max_tokens=6)
    cost = await settled(rich, completion.inference_id)
    assert cost == completion.prompt_tokens + completion.completion_tokens  # price 1 per token
    assert (await rich.balance()).balance == before - cost - GENESIS.params.tx_fee  # the Start's fee is the client's
    executor = next(n for n in nodes if n.key.peer_id == completion.executor)
    assert executor.replica.state.pending_fees(executor.key.peer_id) == cost  # type: ignore[union-attr]
    record = nodes[0].replica.state.inference(completion.inference_id)  # type: ignore[union-attr]
    assert record is not None and record.ta == nodes[0].key.peer_id and record.client == RICH.peer_id
    # Every replica holds the same state.
    height = min(n.replica.height for n in nodes)  # type: ignore[union-attr]
    assert len({n.replica.app_hash_at(height) for n in nodes}) == 1  # type: ignore[union-attr]
    # The executor draw follows the ledger's weights.
    assert nodes[0].directory.weights == nodes[0].replica.state.weights()  # type: ignore[union-attr]


async def test_the_ta_refuses_a_client_that_cannot_cover_the_escrow(nodes: list[Node]) -> None:
    poor = await client(nodes[0], POOR)
    with pytest.raises(RequestRejected) as e:  # escrow = (prompt bound + max_tokens) x 1 > 30
        await poor.chat([("user", "Tell me a long story about ledgers.")], model=MODEL, max_tokens=64)
    assert e.value.code == "insufficient_balance"
    assert (await poor.balance()).balance == 30  # nothing was charged


async def test_concurrent_requests_cannot_spend_one_balance_twice(nodes: list[Node]) -> None:
    """The TA reserves each admitted request's escrow until its Start commits (or the reservation lapses)."""
    hooks = nodes[0].hooks
    assert hooks is not None
    now = [0.0]
    hooks._clock = lambda: now[0]
    balance = nodes[0].replica.state.balance(RICH.peer_id)  # type: ignore[union-attr]

    def request(max_tokens: int) -> Signed[InferenceRequest]:
        return open_envelope(build_request(RICH, [("user", "Hi")], GENESIS.chain_id, model=MODEL,
                                           max_tokens=max_tokens),
                             InferenceRequest)

    big = balance * 6 // 10
    assert await hooks.admit(request(big)) is None
    verdict = await hooks.admit(request(big))
    assert verdict is not None and verdict[0] == "insufficient_balance"
    assert await hooks.admit(request(balance // 10)) is None  # what is left still buys a small one
    now[0] += 1000  # never started: the reservations lapse
    assert hooks.reserved(RICH.peer_id) == 0
    assert await hooks.admit(request(big)) is None
