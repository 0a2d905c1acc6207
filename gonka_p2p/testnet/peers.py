"""The harness's helper processes' side of the network: one libp2p host, one client per participant.

The load generator and the observer each run in their own namespace as a
``python -m`` process; both dial every participant by its fixed address and
re-dial a participant that dropped (restarted, frozen, partitioned) on the
next call rather than giving up on it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from gonka_p2p.client import GonkaClient, NetworkUnavailable
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.service import NetworkError
from gonka_p2p.identity import Keypair

T = TypeVar("T")


class Peers:
    """Clients of every participant over one libp2p host; ``ask`` dials on demand."""

    def __init__(self, key: Keypair, listen_ip: str, addrs: list[str], chain_id: str) -> None:
        self.key = key
        self.addrs = addrs
        self.chain_id = chain_id
        self.service = Libp2pService(key, f"/ip4/{listen_ip}/tcp/0")
        self._clients: dict[int, GonkaClient] = {}

    async def __aenter__(self) -> Peers:
        await self.service.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop()

    async def client(self, i: int) -> GonkaClient:
        if i not in self._clients:
            ta = await self.service.connect(self.addrs[i])
            self._clients[i] = GonkaClient(self.key, self.service, ta, chain_id=self.chain_id)
        return self._clients[i]

    async def ask(self, i: int, question: Callable[[GonkaClient], Awaitable[T]]) -> T:
        """Ask participant ``i``; on a broken connection, forget it (the next call re-dials) and raise."""
        try:
            return await question(await self.client(i))
        except (NetworkUnavailable, NetworkError, TimeoutError, OSError):
            self._clients.pop(i, None)
            raise


def read_args(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
