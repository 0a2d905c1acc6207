"""The OpenAI-compatible gateway, driven by the unmodified official ``openai`` SDK over real
HTTP (uvicorn on 127.0.0.1) against a network on the in-memory hub running the real tiny
model: answers match the engine run directly, logprobs have OpenAI's shape, and every
error has its own status."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from helpers import serving, start_network

from gonka_p2p.actors.admission import ADHOC_CHAIN_ID
from gonka_p2p.actors.node import Node, StartupError
from gonka_p2p.actors.transfer_agent import TransferAgent
from gonka_p2p.config import ConfigError, NodeConfig, parse_http_address
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine, TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.openai.auth import (
    DEFAULT_MAX_TOKENS,
    REQUEST_HEADER,
    BodyError,
    GonkaAuth,
    parse_body,
)
from gonka_p2p.openai.format import Vocabulary, load_vocabulary, token_json
from gonka_p2p.openai.gateway import ALTERNATIVES_HEADER, ERRORS, Gateway
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import InferenceRequest, TokenBatch
from gonka_p2p.wire.schema import WireError

MODEL = "tiny-llama"
PROMPT = "Say hello."
CLIENT = Keypair.from_seed(b"openai-client")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    loaded = load_vocabulary(MODEL)
    assert loaded is not None
    return loaded


@dataclass
class Net:
    nodes: list[Node]
    url: str


@pytest.fixture
async def net(engine: Engine) -> AsyncIterator[Net]:
    nodes = await start_network(MemoryHub(), engine)
    async with serving(Gateway(nodes[0].ta, nodes[0].directory)) as url:
        yield Net(nodes, url)


def sdk(url: str, auth: httpx.Auth | None = None) -> openai.AsyncOpenAI:
    """The official SDK, changed only in base_url and the signing hook."""
    return openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                              http_client=httpx.AsyncClient(auth=auth or GonkaAuth(CLIENT)))


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 6, "temperature": 0, **extra}


async def direct(engine: Engine, inference_id: bytes, max_tokens: int) -> list[TokenStep]:
    """What the engine itself generates for PROMPT, seeded like the executor."""
    prompt = engine.encode_chat([("user", PROMPT)])
    return [s async for s in engine.generate(prompt, SamplingParams(max_tokens=max_tokens),
                                             seed=inference_id)]


def finish_reason(engine: Engine, steps: list[TokenStep]) -> str:
    return "stop" if steps[-1].token_id in engine.eos_token_ids else "length"


# --- answers ---------------------------------------------------------------------------


async def test_chat_completion_with_logprobs_is_the_engines_answer(
        net: Net, engine: Engine, vocab: Vocabulary) -> None:
    async with sdk(net.url) as client:
        resp = await client.chat.completions.create(**chat_body(
            max_tokens=8, logprobs=True, top_logprobs=3))
    assert resp.object == "chat.completion" and resp.model == MODEL
    steps = await direct(engine, bytes.fromhex(resp.id.removeprefix("chatcmpl-")), 8)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine.decode([s.token_id for s in steps])
    assert choice.finish_reason == finish_reason(engine, steps)
    prompt_tokens = len(engine.encode_chat([("user", PROMPT)]))
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        prompt_tokens, len(steps), prompt_tokens + len(steps))
    shown = [s for s in steps if not vocab.is_special(s.token_id)]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert [e.logprob for e in content] == [s.logprob for s in shown]
    for entry, step in zip(content, shown, strict=True):
        assert entry.bytes == list(vocab.token_bytes(step.token_id))
        assert [t.logprob for t in entry.top_logprobs] == list(step.top_logprobs[:3])
        assert entry.top_logprobs[0].token == entry.token  # temperature 0: the argmax
    assert b"".join(bytes(e.bytes or []) for e in content).decode() == choice.message.content


async def test_chat_stream_with_usage_and_logprobs(net: Net, engine: Engine) -> None:
    async with sdk(net.url) as client:
        stream = await client.chat.completions.create(**chat_body(
            stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2))
        chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    steps = await direct(engine, bytes.fromhex(chunks[0].id.removeprefix("chatcmpl-")), 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine.decode([s.token_id for s in steps])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == finish_reason(engine, steps) and not any(finishes[:-1])
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content or []]
    assert entries and all(len(e.top_logprobs) == 2 for e in entries)
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(steps)


async def test_sse_framing_and_headers_on_the_wire(net: Net) -> None:
    async with (httpx.AsyncClient(auth=GonkaAuth(CLIENT)) as http,
                http.stream("POST", net.url + "/chat/completions",
                            json=chat_body(stream=True)) as resp):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["X-Gonka-Executor"] in {n.key.peer_id for n in net.nodes[1:]}
        raw = (await resp.aread()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


async def test_completions_whole_and_streamed(net: Net, engine: Engine) -> None:
    async with sdk(net.url) as client:
        whole = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                                temperature=0, logprobs=2)
        stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    # The prompt runs as one user turn, so it is the chat answer to the same text.
    steps = await direct(engine, bytes.fromhex(whole.id.removeprefix("cmpl-")), 6)
    choice = whole.choices[0]
    assert choice.text == engine.decode([s.token_id for s in steps])
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(steps)


async def test_models_lists_what_live_executors_serve(net: Net) -> None:
    async with sdk(net.url) as client:
        assert [m.id async for m in client.models.list()] == [MODEL]


async def test_sync_sdk_client_signs_too(net: Net) -> None:
    def call() -> str | None:
        with openai.OpenAI(base_url=net.url, api_key="unused", max_retries=0,
                           http_client=httpx.Client(auth=GonkaAuth(CLIENT))) as client:
            return client.chat.completions.create(**chat_body()).choices[0].message.content

    assert await asyncio.to_thread(call)


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("bad, param", [({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
                                        ({"messages": []}, "messages")])
async def test_bad_parameters_are_400_naming_the_parameter(
        net: Net, bad: dict[str, Any], param: str) -> None:
    async with sdk(net.url) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(**chat_body(**bad))
    assert (err.value.code, err.value.param) == ("invalid_body", param)


async def test_unsigned_request_is_401(net: Net) -> None:
    async with openai.AsyncOpenAI(base_url=net.url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(**chat_body())
    assert err.value.code == "missing_signature" and REQUEST_HEADER in err.value.message


class TamperingAuth(GonkaAuth):
    """Signs the body, then changes it: a TA must not answer what the client did not sign."""

    def __init__(self, key: Keypair, change: dict[str, Any]) -> None:
        super().__init__(key, ADHOC_CHAIN_ID)
        self.change = change

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        signed = next(super().auth_flow(request))
        content = json.dumps({**json.loads(signed.content), **self.change}).encode()
        headers = {**signed.headers, "content-length": str(len(content))}
        yield httpx.Request(signed.method, signed.url, headers=headers, content=content)


@pytest.mark.parametrize("change", [
    {"messages": [{"role": "user", "content": "Say goodbye."}]},
    {"max_tokens": 7}, {"temperature": 0.5}, {"model": "gpt-9"},
])
async def test_body_changed_after_signing_is_401(net: Net, change: dict[str, Any]) -> None:
    async with sdk(net.url, TamperingAuth(CLIENT, change)) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(**chat_body())
    assert err.value.code == "body_mismatch"


async def test_replayed_signature_is_401(net: Net) -> None:
    body = chat_body()
    header = base64.b64encode(parse_body("chat", body).sign(CLIENT, ADHOC_CHAIN_ID)).decode()
    async with httpx.AsyncClient() as http:
        first = await http.post(net.url + "/chat/completions", json=body,
                                headers={REQUEST_HEADER: header})
        again = await http.post(net.url + "/chat/completions", json=body,
                                headers={REQUEST_HEADER: header})
    assert first.status_code == 200
    assert again.status_code == 401 and again.json()["error"]["code"] == "replay"


async def test_unknown_model_is_404(net: Net) -> None:
    async with sdk(net.url) as client:
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(**chat_body(model="gpt-9"))
    assert err.value.code == "unknown_model" and MODEL in err.value.message


async def test_a_long_prompt_fits_in_the_signed_header(net: Net) -> None:
    long_prompt = "word " * 40_000  # 200 kB: far over common HTTP header limits
    async with sdk(net.url) as client:
        with pytest.raises(openai.NotFoundError) as err:  # admitted up to the model check
            await client.chat.completions.create(**chat_body(
                model="gpt-9", messages=[{"role": "user", "content": long_prompt}]))
    assert err.value.code == "unknown_model"


async def test_unknown_path_is_an_openai_shaped_404(net: Net) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.get(net.url + "/assistants")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


async def test_no_reachable_executor_is_503(engine: Engine) -> None:
    nodes = await start_network(MemoryHub(), engine, n=2)
    await nodes[1].service.stop()  # still announced, so admitted; every draw then fails
    async with serving(Gateway(nodes[0].ta, nodes[0].directory)) as url, sdk(url) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(**chat_body(stream=True))
    assert err.value.status_code == 503 and err.value.code == "no_executor"


@pytest.mark.parametrize("code, status", [("insufficient_balance", 402), ("overloaded", 429)])
async def test_ta_admission_verdicts_keep_their_status(
        net: Net, code: str, status: int) -> None:
    """The ledger's balance check is not wired into the node yet; its verdict arrives
    through the TA's admission hook, the seam the ledger will use."""
    async def verdict(request: object) -> tuple[str, str]:
        return code, "balance 0 is below the escrow of 262 units"

    node = net.nodes[0]
    ta = TransferAgent(node.service, node.key, node.directory, ADHOC_CHAIN_ID, admit=verdict)
    async with serving(Gateway(ta, node.directory)) as url, sdk(url) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(**chat_body())
    assert (err.value.status_code, err.value.code) == (status, code)


