"""Attack class: hostile answers and hostile HTTP input. An executor's answer is bounded by
the client's signed request -- at most ``max_tokens`` tokens, each position with exactly
``logprobs_k`` alternatives, no empty batch, a bounded amount of text per token -- and the TA
that relays it, the client library and the OpenAI gateway all hold it to that
(``wire/stream.py``), so an executor cannot make them buffer an endless answer nor crash a
formatter. What a TA keeps of a relayed answer is a spare copy: it never replaces the evidence
behind this node's own commitment (a client may sign two requests under one nonce), and one
too large to keep does not stop this node's executor. Malformed HTTP input to the gateway is a
4xx with a reason, never a 500.

Everything runs on the in-memory hub with the real tiny model; the hostile executors are real
nodes whose engine is wrapped."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import MODEL, client_for, start_network, start_nodes

from gonka_p2p.actors.admission import ADHOC_CHAIN_ID
from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.transfer_agent import TransferAgent
from gonka_p2p.client import GonkaClient, GonkaError, build_request
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine, TokenStep
from gonka_p2p.inference.sampler import MIN_TEMPERATURE, SamplingParams
from gonka_p2p.openai.auth import REQUEST_HEADER
from gonka_p2p.openai.format import positions
from gonka_p2p.openai.gateway import Gateway
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import (
    NONCE_BYTES,
    ChatTurn,
    InferenceRequest,
    InferenceStarted,
    TokenBatch,
    inference_id,
)
from gonka_p2p.wire.protocols import INFER_PROTOCOL
from gonka_p2p.wire.stream import (
    MAX_TEXT_PER_TOKEN,
    ProtocolViolation,
    RequestRejected,
    StartedEvent,
    StreamVerifier,
    TokensEvent,
)

CLIENT = Keypair.from_seed(b"audit-client")


def signed_request(key: Keypair, prompt: str, nonce: bytes, max_tokens: int = 4) -> bytes:
    return seal(InferenceRequest(
        chain_id=ADHOC_CHAIN_ID, model=MODEL, messages=[ChatTurn(role="user", content=prompt)],
        max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5,
        timestamp_ms=int(time.time() * 1000), nonce=nonce), key)


class _Wrapped:
    """The real engine, with some of its behaviour replaced by a hostile executor's."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)


class OverlongEngine(_Wrapped):
    """An executor that ignores max_tokens: it streams ``factor`` times the tokens asked."""

    def __init__(self, engine: Engine, factor: int) -> None:
        super().__init__(engine)
        self._factor = factor

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       seed: bytes) -> AsyncIterator[TokenStep]:
        k = params.logprobs_k
        for i in range(params.max_tokens * self._factor):
            yield TokenStep(100 + i % 50, -0.5, tuple(100 + (i + j) % 50 for j in range(k)),
                            tuple(-0.5 - j for j in range(k)))


class BloatedTextEngine(_Wrapped):
    """An executor whose tokens are honest but whose streamed text is ``chars`` per token."""

    def __init__(self, engine: Engine, chars: int) -> None:
        super().__init__(engine)
        self._chars = chars

    def decode(self, token_ids: list[int]) -> str:
        return "x" * (self._chars * len(token_ids))


# --- 1. the node-wide evidence store: a relayed copy replaces the executor's own evidence ----


async def test_a_relayed_copy_never_replaces_the_executors_own_evidence(engine: Engine) -> None:
    """Node X is an executor *and* a TA, with one evidence store for both roles, keyed by
    inference id only (INSERT OR REPLACE). A client runs request R1 through TA A; the draw gives
    it to X, which keeps R1 and its artifact (the bytes behind its FinishInference
    commitment). The client then signs R2 under the *same nonce* (same inference id, other
    prompt) and sends it to X's TA, which has its own replay guard, so it admits it and relays
    it to the other executor Y. X's TA then keeps Y's evidence of R2 under the same id, over
    X's own: a validator now gets from X an artifact that does not match X's commitment, and
    with a TA that withholds its copy, honest X is judged a withholder (its epoch reward)."""
    hub = MemoryHub()
    nodes = await start_network(hub, engine)  # node 0: TA only; nodes 1 and 2: executors + TAs
    client_a = await client_for(hub, nodes[0], seed=b"audit-client")
    nonce = os.urandom(NONCE_BYTES)
    r1 = signed_request(CLIENT, "Say hello.", nonce)
    events = [e async for e in client_a.stream_request(r1)]
    assert isinstance(events[0], StartedEvent)
    x = next(n for n in nodes if n.key.peer_id == events[0].executor)
    iid = inference_id(open_envelope(r1, InferenceRequest))
    own = await x.artifacts.store.get(iid)
    assert own is not None and own[0] == r1
    committed = InferenceArtifact.decode(own[1]).commitment()  # what X's FinishInference names

    r2 = signed_request(CLIENT, "Tell me a joke about cats.", nonce)  # same (chain, client, nonce)
    assert inference_id(open_envelope(r2, InferenceRequest)) == iid
    client_x = GonkaClient(CLIENT, client_a.service, await client_a.service.connect(x.service.listen_addrs[0]))
    relayed = [e async for e in client_x.stream_request(r2)]
    assert isinstance(relayed[0], StartedEvent) and relayed[0].executor != x.key.peer_id

    kept = await x.artifacts.store.get(iid)
    assert kept is not None
    assert kept[0] == r1 and digest(kept[1]) == committed, (
        "X's own evidence for its committed work was replaced by the copy its TA relayed "
        "from another executor: X now serves evidence that does not match its commitment")


