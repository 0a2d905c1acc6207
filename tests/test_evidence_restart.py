"""Evidence outlives its executor's process: an executor killed with SIGKILL right after it
served an inference, and restarted from its data directory, still serves the artifact it
committed to, and a validator that fetches it from that executor alone judges it valid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import MODEL, DevnetNode, eventually, free_port, gonka

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

def serve_only_node1(path: Path) -> None:
    """Only node 1 runs an engine, so only it may be listed as serving the model: a draw of
    another would be refused, and three draws all missing it fail the request (1 time in 8)."""
    head, *participants = path.read_text().split("[[participants]]")
    served = 'models = ["%s"]' % MODEL
    assert all(served in p for p in participants)
    participants = [p if i == 1 else p.replace(served, "models = []") for i, p in enumerate(participants)]
    path.write_text("[[participants]]".join([head, *participants]))


async def fetch(service: Libp2pService, key: Keypair, executor: DevnetNode, inference_id: bytes) -> ArtifactReply:
    """The evidence as ``executor`` serves it to the request's client (``key``, ``service``'s own:
    a query must be signed by its stream's opener, and the client may read its own evidence)."""
    query = seal(ArtifactQuery(inference_id=inference_id), key)
    return open_envelope(await service.request(executor.peer_id, ARTIFACT_PROTOCOL, query, timeout=30),
                         ArtifactReply).message


async def test_a_killed_executor_restarts_serving_its_evidence_and_it_passes_validation(
        tmp_path: Path) -> None:
    init = gonka("init", "--nodes", "3", "--clients", "1", "--model", MODEL, "--out", "net", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    net = tmp_path / "net"
    serve_only_node1(net / "genesis.toml")
    genesis = load_genesis(net / "genesis.toml")
    ports = [free_port() for _ in range(3)]
    executor_args = ("--engine", "torch", "--model", MODEL)
    ta = DevnetNode(net, 0, ports[0], None)
    nodes = [ta]
    service: Libp2pService | None = None
    try:
        ta.wait_ready()
        nodes += [DevnetNode(net, 1, ports[1], ta.addr, *executor_args, executor=True),
                  DevnetNode(net, 2, ports[2], ta.addr)]
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
        served = await fetch(service, key, executor, completion.inference_id)

        # Killed right after the client got InferenceFinished: what it acknowledged is on disk.
        executor.proc.kill()
        executor.proc.wait(timeout=30)
        assert (net / "node1.key-ledger" / "artifacts.sqlite").exists()
        nodes[1] = executor = DevnetNode(net, 1, ports[1], ta.addr, *executor_args, executor=True)
        executor.wait_ready()
        await service.connect(executor.addr)
        after = await fetch(service, key, executor, completion.inference_id)
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