async def test_gateway_at_capacity_is_429_naming_other_tas(net: Net) -> None:
    admitted, release = asyncio.Event(), asyncio.Event()

    async def slow_admission(request: object) -> None:
        admitted.set()
        await release.wait()

    node = net.nodes[0]
    ta = TransferAgent(node.service, node.key, node.directory, ADHOC_CHAIN_ID, admit=slow_admission)
    async with serving(Gateway(ta, node.directory, max_in_flight=1)) as url, sdk(url) as client:
        first = asyncio.create_task(client.chat.completions.create(**chat_body()))
        await admitted.wait()
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(**chat_body())
        release.set()
        assert (await first).choices[0].message.content  # the request in flight is served
    assert err.value.code == "overloaded"
    alternatives = err.value.response.headers[ALTERNATIVES_HEADER]
    assert all(n.service.listen_addrs[0] in alternatives for n in net.nodes[1:])


class HeldEngine:
    """The real engine, holding every generation after its first token until ``resume`` is set.

    The tiny model answers these prompts in a few tokens and, once warm (an earlier test in the
    module ran it), in a few milliseconds: without the hold an answer can be complete before
    the client acts on its first token, and "mid-stream" would depend on the machine's speed."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.resume = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       seed: bytes) -> AsyncIterator[TokenStep]:
        first = True
        async for step in self._engine.generate(prompt_ids, params, seed):
            yield step
            if first:
                first = False
                await self.resume.wait()


async def test_executor_dying_mid_stream_ends_the_stream_with_an_error(engine: Engine) -> None:
    nodes = await start_network(MemoryHub(), HeldEngine(engine), n=2)  # type: ignore[arg-type]
    async with serving(Gateway(nodes[0].ta, nodes[0].directory)) as url, sdk(url) as client:
        stream = await client.chat.completions.create(**chat_body(max_tokens=64, stream=True))
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content is not None:
                    await nodes[1].service.stop()  # the only executor, after its first token
    assert err.value.code == "executor_failed"


class WatchedTA(TransferAgent):
    """Notes when a route is cancelled."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cancelled = asyncio.Event()

    async def route(self, request: Any, send: Any) -> None:
        try:
            await super().route(request, send)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_client_hanging_up_cancels_the_route_and_frees_its_slot(engine: Engine) -> None:
    held = HeldEngine(engine)
    node = (await start_network(MemoryHub(), held))[0]  # type: ignore[arg-type]
    ta = WatchedTA(node.service, node.key, node.directory, ADHOC_CHAIN_ID)
    async with serving(Gateway(ta, node.directory, max_in_flight=1)) as url, sdk(url) as client:
        stream = await client.chat.completions.create(**chat_body(
            max_tokens=400, temperature=1.0, stream=True))  # held: still running when we leave
        async for _ in stream:
            break
        await stream.close()
        await asyncio.wait_for(ta.cancelled.wait(), 10)
        held.resume.set()  # the next request runs to its end
        assert (await client.chat.completions.create(**chat_body())).choices  # slot is free


