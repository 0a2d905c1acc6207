"""Nobody is charged for an answer they did not get (issue 14: every request completed with a
verified answer, or refunded; none charged without an answer).

Two ways a client used to pay for nothing, both found by the testnet:

* its relay broke after the executor finished (the TA reset the stream, died, or a partition
  cut it): the ledger charged it for the answer the executor committed to. Now the executor
  and the TA keep the answer as the executor signed it until the epoch settles, and the
  client library fetches it over ``/gonka/answer/1`` -- from the executor, else the TA --
  checked as a live stream is and against the ledger's response hash. Only the client that
  signed the request may fetch it; a tampered or substituted answer is refused.
* it gave up before its first token (or its HTTP client hung up on the OpenAI gateway), and
  the executor went on, finished and was paid. Now the TA's handler is cancelled when its
  client's stream goes away (and the gateway's route when the HTTP connection closes), which
  stops the executor: the Start, if any, expires refunded.

The executor is the real tiny model; the network the in-memory hub, and real libp2p on
127.0.0.1 where the transport is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from helpers import (
    MODEL,
    ServiceFactory,
    StallingEngine,
    eventually,
    free_port,
    libp2p_service,
    memory_services,
    serving,
    ta_and_executor,
)

from gonka_p2p.actors.node import Node
from gonka_p2p import client as client_module
from gonka_p2p.client import AnswerExpired, AnswerInDoubt, GonkaClient, StreamStalled, build_request
from gonka_p2p.gossip.service import SendFrame, StreamHandler
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.openai.auth import GonkaAuth
from gonka_p2p.openai import gateway
from gonka_p2p.openai.gateway import Gateway
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import (
    AnswerQuery,
    InferenceFailed,
    InferenceFinished,
    InferenceRequest,
    TokenBatch,
    inference_id,
    response_hash,
)
from gonka_p2p.wire.protocols import ANSWER_PROTOCOL, INFER_PROTOCOL, QUERY_PROTOCOL
from gonka_p2p.wire.stream import FinishedEvent, ProtocolViolation, RequestRejected, StartedEvent, TokensEvent

CLIENT = Keypair.from_seed(b"answer-client")
STRANGER = Keypair.from_seed(b"answer-stranger")
NODE_KEYS = [Keypair.from_seed(f"answer-node-{i}".encode()) for i in range(2)]  # a TA only, an executor
GUARD_S = 60.0  # far above a settled inference or an expiry here, far below a hang
PROMPT = [("user", "Count to twenty.")]

def ledger_genesis() -> Genesis:
    return devnet_genesis([k.public_key for k in NODE_KEYS], [CLIENT.peer_id, STRANGER.peer_id],
                          models=(MODEL,), inference_deadline_blocks=3, genesis_time_ms=int(time.time() * 1000))


def network(make_service: ServiceFactory, engine: Engine | StallingEngine, tmp_path: Path,
            genesis: Genesis | None) -> AbstractAsyncContextManager[list[Node]]:
    """A TA-only node and an executor serving ``engine``; with ``genesis`` each runs a ledger
    replica. The TA's stall timeout is far away: only the client's leaving stops a holding executor."""
    return ta_and_executor(make_service, engine, NODE_KEYS, stall_timeout=10 * GUARD_S, genesis=genesis,
                           data_dir=tmp_path)


async def client_of(ta: Node, key: Keypair = CLIENT) -> GonkaClient:
    service = ta.service._hub.service(key)  # type: ignore[attr-defined]
    await service.start()
    return GonkaClient(key, service, await service.connect(ta.service.listen_addrs[0]))


def cut_after(frames: int, handler: StreamHandler) -> StreamHandler:
    """The TA's handler, its relay to the client cut after ``frames`` frames: the TA relays the
    whole answer (the executor finishes, the ledger charges), the client sees a reset."""

    async def cut(opener: str, frame: bytes, send: SendFrame) -> None:
        sent = 0

        async def first_frames(out: bytes) -> None:
            nonlocal sent
            sent += 1
            if sent <= frames:
                await send(out)

        await handler(opener, frame, first_frames)
        raise ConnectionResetError("the relay to the client was cut")

    return cut


async def withhold(opener: str, frame: bytes, send: SendFrame) -> None:
    raise ConnectionResetError("this node serves no answers")


async def settled(client: GonkaClient, request: bytes) -> None:
    iid = inference_id(open_envelope(request, InferenceRequest))
    await eventually(lambda: client.inference(iid), GUARD_S, "the inference to settle",
                     until=lambda r: r.status == "settled", interval=0.05)


async def collect(client: GonkaClient, request: bytes) -> list[object]:
    async with asyncio.timeout(GUARD_S):
        return [event async for event in client.stream_request(request, recovery_timeout=GUARD_S)]


def tokens(events: list[object]) -> list[int]:
    return [t for e in events if isinstance(e, TokensEvent) for t in e.token_ids]


# --- a relay cut after the executor finished ---------------------------------------------------


@pytest.mark.parametrize("served_by", ["executor", "ta"])
async def test_a_relay_cut_after_the_executor_finished_still_returns_the_verified_answer(
        engine: Engine, tmp_path: Path, served_by: str) -> None:
    """Started and one token reach the client, then the stream is reset; the client recovers the
    rest from the executor (or, the executor withholding, from the TA's copy) once settled."""
    async with network(memory_services(), engine, tmp_path, ledger_genesis()) as nodes:
        ta, executor = nodes
        ta.service.set_stream_handler(INFER_PROTOCOL, cut_after(2, ta.ta._handle))
        if served_by == "ta":
            executor.service.set_stream_handler(ANSWER_PROTOCOL, withhold)
        client = await client_of(ta)
        request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)
        events = await collect(client, request)
        assert [type(e) for e in events[:2]] == [StartedEvent, TokensEvent]
        assert isinstance(events[-1], FinishedEvent) and len(tokens(events)) == events[-1].completion_tokens
        iid = inference_id(open_envelope(request, InferenceRequest))
        record = await client.inference(iid)
        assert record.status == "settled" and record.response_hash == response_hash(tokens(events))
        kept = InferenceArtifact.decode((await executor.artifacts.store.get(iid))[1])  # type: ignore[index]
        assert tokens(events) == list(kept.completion_ids)
        text = "".join(e.text for e in events if isinstance(e, TokensEvent))
        assert text == engine.decode(tokens(events))


