"""The ledger as people run it: ``gonka-p2p`` node processes over real libp2p on 127.0.0.1.

Four TA-only nodes (``--no-executor``: no model is loaded) of a network
written by ``gonka-p2p init`` commit the transfers a client submits; one is
killed with SIGKILL mid-run and restarted from its data directory: it
recovers, catches up from its peers, agrees on the app hash, and never signs
a conflicting vote (nobody holds evidence against it, and its persisted
safety state only moved forward). The CLI's ``init``, ``status`` and
``balance`` work, and fail with one clear sentence on bad input.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from pathlib import Path

import pytest
from helpers import DevnetNode, ask, eventually, free_port, gonka, height_of, wait_height

from gonka_p2p.client import GonkaClient
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.genesis import load_genesis
from gonka_p2p.ledger.transactions import Transfer
from gonka_p2p.wire.envelope import seal

pytestmark = [pytest.mark.slow, pytest.mark.libp2p]



def clean_failure(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert needle in result.stderr.lower().replace("\n", " "), result.stderr


def persisted_safety(net: Path, index: int) -> tuple[int, int, int]:
    """(height, round, step) of the last message the node signed, as it is on disk."""
    db = sqlite3.connect(f"file:{net / f'node{index}.key-ledger' / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT height, round, step FROM safety WHERE id = 0").fetchone()
    finally:
        db.close()
    return tuple(row) if row else (-1, -1, 0)


def test_init_refuses_bad_input(tmp_path: Path) -> None:
    assert gonka("init", "--nodes", "2", "--clients", "1", "--out", "net", cwd=tmp_path).returncode == 0
    assert load_genesis(tmp_path / "net" / "genesis.toml").weights()
    clean_failure(gonka("init", "--nodes", "2", "--out", "net", cwd=tmp_path), "refusing to overwrite")
    clean_failure(gonka("init", "--nodes", "0", "--out", "other", cwd=tmp_path), "at least one node")
    clean_failure(gonka("init", "--nodes", "2", "--epoch-length", "0", "--out", "other", cwd=tmp_path),
                  "epoch-length")
    clean_failure(gonka("init", "--nodes", "2", "--chain-id", "x" * 100, "--out", "other", cwd=tmp_path),
                  "chain_id")
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


async def test_a_killed_node_restarts_catches_up_and_never_equivocates(tmp_path: Path) -> None:
    assert gonka("init", "--nodes", "4", "--clients", "1", "--out", "net", cwd=tmp_path).returncode == 0
    net = tmp_path / "net"
    ports = [free_port() for _ in range(4)]
    nodes = [DevnetNode(net, 0, ports[0], None)]
    await asyncio.to_thread(nodes[0].wait_ready)
    nodes += [DevnetNode(net, i, ports[i], nodes[0].addr) for i in range(1, 4)]
    for node in nodes[1:]:
        await asyncio.to_thread(node.wait_ready)
    key = Keypair.load(net / "client0.key")
    service = Libp2pService(key, "/ip4/127.0.0.1/tcp/0")
    await service.start()
    clients = [GonkaClient(key, service, await service.connect(n.addr)) for n in nodes]
    load: asyncio.Task[None] | None = None
    try:
        # The client pays a transfer every 100 ms, through the three nodes that stay up.
        chain_id = load_genesis(net / "genesis.toml").chain_id
        sequence = (await clients[0].balance()).sequence
        submitted: list[bytes] = []

        async def pay() -> None:
            nonlocal sequence
            while True:
                raw = seal(Transfer(chain_id=chain_id, to=nodes[1].peer_id, amount=1, sequence=sequence), key)
                i = sequence % 3
                submitted.append(await ask(clients[i], lambda c: c.submit_tx(raw), nodes[i].addr))
                sequence += 1
                await asyncio.sleep(0.1)

        load = asyncio.create_task(pay())
        await wait_height(nodes[0], clients[0], 6)

        # The CLI against a running node.
        status = await asyncio.to_thread(gonka, "status", "--node", nodes[0].addr, cwd=tmp_path)
        assert status.returncode == 0 and "height" in status.stdout and "app hash" in status.stdout, status.stderr
        assert all(n.peer_id[:20] in status.stdout for n in nodes)
        balance = await asyncio.to_thread(gonka, "balance", key.peer_id, "--node", nodes[0].addr, cwd=tmp_path)
        assert balance.returncode == 0 and "balance" in balance.stdout, balance.stderr
        clean_failure(await asyncio.to_thread(gonka, "balance", "16Uiu2garbage", "--node", nodes[0].addr,
                                              cwd=tmp_path), "not a peer id")
        dead = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{nodes[0].peer_id}"
        clean_failure(await asyncio.to_thread(gonka, "status", "--node", dead, cwd=tmp_path), "cannot reach")

        # SIGKILL node 3 in the middle of things; the other three (30 of 40) carry on.
        killed_at = await height_of(nodes[3], clients[3])
        nodes[3].proc.kill()
        nodes[3].proc.wait(timeout=30)
        safety_at_kill = persisted_safety(net, 3)
        assert safety_at_kill[0] >= killed_at  # it had been voting
        await wait_height(nodes[0], clients[0], killed_at + 6)

        nodes[3] = DevnetNode(net, 3, ports[3], nodes[0].addr)
        await asyncio.to_thread(nodes[3].wait_ready)
        clients[3] = GonkaClient(key, service, await service.connect(nodes[3].addr))
        target = await height_of(nodes[0], clients[0]) + 2
        await wait_height(nodes[3], clients[3], target)
        # It votes again, and only forward. Heights it caught up on were synced, not voted
        # on, so its first new vote may come a few heights later on a loaded machine.
        await eventually(lambda: persisted_safety(net, 3) > safety_at_kill, 120,
                         f"node 3 to vote past {safety_at_kill} after its restart", interval=0.5)

        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        await wait_height(nodes[0], clients[0], target + 3)  # the last transfers commit
        common = min([await height_of(n, c) for n, c in zip(nodes, clients)])
        hashes = {await ask(c, lambda c: c.app_hash(common), n.addr) for n, c in zip(nodes, clients)}
        assert len(hashes) == 1 and None not in hashes, f"app hashes differ at height {common}"
        statuses = [await ask(c, lambda c: c.status(), n.addr) for n, c in zip(nodes, clients)]
        assert [s.evidence for s in statuses] == [0] * 4  # nobody saw an equivocation
        assert len(submitted) > 30
    finally:
        if load is not None:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        await service.stop()
        codes = [n.stop() for n in nodes]
    assert codes == [0, 0, 0, 0], [n.log.read_text()[-2000:] for n in nodes]