class GreedyTA(TransferAgent):
    """Relays the executor's frames but rewrites one token (re-signed with its own key)."""

    async def route(self, request: Any, send: Any) -> None:
        async def tamper(frame: bytes) -> None:
            try:
                batch = open_envelope(frame, TokenBatch).message
            except WireError:  # not a TokenBatch: pass it on untouched
                return await send(frame)
            forged = TokenBatch(**{**batch.__dict__, "token_ids": [batch.token_ids[0] + 1]})
            await send(seal(forged, self._key))

        await super().route(request, tamper)


async def test_frames_altered_by_the_ta_are_refused_with_502(net: Net) -> None:
    node = net.nodes[0]
    async with serving(Gateway(GreedyTA(node.service, node.key, node.directory, ADHOC_CHAIN_ID),
                               node.directory)) as url, sdk(url) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(**chat_body())
    assert (err.value.status_code, err.value.code) == (502, "protocol_violation")


@pytest.mark.parametrize("code, status", [
    ("malformed", 400), ("bad_signature", 401), ("stale", 401), ("replay", 401),
    ("insufficient_balance", 402), ("unknown_model", 404), ("overloaded", 429),
    ("executor_failed", 502), ("no_executor", 503),
])
def test_every_ta_code_has_its_status(code: str, status: int) -> None:
    assert ERRORS[code][0] == status