@pytest.mark.slow
@pytest.mark.libp2p
async def test_a_relay_cut_over_libp2p_is_recovered(engine: Engine, tmp_path: Path) -> None:
    async with network(libp2p_service, engine, tmp_path,
                       ledger_genesis()) as nodes:
        ta = nodes[0]
        ta.service.set_stream_handler(INFER_PROTOCOL, cut_after(2, ta.ta._handle))
        async with await GonkaClient.connect(ta.service.listen_addrs[0], CLIENT) as client:
            request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)
            events = await collect(client, request)
            assert isinstance(events[0], StartedEvent) and isinstance(events[-1], FinishedEvent)
            record = await client.inference(inference_id(open_envelope(request, InferenceRequest)))
            assert record.response_hash == response_hash(tokens(events))


# --- a TA that says the executor failed, while beyond a partition it finished ------------------


def partitioned_relay(frames: int, send: SendFrame, ta: Keypair) -> tuple[SendFrame, asyncio.Event]:
    """A TA's relay as a partition leaves it: after ``frames`` frames its link to the executor
    is cut and it tells its client ``executor_failed`` (the event is set then), while the
    executor, on the other side, goes on (its frames go nowhere), finishes and claims the work."""
    told, sent = asyncio.Event(), 0

    async def relay(out: bytes) -> None:
        nonlocal sent
        sent += 1
        if sent <= frames:
            await send(out)
        elif not told.is_set():
            await send(seal(InferenceFailed(code="executor_failed", message="executor failed mid-stream: "
                                            "the partition cut its stream"), ta))
            told.set()

    return relay, told


def failed_after(frames: int, handler: StreamHandler, ta: Keypair, beyond: list[asyncio.Task[None]]) -> StreamHandler:
    """The TA's libp2p handler, its relay cut by a partition after ``frames`` frames."""

    async def fail(opener: str, frame: bytes, send: SendFrame) -> None:
        relay, told = partitioned_relay(frames, send, ta)
        beyond.append(asyncio.create_task(handler(opener, frame, relay)))
        await told.wait()

    return fail


