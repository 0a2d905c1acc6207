"""Evidence outlives its executor's process: an executor killed with SIGKILL right after it
served an inference, and restarted from its data directory, still serves the artifact it
committed to, and a validator that fetches it from that executor alone judges it valid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import MODEL, eventually, free_port, ready_address

from gonka_p2p.actors.node import verification_params_of
from gonka_p2p.actors.validator import ValidatorActor
from gonka_p2p.client import GonkaClient
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.factory import load_engine
from gonka_p2p.ledger.genesis import load_genesis
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, response_hash
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL

pytestmark = [pytest.mark.slow, pytest.mark.libp2p]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


class NodeProcess:
    """``gonka-p2p node`` number ``index`` of the network in ``net``; stderr goes to a file."""

    def __init__(self, net: Path, index: int, port: int, *args: str) -> None:
        self.log = net / f"node{index}.{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gonka_p2p.cli", "node", "--key", str(net / f"node{index}.key"),
             "--genesis", str(net / "genesis.toml"), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
             "--empty-block-interval", "0.5", "--announce-interval", "1", *args],
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=ENV)
        self.peer_id = Keypair.load(net / f"node{index}.key").peer_id
        self.addr = ""

    def wait_ready(self, timeout: float = 240) -> str:
        addr = ready_address(self.proc, timeout)
        if addr is None:
            raise AssertionError(f"node not ready: {self.log.read_text()[-3000:]}")
        self.addr = addr
        return addr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def fetch(service: Libp2pService, executor: NodeProcess, inference_id: bytes) -> ArtifactReply:
    query = seal(ArtifactQuery(inference_id=inference_id), Keypair.from_seed(b"evidence-test"))
    return open_envelope(await service.request(executor.peer_id, ARTIFACT_PROTOCOL, query, timeout=30),
                         ArtifactReply).message


async def test_a_killed_executor_restarts_serving_its_evidence_and_it_passes_validation(
        tmp_path: Path) -> None:
    init = subprocess.run([sys.executable, "-m", "gonka_p2p.cli", "init", "--nodes", "3", "--clients", "1",
                           "--model", MODEL, "--out", "net"], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=120)
    assert init.returncode == 0, init.stderr
    net = tmp_path / "net"
    genesis = load_genesis(net / "genesis.toml")
    ports = [free_port() for _ in range(3)]
    executor_args = ("--engine", "torch", "--model", MODEL)
    ta = NodeProcess(net, 0, ports[0], "--no-executor")
    nodes = [ta]
    service: Libp2pService | None = None
    try:
        ta.wait_ready()
        nodes += [NodeProcess(net, 1, ports[1], "--bootstrap", ta.addr, *executor_args),
                  NodeProcess(net, 2, ports[2], "--bootstrap", ta.addr, "--no-executor")]
        for node in nodes[1:]:
            node.wait_ready()
        executor = nodes[1]
        key = Keypair.load(net / "client0.key")
        service = Libp2pService(key, "/ip4/127.0.0.1/tcp/0")
        await service.start()
        client = GonkaClient(key, service, await service.connect(ta.addr))
        await eventually(client.network_info, 60, "the TA to hear the executor announce",
                         until=lambda info: executor.peer_id in info, interval=0.5)
        completion = await client.chat([("user", "Name a colour.")], model=MODEL, max_tokens=8)
        assert completion.executor == executor.peer_id
        await service.connect(executor.addr)
        served = await fetch(service, executor, completion.inference_id)

        # Killed right after the client got InferenceFinished: what it acknowledged is on disk.
        executor.proc.kill()
        executor.proc.wait(timeout=30)
        assert (net / "node1.key-ledger" / "artifacts.sqlite").exists()
        nodes[1] = executor = NodeProcess(net, 1, ports[1], "--bootstrap", ta.addr, *executor_args)
        executor.wait_ready()
        await service.connect(executor.addr)
        after = await fetch(service, executor, completion.inference_id)
        assert (after.request, after.artifact) == (served.request, served.artifact)

        # A validator that asks this executor only (ta = executor) judges the evidence valid.
        artifact = InferenceArtifact.decode(after.artifact)
        record = SimpleNamespace(model=MODEL, executor=executor.peer_id, ta=executor.peer_id,
                                 artifact_commitment=artifact.commitment(),
                                 response_hash=response_hash(completion.token_ids),
                                 prompt_tokens=len(artifact.prompt_ids), completion_tokens=len(artifact.steps))
        validator = ValidatorActor(service, key, {MODEL: load_engine("torch", MODEL)},  # submits nothing
                                   verification_params_of(genesis), genesis.chain_id, None)
        verdict = await validator.judge(completion.inference_id, record)
        assert verdict is not None and verdict.valid, verdict
    finally:
        if service is not None:
            await service.stop()
        for node in nodes:
            node.stop()