# --- 2. answers longer than max_tokens are relayed, kept and accepted -----------------------


async def test_the_ta_cuts_an_executor_streaming_past_max_tokens(engine: Engine) -> None:
    """A hostile executor streams 20x the request's max_tokens (it could go on for as long as it
    sends a frame every stall_timeout): the TA relays every frame and keeps them all in memory
    (``batches``, ``relayed``, then the evidence store), and the gateway's queue too. The
    signed request bounds the answer; the TA should fail the stream past it."""
    hub = MemoryHub()
    nodes = await start_network(hub, OverlongEngine(engine, factor=20), n=2)  # type: ignore[arg-type]
    client = await client_for(hub, nodes[0], seed=b"audit-client")
    request = build_request(CLIENT, [("user", "Hi")], ADHOC_CHAIN_ID, model=MODEL, max_tokens=2)
    frames = [f async for f in client.service.open_stream(client.ta, INFER_PROTOCOL, request)]
    relayed_tokens = 0
    for frame in frames:
        msg = open_envelope(frame).message
        if isinstance(msg, TokenBatch):
            relayed_tokens += len(msg.token_ids)
    assert relayed_tokens <= 2, f"the TA relayed {relayed_tokens} tokens for max_tokens=2"


async def test_the_client_never_accepts_an_answer_longer_than_max_tokens(engine: Engine) -> None:
    """Through an honest TA the overlong answer is cut (the client hears the executor failed);
    the client's own verifier holds the same bound against a TA that would relay it
    (:func:`test_the_stream_verifier_holds_the_executor_to_the_signed_request`)."""
    hub = MemoryHub()
    nodes = await start_network(hub, OverlongEngine(engine, factor=20), n=2)  # type: ignore[arg-type]
    client = await client_for(hub, nodes[0], seed=b"audit-client")
    with pytest.raises(GonkaError, match="max_tokens"):
        await client.chat([("user", "Hi")], model=MODEL, max_tokens=2)


# --- 3. a stranger's relayed answer too large to keep -----------------------------------------


async def test_a_relayed_answer_too_large_to_keep_does_not_stop_the_nodes_executor(engine: Engine) -> None:
    """X (executor + TA) relays, through its TA, a long-winded answer from another executor Y:
    within the bounds (1,000 characters of text per token) but larger than X's evidence store.
    The TA's copy is a spare and is dropped; X's store must not turn "full", or X's *executor*
    would refuse every order as overloaded until a settlement freed one of its rows -- with an
    empty store, never."""
    hub = MemoryHub()
    nodes = await start_nodes(hub, [None, engine, BloatedTextEngine(engine, chars=1000)],
                              [1 << 30, 8 * 1024, 1 << 30])
    ta, x, y = nodes
    client_x = await client_for(hub, x, seed=b"audit-client")
    completion = await client_x.chat([("user", "Hi")], model=MODEL, max_tokens=12)
    assert completion.executor == y.key.peer_id  # X's TA never routes to X itself
    assert len(completion.text) >= 4000 and len(x.artifacts.store) == 0  # its copy did not fit: dropped
    assert not x.artifacts.store.full and x.artifacts.store.refused == 0

    # X's executor still takes work: the only other executor gone, a request through another TA.
    ta.directory.mark_failed(y.key.peer_id)
    client = await client_for(hub, ta, seed=b"audit-client-2")
    assert (await client.chat([("user", "Hi")], model=MODEL, max_tokens=2)).executor == x.key.peer_id


async def test_the_ta_cuts_an_executor_streaming_unbounded_text(engine: Engine) -> None:
    """100 kB of text per token (a token's text is otherwise bounded only by the frame): the TA
    cuts the stream, so neither it nor the client buffers it."""
    hub = MemoryHub()
    ta, _ = await start_nodes(hub, [None, BloatedTextEngine(engine, chars=100_000)], [1 << 30, 1 << 30])
    client = await client_for(hub, ta, seed=b"audit-client")
    with pytest.raises(GonkaError, match="characters of text per token"):
        await client.chat([("user", "Hi")], model=MODEL, max_tokens=4)


# --- 4. the HTTP gateway: inputs that end in a 500 --------------------------------------------