def route_failed_after(frames: int, ta: Node, beyond: list[asyncio.Task[None]]) -> None:
    """The TA's route (what its OpenAI gateway calls), its relay cut by a partition after ``frames`` frames."""
    route = ta.ta.route

    async def fail(request: Signed[InferenceRequest], send: SendFrame) -> None:
        relay, told = partitioned_relay(frames, send, ta.key)
        beyond.append(asyncio.create_task(route(request, relay)))
        await told.wait()

    ta.ta.route = fail  # type: ignore[method-assign]


async def test_a_failure_the_ta_reports_after_the_start_is_raised_at_once_and_its_answer_recovered(
        engine: Engine, tmp_path: Path) -> None:
    """The short testnet lost a request so: the client got executor_failed, the executor was
    paid. The client hears the failure at once (AnswerInDoubt, a RequestRejected with its code),
    and ``recover`` returns the rest of the answer the ledger charged it for."""
    beyond: list[asyncio.Task[None]] = []
    async with network(memory_services(), engine, tmp_path, ledger_genesis()) as nodes:
        ta = nodes[0]
        ta.service.set_stream_handler(INFER_PROTOCOL, failed_after(2, ta.ta._handle, ta.key, beyond))
        client = await client_of(ta)
        request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)
        streamed: list[object] = []
        with pytest.raises(AnswerInDoubt) as doubt:
            async with asyncio.timeout(GUARD_S):
                async for event in client.stream_request(request, recovery_timeout=GUARD_S):
                    streamed.append(event)
        assert isinstance(doubt.value, RequestRejected) and doubt.value.code == "executor_failed"
        assert [type(e) for e in streamed] == [StartedEvent, TokensEvent]
        rest = await client.recover(doubt.value, timeout=GUARD_S)
        assert isinstance(rest[-1], FinishedEvent) and not any(isinstance(e, StartedEvent) for e in rest)
        record = await client.inference(doubt.value.inference_id)
        assert record.status == "settled" and record.response_hash == response_hash(tokens(streamed + rest))
        await asyncio.gather(*beyond)


async def test_recovering_an_answer_the_executor_never_finished_ends_refunded(engine: Engine, tmp_path: Path) -> None:
    """The executor really died (here: holds after its first token for good): the ledger expires
    the Start, and ``recover`` says so instead of waiting out its timeout."""
    beyond: list[asyncio.Task[None]] = []
    holding = StallingEngine(engine, 1)
    async with network(memory_services(), holding, tmp_path, ledger_genesis()) as nodes:
        ta = nodes[0]
        ta.service.set_stream_handler(INFER_PROTOCOL, failed_after(1, ta.ta._handle, ta.key, beyond))
        client = await client_of(ta)
        request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)
        with pytest.raises(AnswerInDoubt) as doubt:
            async with asyncio.timeout(GUARD_S):
                async for _ in client.stream_request(request):
                    pass
        with pytest.raises(AnswerExpired):
            await client.recover(doubt.value, timeout=GUARD_S)
        holding.release.set()
        await asyncio.gather(*beyond)


# --- a relay cut before the client's first frame ------------------------------------------------


def silent_towards_the_client(handler: StreamHandler, beyond: list[asyncio.Task[None]] | None) -> StreamHandler:
    """The TA's handler behind a partition that cut its client before the first frame: the
    client hears nothing; with ``beyond`` the TA still serves the request on its side (the
    executor finishes, the ledger charges), without it the TA never starts an executor."""

    async def silent(opener: str, frame: bytes, send: SendFrame) -> None:
        async def nowhere(out: bytes) -> None:
            pass

        if beyond is not None:
            beyond.append(asyncio.create_task(handler(opener, frame, nowhere)))
        await asyncio.Event().wait()  # until the client's stream goes away

    return silent


@contextlib.asynccontextmanager
async def behind_a_silent_relay(engine: Engine, tmp_path: Path, beyond: list[asyncio.Task[None]] | None
                                ) -> AsyncIterator[tuple[GonkaClient, bytes]]:
    """A client and its request, the TA's handler ``silent_towards_the_client``."""
    async with network(memory_services(), engine, tmp_path, ledger_genesis()) as nodes:
        ta = nodes[0]
        ta.service.set_stream_handler(INFER_PROTOCOL, silent_towards_the_client(ta.ta._handle, beyond))
        yield await client_of(ta), build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)