# --- pieces ----------------------------------------------------------------------------


def test_body_maps_to_signed_fields_with_openai_defaults() -> None:
    req = parse_body("chat", {"model": MODEL, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ], "logprobs": True, "top_logprobs": 9})
    assert req.messages == (("system", "Be brief."), ("user", "a\nb"))
    assert (req.max_tokens, req.temperature, req.top_p) == (DEFAULT_MAX_TOKENS, 1.0, 1.0)
    assert (req.top_logprobs, req.logprobs_k) == (9, 9)
    signed = open_envelope(req.sign(CLIENT, ADHOC_CHAIN_ID), InferenceRequest).message
    assert req.mismatch(signed) is None
    completion = parse_body("completion", {"model": MODEL, "prompt": ["hi"], "max_tokens": 3})
    assert completion.messages == (("user", "hi"),) and completion.logprobs_k == 5


@pytest.mark.parametrize("body, param", [
    ({"stop": ["\n"]}, "stop"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"temperature": 3}, "temperature"), ({"max_tokens": True}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bodies_the_network_cannot_run_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BodyError) as err:
        parse_body("chat", chat_body(**body))
    assert err.value.param == param


def test_partial_utf8_token_is_shown_as_openai_shows_it(vocab: Vocabulary) -> None:
    token_id = next(t for t in range(50_000) if not _utf8(vocab.token_bytes(t)))
    shown = token_json(token_id, -1.5, vocab)
    assert shown["token"].startswith("bytes:\\x")
    assert bytes(shown["bytes"]) == vocab.token_bytes(token_id)
    assert token_json(token_id, -1.5, None) == {"token": f"token_id:{token_id}", "logprob": -1.5,
                                                "bytes": None}


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
        return True
    except UnicodeDecodeError:
        return False


# --- inside the node -------------------------------------------------------------------


async def test_node_serves_http_for_its_lifetime() -> None:
    hub = MemoryHub()
    key = Keypair.from_seed(b"gateway-node")
    node = Node(NodeConfig(models=[], http="127.0.0.1:0"), key, hub.service(key), None)
    await node.join()
    assert node.gateway is not None
    stop = asyncio.Event()
    serving_task = asyncio.create_task(node.serve(stop))
    async with httpx.AsyncClient() as http:
        resp = await http.get(node.gateway.url + "/models")
    assert resp.json() == {"object": "list", "data": []}
    stop.set()
    await asyncio.wait_for(serving_task, 10)
    await node.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.gateway.port), timeout=1).close()


async def test_busy_http_port_fails_start_up_in_a_sentence() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        key = Keypair.from_seed(b"gateway-node-2")
        node = Node(NodeConfig(models=[], http=f"127.0.0.1:{port}"), key,
                    MemoryHub().service(key), None)
        with pytest.raises(StartupError, match="cannot serve HTTP"):
            await node.join()
        await node.close()


def test_http_address_parsing() -> None:
    assert parse_http_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_http_address("[::1]:0") == ("::1", 0)
    for bad in ("8000", "host:", "host:99999"):
        with pytest.raises(ConfigError):
            parse_http_address(bad)


def test_a_token_id_outside_the_vocabulary_is_shown_by_its_id(vocab: Vocabulary) -> None:
    """Only a lying executor sends one (the validators fail it); the gateway shows it as it shows
    tokens without a tokenizer instead of raising while formatting the answer."""
    assert token_json(10**9, -1.5, vocab) == {"token": "token_id:1000000000", "logprob": -1.5, "bytes": None}
