"""Shared by the tests that build a network on the in-memory hub with the real tiny model."""

from __future__ import annotations

import asyncio
import subprocess
import time

from gonka_p2p.actors.node import Node
from gonka_p2p.client import GonkaClient
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine

MODEL = "tiny-llama"


async def start_network(hub: MemoryHub, engine: Engine, n: int = 3) -> list[Node]:
    """n nodes, the first one TA only, all joined through the first and announced."""
    nodes = []
    for i in range(n):
        key = Keypair.from_seed(f"node{i}".encode())
        models = [] if i == 0 else [MODEL]
        bootstrap = [nodes[0].service.listen_addrs[0]] if nodes else []
        node = Node(NodeConfig(models=models, bootstrap=bootstrap, engine="torch"), key,
                    hub.service(key), weights=None)
        if models:
            node.engines[MODEL] = engine
        await node.join()
        await node.start_actors()
        nodes.append(node)
    for node in nodes[1:]:  # full mesh, as the directory would dial on announcements
        for other in nodes[1:]:
            if other is not node:
                await node.service.connect(other.service.listen_addrs[0])
    for node in nodes:
        await node.directory.announce_once()
    await asyncio.sleep(0.05)
    return nodes


async def client_for(hub: MemoryHub, ta: Node, seed: bytes = b"client") -> GonkaClient:
    key = Keypair.from_seed(seed)
    service = hub.service(key)
    await service.start()
    peer = await service.connect(ta.service.listen_addrs[0])
    return GonkaClient(key, service, peer)


def ready_address(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The address a ``gonka-p2p node`` process prints on its READY line; None when it exits
    or ``timeout`` passes first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return line.split()[1]
        if not line and proc.poll() is not None:
            return None
    return None