async def test_a_relay_cut_before_the_first_frame_is_recovered_from_the_ledger(
        engine: Engine, tmp_path: Path) -> None:
    """The 30-minute testnet charged a client so: a partition cut the circuit to its TA (behind
    a NAT) before the first frame, the client's idle timeout fired (StreamStalled), and the
    executor finished and was paid. The client now asks the ledger before giving up."""
    beyond: list[asyncio.Task[None]] = []
    async with behind_a_silent_relay(engine, tmp_path, beyond) as (client, request):
        async with asyncio.timeout(GUARD_S):
            events = [e async for e in client.stream_request(request, timeout=1.0, recovery_timeout=GUARD_S)]
        assert isinstance(events[0], StartedEvent) and isinstance(events[-1], FinishedEvent)
        assert len(tokens(events)) == events[-1].completion_tokens > 0
        record = await client.inference(inference_id(open_envelope(request, InferenceRequest)))
        assert record.status == "settled" and record.response_hash == response_hash(tokens(events))
        assert events[0].executor == record.executor
        await asyncio.gather(*beyond)


async def test_a_silent_ta_that_started_nothing_is_given_up_once_the_ledger_has_no_such_inference(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "UNSTARTED_GRACE_S", 0.5)
    async with behind_a_silent_relay(engine, tmp_path, None) as (client, request):
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(StreamStalled, match="sent nothing for 1 s"):
                async for _ in client.stream_request(request, timeout=1.0, recovery_timeout=GUARD_S):
                    pass
        assert not (await client.inference(inference_id(open_envelope(request, InferenceRequest)))).found


# --- only the client fetches, and only the answer the ledger settled --------------------------


@contextlib.asynccontextmanager
async def a_settled_answer(engine: Engine, tmp_path: Path
                           ) -> AsyncIterator[tuple[Node, Node, GonkaClient, bytes, list[object]]]:
    """The TA, the executor, a client, its request and the answer it streamed, settled."""
    async with network(memory_services(), engine, tmp_path, ledger_genesis()) as (ta, executor):
        client = await client_of(ta)
        request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=8)
        answered = await collect(client, request)
        await settled(client, request)
        yield ta, executor, client, request, answered


async def test_only_the_client_that_signed_the_request_fetches_its_answer(engine: Engine, tmp_path: Path) -> None:
    async with a_settled_answer(engine, tmp_path) as (ta, executor, client, request, answered):
        stranger = await client_of(ta, STRANGER)
        relaying_ta = GonkaClient(ta.key, ta.service, executor.key.peer_id)  # the gateway fetches so
        assert tokens(await relaying_ta.fetch_answer(request, executor.key.peer_id)) == tokens(answered)
        for node in (executor, ta):
            assert tokens(await client.fetch_answer(request, node.key.peer_id)) == tokens(answered)
            with pytest.raises(RequestRejected) as refused:
                await stranger.fetch_answer(request, node.key.peer_id)
            assert refused.value.code == "not_found"
        iid = inference_id(open_envelope(request, InferenceRequest))
        overheard = seal(AnswerQuery(inference_id=iid, reader=CLIENT.peer_id, timestamp_ms=int(ta.ta._clock() * 1000)),
                         CLIENT)
        stale = seal(AnswerQuery(inference_id=iid, reader=STRANGER.peer_id, timestamp_ms=0), CLIENT)
        for query, code in ((overheard, "bad_signature"), (stale, "stale")):
            reply = await stranger.service.request(executor.key.peer_id, ANSWER_PROTOCOL, query)
            assert open_envelope(reply, InferenceFailed).message.code == code


async def test_a_recovering_client_reaches_an_executor_it_never_met_by_its_ledger_addresses(
        engine: Engine, tmp_path: Path) -> None:
    """The 30-minute testnet lost an answer so: its executor had joined after the load client
    connected, so the client could not dial it, and the TA had not kept the cut answer. The
    ledger's reply now names the executor's addresses, and recovery dials them first."""
    async with a_settled_answer(engine, tmp_path) as (ta, executor, client, request, _):
        record = await client.inference(inference_id(open_envelope(request, InferenceRequest)))
        registered = ta.replica.state.participant(executor.key.peer_id)  # type: ignore[union-attr]
        assert registered is not None and record.executor_addrs == list(registered.addrs)
        assert executor.key.peer_id not in client.service.connected_peers()
        await client._reach(executor.key.peer_id, [f"/memory/gone/p2p/{STRANGER.peer_id}",
                                                    *executor.service.listen_addrs],
                            asyncio.get_running_loop().time() + GUARD_S)
        assert executor.key.peer_id in client.service.connected_peers()