def _gateway() -> Gateway:
    hub = MemoryHub()
    key = Keypair.from_seed(b"audit-gateway")
    service = hub.service(key)
    directory = PeerDirectory(service, key, [], 1, None)
    return Gateway(TransferAgent(service, key, directory, ADHOC_CHAIN_ID), directory)


async def _post(gateway: Gateway, body: bytes, headers: dict[str, Any] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=gateway.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        return await http.post("/v1/chat/completions", content=body,
                               headers={"content-type": "application/json", **(headers or {})})


async def test_a_deeply_nested_json_body_is_a_400_not_a_500() -> None:
    """``json.loads`` raises RecursionError (not a ValueError) on deep nesting: 100 kB of '['
    (well under the 4 MiB body bound) is an unhandled exception and a 500 with a traceback."""
    response = await _post(_gateway(), b"[" * 100_000)
    assert response.status_code == 400, response.text


async def test_a_non_ascii_signature_header_is_a_401_not_a_500() -> None:
    """``base64.b64decode`` raises a plain ValueError (not binascii.Error) for a str with a
    non-ASCII character; h11 admits obs-text bytes in header values and Starlette decodes them
    as latin-1, so one byte >= 0x80 in X-Gonka-Request is an unhandled exception and a 500."""
    body = (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], '
            b'"max_tokens": 2, "temperature": 0}')
    response = await _post(_gateway(), body, {REQUEST_HEADER: b"\xff\xfe"})
    assert response.status_code == 401, response.text


# --- 5. the verifier holds every batch to the signed request -------------------------------


def _batch(iid: bytes, start: int, n: int, k: int = 5, text: str = "a", top_logprobs_k: int | None = None,
           ) -> TokenBatch:
    return TokenBatch(inference_id=iid, start=start, token_ids=[7] * n, logprobs=[-0.1] * n,
                      top_ids=[list(range(7, 7 + k))] * n,
                      top_logprobs=[[-0.1] * (k if top_logprobs_k is None else top_logprobs_k)] * n,
                      text=text)


@pytest.mark.parametrize("bad, why", [
    # top ids and top logprobs that do not pair up: the gateway's formatter zips them strictly
    (lambda iid: _batch(iid, 2, 1, top_logprobs_k=1), "alternatives"),
    (lambda iid: _batch(iid, 2, 1, k=6), "alternatives"),  # not the k the request asked for
    (lambda iid: _batch(iid, 2, 3), "max_tokens"),  # 5 tokens for max_tokens=4
    (lambda iid: _batch(iid, 2, 0, text=""), "empty"),  # a stream of empty batches never ends
    (lambda iid: _batch(iid, 2, 1, text="x" * (3 * MAX_TEXT_PER_TOKEN + 1)), "characters of text"),
])
def test_the_stream_verifier_holds_the_executor_to_the_signed_request(bad: Any, why: str) -> None:
    """What an honest answer to this request (max_tokens=4, logprobs_k=5) cannot be, after two
    good tokens: each frame is refused as a protocol violation rather than handed on."""
    executor = Keypair.from_seed(b"audit-executor")
    request = open_envelope(signed_request(CLIENT, "Hi", os.urandom(NONCE_BYTES)), InferenceRequest)
    iid = inference_id(request)
    verifier = StreamVerifier(request)
    verifier.accept(seal(InferenceStarted(inference_id=iid, ta="ta", prompt_tokens=3), executor))
    event = verifier.accept(seal(_batch(iid, 0, 2, text="ab"), executor))
    assert isinstance(event, TokensEvent) and len(positions(event)) == 2
    with pytest.raises(ProtocolViolation, match=why):
        verifier.accept(seal(bad(iid), executor))
    assert verifier.accept(seal(_batch(iid, 2, 2), executor)) is not None  # the honest rest still goes


async def test_the_ta_refuses_a_temperature_no_executor_would_sample_with(engine: Engine) -> None:
    """Temperatures in (0, MIN_TEMPERATURE) pass the wire schema but not the sampler: the TA used
    to relay such a request and, on a hostile executor's Finished frame, raise rebuilding its
    artifact. It is refused at admission now, as every executor would: before any executor is
    sought (this network has none)."""
    hub = MemoryHub()
    nodes = await start_network(hub, engine, n=1)
    client = await client_for(hub, nodes[0], seed=b"audit-client")
    request = seal(InferenceRequest(
        chain_id=ADHOC_CHAIN_ID, model=MODEL, messages=[ChatTurn(role="user", content="Hi")],
        max_tokens=2, temperature=MIN_TEMPERATURE / 2, top_p=1.0, top_k=0, logprobs_k=5,
        timestamp_ms=int(time.time() * 1000), nonce=os.urandom(NONCE_BYTES)), CLIENT)
    with pytest.raises(RequestRejected) as refused:
        [e async for e in client.stream_request(request)]
    assert refused.value.code == "malformed" and "temperature" in str(refused.value)
