"""Joining with a bootstrap address only: the genesis comes from the peers, checked against a pin.

In memory: every node serves its genesis's canonical bytes over ``/gonka/ledger/genesis/1``
(none for an ad-hoc node), and :func:`resolve_genesis` takes the ``--genesis`` file, else the
one saved in the data directory, else the bootstrap peers', refusing any that misses the pin
and saving what it fetched so that a restart needs no peer. Over real processes: a fresh key
joins a running two-node devnet with ``--bootstrap`` and ``--genesis-hash`` and reaches the
height and app hash of the others; a wrong pin ends start-up with one sentence, no traceback.
(Hostile peers' answers: ``adversarial/test_hostile_genesis.py``.)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import eventually, free_port, ready_address

from gonka_p2p.actors.genesis_exchange import (
    GENESIS_FILE,
    Answer,
    ask_genesis,
    choose_genesis,
    genesis_server,
    resolve_genesis,
)
from gonka_p2p.client import GonkaClient, NetworkUnavailable
from gonka_p2p.config import ConfigError, NodeConfig, load_config
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.verification_params import thresholds_table
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis import Genesis, GenesisError, load_genesis
from gonka_p2p.ledger.genesis_wire import genesis_bytes, genesis_from_bytes
from gonka_p2p.wire.protocols import GENESIS_PROTOCOL


def _genesis(chain_id: str = "join-test") -> Genesis:
    keys = [Keypair.from_seed(f"join{i}".encode()) for i in range(3)]
    return devnet_genesis([k.public_key for k in keys], [Keypair.from_seed(b"client").peer_id],
                          chain_id=chain_id, verification=thresholds_table())


GENESIS = _genesis()
OTHER = _genesis("another-network")


async def _server(hub: MemoryHub, seed: bytes, genesis: Genesis | None) -> MemoryService:
    service = hub.service(Keypair.from_seed(seed))
    service.set_stream_handler(GENESIS_PROTOCOL, genesis_server(genesis))
    await service.start()
    return service


# ---- the protocol --------------------------------------------------------------------------


def test_the_canonical_bytes_are_what_the_hash_hashes_and_decode_to_the_same_genesis() -> None:
    raw = genesis_bytes(GENESIS)
    back = genesis_from_bytes(raw)
    assert back == GENESIS and back.hash() == GENESIS.hash() and genesis_bytes(back) == raw
    assert GENESIS.verification, "floats of the verification table travel too"


async def test_a_peer_serves_its_genesis_and_an_adhoc_peer_serves_none() -> None:
    hub = MemoryHub()
    ledger, adhoc = await _server(hub, b"ledger", GENESIS), await _server(hub, b"adhoc", None)
    asker = hub.service(Keypair.from_seed(b"asker"))
    await asker.start()
    for server in (ledger, adhoc):
        await asker.connect(server.listen_addrs[0])
    served = await ask_genesis(asker, ledger.peer_id)
    assert served is not None and served.hash() == GENESIS.hash()
    assert await ask_genesis(asker, adhoc.peer_id) is None


# ---- which answer a joining node takes ---------------------------------------------------


def test_a_pin_takes_the_matching_genesis_and_names_the_peer_and_both_hashes_otherwise() -> None:
    good, bad = Answer("/good", GENESIS), Answer("/bad", OTHER)
    assert choose_genesis([bad, good], GENESIS.hash()) is GENESIS
    with pytest.raises(GenesisError) as e:
        choose_genesis([bad], GENESIS.hash())
    assert (f"bootstrap peer /bad serves genesis {OTHER.hash().hex()}, you pinned {GENESIS.hash().hex()}"
            in str(e.value))
    with pytest.raises(GenesisError, match="no bootstrap peer serves the genesis you pinned"):
        choose_genesis([bad, Answer("/down", error="dial failed"), Answer("/adhoc")], GENESIS.hash())


def test_without_a_pin_the_peers_are_trusted_unless_they_disagree(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_genesis([Answer("/a", GENESIS), Answer("/down", error="x")], None) is GENESIS
    assert GENESIS.hash().hex() in caplog.text, "the accepted hash is shown, for the operator to pin"
    with pytest.raises(GenesisError, match="serve different genesis records") as e:
        choose_genesis([Answer("/a", GENESIS), Answer("/b", OTHER)], None)
    assert OTHER.hash().hex() in str(e.value) and GENESIS.hash().hex() in str(e.value)


def test_peers_without_a_ledger_make_an_adhoc_node_and_silent_peers_an_error() -> None:
    assert choose_genesis([Answer("/adhoc"), Answer("/down", error="x")], None) is None
    with pytest.raises(GenesisError, match="no bootstrap peer is reachable:\n  bootstrap peer /down is "
                                           "unreachable: dial failed"):
        choose_genesis([Answer("/down", error="dial failed", unreachable=True)], GENESIS.hash())
    with pytest.raises(GenesisError, match="no bootstrap peer serves a genesis:\n  bootstrap peer /junk did "
                                           "not answer: malformed"):
        choose_genesis([Answer("/junk", error="malformed")], None)
    with pytest.raises(GenesisError, match="runs without a ledger"):
        choose_genesis([Answer("/adhoc")], GENESIS.hash())


def test_a_pin_must_be_a_sha256_in_hex() -> None:
    assert load_config(None, genesis_hash=GENESIS.hash().hex()).genesis_hash == GENESIS.hash().hex()
    for bad in ("abc", "zz" * 32, GENESIS.hash().hex() + "00"):
        with pytest.raises(ConfigError, match="64 hex digits"):
            load_config(None, genesis_hash=bad)


# ---- start-up order: file, data directory, peers -------------------------------------------


async def test_a_fetched_genesis_is_saved_and_a_restart_needs_no_peer(tmp_path: Path) -> None:
    hub = MemoryHub()
    server = await _server(hub, b"ledger", GENESIS)
    config = NodeConfig(key=tmp_path / "new.key", bootstrap=[server.listen_addrs[0]],
                        genesis_hash=GENESIS.hash().hex())
    assert await resolve_genesis(config, None, lambda key, listen: hub.service(key)) == GENESIS
    saved = config.ledger_dir / GENESIS_FILE
    assert load_genesis(saved).hash() == GENESIS.hash()
    assert not [p for p in saved.parent.iterdir() if p != saved], "no partial file left behind"
    await server.stop()
    assert await resolve_genesis(config, None, lambda key, listen: hub.service(key)) == GENESIS
    with pytest.raises(GenesisError, match=f"genesis saved in .* has genesis {GENESIS.hash().hex()}, "
                                           f"you pinned {OTHER.hash().hex()}"):
        await resolve_genesis(NodeConfig(key=config.key, genesis_hash=OTHER.hash().hex()), None,
                              lambda key, listen: hub.service(key))


async def test_a_genesis_file_wins_and_must_match_the_pin(tmp_path: Path) -> None:
    def no_network(key: Keypair, listen: str) -> MemoryService:
        raise AssertionError("a node given its genesis asks nobody")

    config = NodeConfig(key=tmp_path / "a.key", genesis=tmp_path / "g.toml", bootstrap=["/memory/x/p2p/y"])
    assert await resolve_genesis(config, GENESIS, no_network) is GENESIS
    pinned = NodeConfig(key=config.key, genesis=config.genesis, genesis_hash=OTHER.hash().hex())
    with pytest.raises(GenesisError, match=f"genesis file .*g.toml has genesis {GENESIS.hash().hex()}, "
                                           f"you pinned {OTHER.hash().hex()}"):
        await resolve_genesis(pinned, GENESIS, no_network)
    with pytest.raises(GenesisError, match="--genesis-hash needs a genesis to check"):
        await resolve_genesis(NodeConfig(key=config.key, genesis_hash=OTHER.hash().hex()), None, no_network)
    assert await resolve_genesis(NodeConfig(key=config.key), None, no_network) is None  # the first ad-hoc node


# ---- over real processes -------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _node(net: Path, key: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    log = net / f"{key.name}.{time.monotonic_ns()}.log"
    args = ["node", "--no-executor", "--key", str(key), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
            "--empty-block-interval", "0.5", "--announce-interval", "1", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "gonka_p2p.cli", *args], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, env=ENV)
    return proc, log


def _ready(proc: subprocess.Popen[str], log: Path) -> str:
    addr = ready_address(proc, 120)
    assert addr is not None, log.read_text()[-3000:]
    return addr


async def _status(client: GonkaClient, addr: str) -> tuple[int, bytes]:
    """(height, app hash), re-dialling once if py-libp2p dropped the connection."""
    try:
        status = await client.status()
    except NetworkUnavailable:
        await client.service.connect(addr)
        status = await client.status()
    return status.height, status.app_hash


@pytest.mark.slow
@pytest.mark.libp2p
async def test_a_fresh_key_joins_a_devnet_with_a_bootstrap_address_and_a_pin(tmp_path: Path) -> None:
    net = tmp_path / "net"
    init = subprocess.run([sys.executable, "-m", "gonka_p2p.cli", "init", "--nodes", "2", "--out", str(net)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert init.returncode == 0, init.stderr
    pin = load_genesis(net / "genesis.toml").hash().hex()
    procs = []
    try:
        first, first_log = _node(net, net / "node0.key", free_port(), "--genesis", str(net / "genesis.toml"))
        procs.append(first)
        boot = _ready(first, first_log)
        second, second_log = _node(net, net / "node1.key", free_port(), "--genesis", str(net / "genesis.toml"),
                                   "--bootstrap", boot)
        procs.append(second)
        _ready(second, second_log)

        wrong = "0" * 64
        refused = subprocess.run(
            [sys.executable, "-m", "gonka_p2p.cli", "node", "--no-executor", "--key", str(tmp_path / "w.key"),
             "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}", "--bootstrap", boot, "--genesis-hash", wrong],
            capture_output=True, text=True, env=ENV, timeout=120)
        assert refused.returncode == 1, refused.stderr
        assert "Traceback" not in refused.stderr + refused.stdout
        assert f"serves genesis {pin}, you pinned {wrong}" in " ".join(refused.stderr.split()), refused.stderr
        assert not (tmp_path / "w.key-ledger" / GENESIS_FILE).exists()

        joiner, joiner_log = _node(net, tmp_path / "fresh.key", free_port(), "--bootstrap", boot,
                                   "--genesis-hash", pin)
        procs.append(joiner)
        joined = _ready(joiner, joiner_log)
        assert load_genesis(tmp_path / "fresh.key-ledger" / GENESIS_FILE).hash().hex() == pin

        old, new = await GonkaClient.connect(boot), await GonkaClient.connect(joined)
        async with old, new:
            target = (await _status(old, boot))[0] + 3
            await eventually(lambda: _status(new, joined), 120, "the joiner to catch up",
                             until=lambda s: s[0] >= target, interval=0.25)
            both = await eventually(lambda: asyncio.gather(_status(old, boot), _status(new, joined)), 60,
                                    "one height on both", until=lambda s: s[0][0] == s[1][0], interval=0.05)
            assert both[0][1] == both[1][1], "the joiner's app hash differs from the devnet's"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