@pytest.mark.libp2p
async def test_a_lying_executors_addresses_neither_hide_it_nor_hold_the_client_past_its_deadline() -> None:
    """An executor chooses the addresses its InferenceStarted names: dead ones before its live
    one must not keep a recovering client from it (py-libp2p dialed the first one it heard of,
    whatever the client asked), and ones that accept and never answer may cost the client its
    recovery, but not more time than the recovery's own deadline."""
    hosts = executor, near, far = [libp2p_service(key) for key in (NODE_KEYS[1], CLIENT, STRANGER)]
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; no handshake ever comes
    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(*(host.start() for host in hosts))
        dead = [f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{executor.peer_id}" for _ in range(3)]
        await GonkaClient(CLIENT, near, executor.peer_id)._reach(
            executor.peer_id, [*dead, *executor.listen_addrs], loop.time() + GUARD_S)
        assert executor.peer_id in near.connected_peers()
        began = loop.time()
        await GonkaClient(STRANGER, far, executor.peer_id)._reach(
            executor.peer_id, [f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}"] * 8, began + 2.0)
        assert loop.time() - began < 4.0  # not the 8 dials of 5 s each it was
        assert executor.peer_id not in far.connected_peers()
    finally:
        silent.close()
        await asyncio.gather(*(host.stop() for host in hosts))


async def test_a_tampered_or_substituted_answer_is_refused(engine: Engine, tmp_path: Path) -> None:
    """A stored frame altered in transit or on disk fails its signature; an executor that signs
    another answer than the one it finished on the ledger fails the ledger's response hash."""
    async with a_settled_answer(engine, tmp_path) as (ta, executor, client, raw, _):
        request = open_envelope(raw, InferenceRequest)
        store = executor.artifacts.store
        artifact = InferenceArtifact.decode((await store.get(inference_id(request)))[1])  # type: ignore[index]
        _, frames = await store.answer(inference_id(request))  # type: ignore[misc]

        flipped = [*frames[:1], frames[1][:-1] + bytes([frames[1][-1] ^ 1]), *frames[2:]]
        await store.put(request, artifact, flipped)
        with pytest.raises(ProtocolViolation, match="bad frame"):
            await client.fetch_answer(raw, executor.key.peer_id)

        await store.put(request, artifact, other_answer(frames, executor.key))
        with pytest.raises(ProtocolViolation, match="not the one the ledger settled"):
            await client.fetch_answer(raw, executor.key.peer_id)


def other_answer(frames: list[bytes], key: Keypair) -> list[bytes]:
    """The executor's answer with its first token changed, every frame re-signed by the executor
    and the final hash made to match: a consistent stream, but not what the ledger settled."""
    out, ids = [frames[0]], []
    for frame in frames[1:]:
        msg = open_envelope(frame, TokenBatch, InferenceFinished).message
        if isinstance(msg, TokenBatch):
            changed = [(msg.token_ids[0] + 1) % 50, *msg.token_ids[1:]] if not ids else msg.token_ids
            ids += changed
            out.append(seal(replace(msg, token_ids=changed), key))
        else:
            out.append(seal(replace(msg, response_hash=response_hash(ids)), key))
    return out


# --- a client that gives up is not charged -------------------------------------------------------


async def test_a_client_that_gives_up_before_its_first_token_is_not_charged(engine: Engine, tmp_path: Path) -> None:
    genesis = ledger_genesis()
    holding = StallingEngine(engine, 0)
    async with network(memory_services(), holding, tmp_path, genesis) as nodes:
        client = await client_of(nodes[0])
        before = (await client.balance()).balance
        request = build_request(CLIENT, PROMPT, genesis.chain_id, model=MODEL, max_tokens=12)
        async with asyncio.timeout(GUARD_S):
            async for event in client.stream_request(request):
                assert isinstance(event, StartedEvent)
                break  # gives up: the stream is abandoned
            await holding.abandoned.wait()
        await not_charged_for(client, inference_id(open_envelope(request, InferenceRequest)), before, genesis)


async def not_charged_for(client: GonkaClient, iid: bytes, before: int, genesis: Genesis) -> None:
    """The inference expires unfinished and the client is out only the Start's fee."""
    record = await eventually(lambda: client.inference(iid), GUARD_S, "the abandoned inference to expire",
                              until=lambda r: r.status == "expired", interval=0.05)
    assert record.cost == 0
    assert (await client.balance()).balance == before - genesis.params.tx_fee


@pytest.mark.libp2p
async def test_a_client_reset_over_libp2p_stops_the_executor_before_its_first_token(
        engine: Engine, tmp_path: Path) -> None:
    """The TA waits for the executor's first token, so no send of its own would notice the
    client's reset: the transport cancels its handler, which resets the executor's stream."""
    holding = StallingEngine(engine, 0)
    async with network(libp2p_service, holding, tmp_path, None) as nodes:
        async with await GonkaClient.connect(nodes[0].service.listen_addrs[0], CLIENT) as client:
            async with asyncio.timeout(GUARD_S):
                async for event in client.stream_chat(PROMPT, model=MODEL, max_tokens=12):
                    assert isinstance(event, StartedEvent)
                    break
                await holding.abandoned.wait()


def gateway_of(ta: Node, recovery_s: float = 0.0) -> AbstractAsyncContextManager[str]:
    """The OpenAI gateway in front of ``ta``, serving; yields its base URL."""
    return serving(Gateway(ta.ta, ta.directory, recovery_s=recovery_s))


def http_body(stream: bool, max_tokens: int = 12) -> dict[str, object]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}],
            "max_tokens": max_tokens, "stream": stream, "logprobs": True}
    return body | ({"stream_options": {"include_usage": True}} if stream else {})


