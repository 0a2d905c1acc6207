"""The serving path end to end on the in-memory network with a real (tiny) model:
client -> TA -> executor -> TA -> client, and every bad input the TA must refuse."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import msgpack
import pytest
from helpers import MODEL, client_for, start_network

from gonka_p2p.actors.admission import ADHOC_CHAIN_ID
from gonka_p2p.client import (
    GonkaClient,
    build_request,
)
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import (
    ArtifactQuery,
    ArtifactReply,
    InferenceFailed,
    InferenceRequest,
    TokenBatch,
    inference_id,
    response_hash,
)
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL, INFER_PROTOCOL
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.stream import ProtocolViolation, RequestRejected, StreamVerifier


async def raw_stream(client: GonkaClient, frame: bytes) -> list[bytes]:
    return [f async for f in client.service.open_stream(client.ta, INFER_PROTOCOL, frame)]


async def test_request_streams_verified_tokens_from_another_peer(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    completion = await client.chat([("user", "Say hello.")], model=MODEL, max_tokens=12)
    assert completion.executor in {n.key.peer_id for n in nodes[1:]}
    assert 1 <= completion.completion_tokens <= 12
    # The network changes nothing: the same engine run directly gives the same tokens.
    prompt = engine.encode_chat([("user", "Say hello.")])
    direct = [s.token_id async for s in engine.generate(
        prompt, SamplingParams(max_tokens=12), seed=completion.inference_id)]
    assert completion.token_ids == direct
    assert completion.text == engine.decode(direct)


async def test_requests_spread_over_executors_by_weight(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=4)
    client = await client_for(hub, nodes[0])
    executors = set()
    for _ in range(8):
        executors.add((await client.chat([("user", "Hi")], model=MODEL, max_tokens=2)).executor)
    assert len(executors) >= 2
    assert nodes[0].key.peer_id not in executors  # a TA never executes its own requests


@pytest.mark.parametrize("case", ["bad_signature", "malformed", "stale", "replay", "unknown_model"])
async def test_ta_rejects_bad_input_with_a_clear_code(engine: Engine, case: str) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    frame = build_request(client.key, [("user", "Hi")], ADHOC_CHAIN_ID, model=MODEL, max_tokens=2)
    if case == "bad_signature":
        env = msgpack.unpackb(frame)
        env[4] = Keypair.from_seed(b"impostor").public_key
        frame = msgpack.packb(env, use_bin_type=True)
    elif case == "malformed":
        frame = b"\x93not an envelope"
    elif case == "stale":
        req = open_envelope(frame, InferenceRequest).message
        old = InferenceRequest(**{**req.__dict__, "timestamp_ms": int(time.time() * 1000) - 600_000})
        frame = seal(old, client.key)
    elif case == "unknown_model":
        frame = build_request(client.key, [("user", "Hi")], ADHOC_CHAIN_ID, model="gpt-9", max_tokens=2)
    elif case == "replay":
        assert len(await raw_stream(client, frame)) > 1  # first time: served
    (answer,) = await raw_stream(client, frame)
    failed = open_envelope(answer, InferenceFailed)
    assert failed.signer_id == nodes[0].key.peer_id
    assert failed.message.code == case
    assert failed.message.message


async def test_executor_down_before_first_token_is_retried_elsewhere(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=4)
    await nodes[1].service.stop()  # still announced as live in the TA's directory
    client = await client_for(hub, nodes[0])
    for _ in range(4):
        completion = await client.chat([("user", "Hi")], model=MODEL, max_tokens=3)
        assert completion.executor != nodes[1].key.peer_id


async def test_executor_killed_mid_stream_gives_client_a_clear_error(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=2)
    client = await client_for(hub, nodes[0])
    with pytest.raises(RequestRejected) as err:
        async for event in client.stream_chat([("user", "Count to ten.")], model=MODEL,
                                              max_tokens=64):
            if hasattr(event, "token_ids"):
                await nodes[1].service.stop()  # the only executor dies after its first token
    assert err.value.code == "executor_failed"


async def test_client_detects_a_ta_that_alters_tokens(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    frame = build_request(client.key, [("user", "Hi")], ADHOC_CHAIN_ID, model=MODEL, max_tokens=4)
    frames = await raw_stream(client, frame)
    batch = open_envelope(frames[1], TokenBatch).message
    forged = TokenBatch(**{**batch.__dict__, "token_ids": [batch.token_ids[0] + 1]})
    tampered = [frames[0], seal(forged, Keypair.from_seed(b"greedy-ta")), *frames[2:]]
    verifier = StreamVerifier(open_envelope(frame, InferenceRequest))
    with pytest.raises(ProtocolViolation):
        for f in tampered:
            verifier.accept(f)


def validators_ledger(nodes: list, *validators: str, records: dict | None = None) -> None:
    """Give every node's artifact server a committed-ledger stand-in in which ``validators``
    hold voting power and ``records`` are the inferences (the in-memory network runs no ledger;
    without one, only a request's client may read its evidence: ``may_read_evidence``)."""
    from gonka_p2p.ledger.records import EpochInfo

    ledger = SimpleNamespace(inference=(records or {}).get, epochs=SimpleNamespace(rows={
        0: EpochInfo(traffic=0, floor_ppm=0, validators=tuple((v, 1) for v in sorted(validators)))}))
    for node in nodes:
        node.artifacts.ledger = lambda: ledger


async def test_executor_serves_the_artifact_it_committed_to(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    completion = await client.chat([("user", "Hi")], model=MODEL, max_tokens=6)
    validator = nodes[0]
    validators_ledger(nodes, validator.key.peer_id)
    query = seal(ArtifactQuery(inference_id=completion.inference_id), validator.key)
    reply = open_envelope(await validator.service.request(
        completion.executor, ARTIFACT_PROTOCOL, query), ArtifactReply)
    assert reply.signer_id == completion.executor
    request = open_envelope(reply.message.request, InferenceRequest)
    assert inference_id(request) == completion.inference_id and request.signer_id == client.key.peer_id
    artifact = InferenceArtifact.decode(reply.message.artifact)
    assert artifact.completion_ids == completion.token_ids
    assert artifact.seed == completion.inference_id
    assert artifact.prompt_ids == tuple(engine.encode_chat([("user", "Hi")]))
    # The TA rebuilt the same artifact from the frames it relayed, and serves it too.
    from_ta = open_envelope(await validator.service.request(
        nodes[0].key.peer_id, ARTIFACT_PROTOCOL, query), ArtifactReply)
    assert from_ta.signer_id == nodes[0].key.peer_id
    assert from_ta.message.artifact == reply.message.artifact
    assert from_ta.message.request == reply.message.request
    missing = seal(ArtifactQuery(inference_id=b"\0" * 32), validator.key)
    failed = open_envelope(await validator.service.request(
        completion.executor, ARTIFACT_PROTOCOL, missing), InferenceFailed)
    assert failed.message.code == "not_found"


async def test_a_stranger_cannot_read_a_clients_answer_through_the_artifact_protocol(engine: Engine) -> None:
    """Attack: the answer server serves an answer only to the client that signed the request
    (or its TA) -- "a query tells a stranger nothing". The artifact server, on the same store,
    answered any peer's ``ArtifactQuery`` (inference ids are public on the ledger) with the
    artifact, whose completion ids decode to the very answer. Now it serves the evidence only
    to peers holding voting power, the inference's executor and TA, and its client; and only
    to the stream's opener, so a validator's overheard query is worth nothing replayed."""
    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    completion = await client.chat([("user", "my private question")], model=MODEL, max_tokens=6)
    iid = completion.inference_id
    executor = completion.executor
    validator = next(n for n in nodes if n.key.peer_id not in (executor, nodes[0].key.peer_id))
    validators_ledger(nodes, validator.key.peer_id,
                      records={iid: SimpleNamespace(executor=executor, ta=nodes[0].key.peer_id)})
    stranger = Keypair.from_seed(b"artifact-stranger")
    stranger_service = hub.service(stranger)
    await stranger_service.start()

    async def ask(service, signer: Keypair) -> ArtifactReply | InferenceFailed:
        frame = await service.request(executor, ARTIFACT_PROTOCOL, seal(ArtifactQuery(inference_id=iid), signer))
        try:
            return open_envelope(frame, ArtifactReply).message
        except WireError:
            return open_envelope(frame, InferenceFailed).message

    try:
        refused = await ask(stranger_service, stranger)
        replayed = await ask(stranger_service, validator.key)  # a validator's query, overheard
        readers = [await ask(client.service, client.key), await ask(validator.service, validator.key),
                   await ask(nodes[0].service, nodes[0].key)]  # the client, a validator, the TA
    finally:
        await stranger_service.stop()
    assert isinstance(refused, InferenceFailed) and refused.code == "forbidden", (
        f"a stranger read the client's answer: {refused}")
    assert isinstance(replayed, InferenceFailed) and replayed.code == "bad_signature"
    for reply in readers:
        assert isinstance(reply, ArtifactReply)
        assert InferenceArtifact.decode(reply.artifact).completion_ids == completion.token_ids


async def test_a_validator_gets_the_evidence_from_the_ta_when_the_executor_withholds_it(
        engine: Engine) -> None:
    from gonka_p2p.actors.artifact_store import ArtifactStore
    from gonka_p2p.actors.evidence_fetch import Evidence
    from gonka_p2p.actors.validator import ValidatorActor
    from gonka_p2p.inference.verification_params import VerificationParams

    hub = MemoryHub()
    nodes = await start_network(hub, engine)
    client = await client_for(hub, nodes[0])
    completion = await client.chat([("user", "Hi")], model=MODEL, max_tokens=6)
    iid = completion.inference_id
    executor = next(n for n in nodes if n.key.peer_id == completion.executor)
    committed = InferenceArtifact.decode((await executor.artifacts.store.get(iid))[1])
    record = SimpleNamespace(executor=completion.executor, ta=nodes[0].key.peer_id,
                             artifact_commitment=committed.commitment(),
                             response_hash=response_hash(completion.token_ids))
    checker = next(n for n in nodes if n not in (executor, nodes[0]))
    validators_ledger(nodes, checker.key.peer_id)
    validator = ValidatorActor(checker.service, checker.key, {}, VerificationParams(models={}), "c", None)
    withheld = ArtifactStore(None, max_bytes=1)
    await withheld.open()
    executor.artifacts.store = withheld  # the executor withholds (or went silent)
    async with validator._evidence.fetch(iid, record) as fetched:
        assert isinstance(fetched, Evidence) and fetched.artifact == committed.encode()
    nodes[0].artifacts.store = withheld
    async with validator._evidence.fetch(iid, record) as fetched:
        assert fetched is None  # nobody serves it: a withheld verdict


async def test_a_request_no_executor_can_run_is_refused_at_once(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=4)
    client = await client_for(hub, nodes[0])
    too_long = "hello " * (engine.local_model.max_context + 10)
    with pytest.raises(RequestRejected) as err:
        await client.chat([("user", too_long)], model=MODEL, max_tokens=4)
    assert err.value.code == "malformed"
    assert "context" in str(err.value)
    served = sum(n.executor.served for n in nodes)
    assert served == 0


async def test_every_executor_at_capacity_is_overloaded_not_missing(engine: Engine) -> None:
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=3)
    for node in nodes[1:]:
        node.executor._slots = asyncio.Semaphore(0)  # no free slot anywhere
    client = await client_for(hub, nodes[0])
    with pytest.raises(RequestRejected) as err:
        await client.chat([("user", "Hi")], model=MODEL, max_tokens=4)
    assert err.value.code == "overloaded"


async def test_an_executor_whose_evidence_store_is_full_claims_nothing_then_declines(engine: Engine) -> None:
    """Work whose evidence cannot be kept would read as withheld: it is not claimed, and the
    executor takes no more orders until room is freed (the TA then reports it overloaded)."""
    from gonka_p2p.actors.artifact_store import ArtifactStore

    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=2)
    full = ArtifactStore(None, max_bytes=1)
    await full.open()
    nodes[1].executor.artifacts = full
    client = await client_for(hub, nodes[0])
    with pytest.raises(RequestRejected) as err:
        await client.chat([("user", "Hi")], model=MODEL, max_tokens=4)
    assert err.value.code == "executor_failed" and "evidence store is full" in str(err.value)
    assert nodes[1].executor.served == 0 and full.refused == 1 and full.full
    with pytest.raises(RequestRejected) as err:
        await client.chat([("user", "Hi")], model=MODEL, max_tokens=4)
    assert err.value.code == "overloaded"
    assert full.refused == 1  # declined before running: nothing more was asked of the store