def sse_events(body: str) -> list[dict[str, object]]:
    """The JSON events of an SSE body (comments and [DONE] left out)."""
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@contextlib.asynccontextmanager
async def through_a_cut_relay(engine: Engine | StallingEngine, tmp_path: Path, frames: int,
                              body: dict[str, object]) -> AsyncIterator[tuple[httpx.Response, Node]]:
    """POST ``body`` to the gateway of a TA whose relay a partition cuts after ``frames`` frames
    (the executor goes on beyond it); yields the response and the TA, the network still up."""
    beyond: list[asyncio.Task[None]] = []
    genesis = ledger_genesis()
    async with network(memory_services(), engine, tmp_path, genesis) as nodes:
        ta = nodes[0]
        route_failed_after(frames, ta, beyond)
        async with gateway_of(ta, recovery_s=GUARD_S) as url:
            async with httpx.AsyncClient(auth=GonkaAuth(CLIENT, genesis.chain_id), timeout=GUARD_S) as http:
                response = await http.post(f"{url}/chat/completions", json=body)
        yield response, ta
        await asyncio.gather(*beyond)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_http_answer_a_partition_cut_from_the_ta_is_recovered_by_the_gateway(
        engine: Engine, tmp_path: Path, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP client has no libp2p host to recover with, so the short testnet's partition could
    leave one charged without an answer. The gateway recovers for it: it waits for its TA's
    ledger to settle the inference, fetches the answer from the executor (which serves the TA
    the ledger names) and sends the rest, every frame checked, as if nothing had happened; a
    streamed answer says it is waiting meanwhile, so the client's idle timeout does not cut it."""
    monkeypatch.setattr(gateway, "KEEPALIVE_S", 0.01)
    greedy = http_body(stream) | {"temperature": 0}  # a sampled answer may end within the 2 frames
    async with through_a_cut_relay(engine, tmp_path, 2, greedy) as (response, ta):
        assert response.status_code == 200, response.text
        if stream:
            events = sse_events(response.text)
            assert not any("error" in e for e in events), events
            assert ": waiting" in response.text
            assert events[-2]["choices"][0]["finish_reason"] is not None  # type: ignore[index]
            usage = events[-1]["usage"]
            shown = [t for e in events for c in e["choices"] if c.get("logprobs")  # type: ignore[union-attr]
                     for t in c["logprobs"]["content"]]
        else:
            usage, shown = response.json()["usage"], response.json()["choices"][0]["logprobs"]["content"]
        record = ta.replica.state.inference(bytes.fromhex(response.headers["X-Gonka-Inference-Id"]))  # type: ignore[union-attr]
        assert record is not None and record.status.value == "settled"
        assert usage["completion_tokens"] == record.completion_tokens > 2  # type: ignore[index]
        # usage is the Finished frame's count, which the gateway's verifier held to every token it
        # received, recovered ones included (and to their response hash); logprobs leave out special
        # tokens, which a sampled answer may hold more than one of (a fresh clone's had two)
        assert 0 < len(shown) <= record.completion_tokens


async def test_an_http_answer_whose_executor_never_finished_fails_saying_it_was_refunded(
        engine: Engine, tmp_path: Path) -> None:
    holding = StallingEngine(engine, 1)
    async with through_a_cut_relay(holding, tmp_path, 1, http_body(stream=False)) as (response, _):
        assert response.status_code == 502 and "refunded" in response.json()["error"]["message"], response.text
        holding.release.set()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_http_client_that_hangs_up_on_the_gateway_is_not_charged(
        engine: Engine, tmp_path: Path, stream: bool) -> None:
    """A whole answer sends no byte before its end, so only the connection tells the gateway
    that its client left; it cancels the route, which stops the executor."""
    genesis = ledger_genesis()
    holding = StallingEngine(engine, 0)
    async with network(memory_services(), holding, tmp_path, genesis) as nodes:
        ta = nodes[0]
        client = await client_of(ta)
        before = (await client.balance()).balance
        async with gateway_of(ta) as url:
            async with httpx.AsyncClient(auth=GonkaAuth(CLIENT, genesis.chain_id), timeout=GUARD_S) as http:

                async def ask() -> None:
                    async with http.stream("POST", f"{url}/chat/completions", json=http_body(stream)) as response:
                        async for _ in response.aiter_bytes():
                            pass

                asking = asyncio.create_task(ask())
                async with asyncio.timeout(GUARD_S):
                    await holding.holding.wait()
                asking.cancel()  # the HTTP client hangs up while the executor holds
                await asyncio.wait({asking})
            async with asyncio.timeout(GUARD_S):
                await holding.abandoned.wait()
        started = await eventually(lambda: list(ta.replica.state.inferences.rows), GUARD_S,  # type: ignore[union-attr]
                                   "the gateway's Start to commit")
        assert len(started) == 1
        await not_charged_for(client, started[0], before, genesis)


@pytest.mark.slow
@pytest.mark.libp2p
async def test_a_client_whose_ta_stops_answering_recovers_from_an_executor_it_never_met(
        engine: Engine, tmp_path: Path) -> None:
    """Testnet run 17 lost an answer so: its TA, throttled to 32 kbit/s, said the executor failed
    and then answered no ledger query, and the client had never met the executor (a joiner), so
    it could learn neither the ledger's record nor the executor's addresses. The executor's
    signed InferenceStarted now names its addresses, and recovery dials them first."""
    beyond: list[asyncio.Task[None]] = []
    async with network(libp2p_service, engine, tmp_path, ledger_genesis()) as nodes:
        ta, executor = nodes
        ta.service.set_stream_handler(INFER_PROTOCOL, failed_after(2, ta.ta._handle, ta.key, beyond))
        async with await GonkaClient.connect(ta.service.listen_addrs[0], CLIENT) as client:
            request = build_request(CLIENT, PROMPT, ta.ta.chain_id, model=MODEL, max_tokens=12)
            with pytest.raises(AnswerInDoubt) as doubt:
                async with asyncio.timeout(GUARD_S):
                    async for _ in client.stream_request(request, recovery_timeout=GUARD_S):
                        pass
            await asyncio.gather(*beyond)  # the executor finished, and its Finish is on its way
            assert executor.key.peer_id not in client.service.connected_peers()
            for protocol in (QUERY_PROTOCOL, ANSWER_PROTOCOL):
                ta.service.set_stream_handler(protocol, never_answer)
            rest = await client.recover(doubt.value, timeout=20.0)
            assert isinstance(rest[-1], FinishedEvent)


async def never_answer(opener: str, frame: bytes, send: SendFrame) -> None:
    await asyncio.Event().wait()
