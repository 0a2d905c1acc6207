"""How the executor turns engine tokens into TokenBatch frames: incremental text
(TextStream), batching by availability (TokenBatches), and a burst of tokens
reaching the client as one verified multi-token frame."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from helpers import MODEL, client_for, start_network

from gonka_p2p.actors.executor import MAX_HELD_TOKENS, TextStream, TokenBatches, tokens_per_frame
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.inference.engine import Engine, EngineError, TokenStep
from gonka_p2p.inference.factory import load_engine
from gonka_p2p.inference.models import load_local_model
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.wire.stream import TokensEvent

TEXTS = [
    "Plain English, with punctuation: commas, dots... and 'quotes'!",
    "Émigré naïveté: crème brûlée à la carte, Ærø, Øresund, Straße.",
    "中文分词测试，日本語のテキスト，한국어 문장입니다。",
    "Emoji 🚀🔥👩‍👩‍👧‍👦 and symbols ∑∫√≈≠ ⟨bra|ket⟩",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\n\tindented\r\n",
    "   leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer_model():  # noqa: ANN201 - LocalModel
    return load_local_model("smollm2-135m")


@pytest.mark.parametrize("text", TEXTS)
def test_text_pieces_concatenate_to_the_whole_decode(tokenizer_model, text: str) -> None:
    ids = tokenizer_model.tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(text)
    for _ in range(5):  # batches of random sizes, as a stream that falls behind sends them
        stream, pieces, i = TextStream(tokenizer_model.decode), [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 3])
            pieces.append(stream.add(ids[i:i + n]))
            i += n
        assert "".join(pieces) == tokenizer_model.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_text_stream_decodes_a_short_window_per_token(tokenizer_model) -> None:
    ids = tokenizer_model.tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    decoded: list[int] = []

    def decode(window: list[int]) -> str:
        decoded.append(len(window))
        return tokenizer_model.decode(window)

    stream = TextStream(decode)
    text = "".join(stream.add([t]) for t in ids)
    assert text == tokenizer_model.decode(ids)
    assert len(ids) > 1000 and max(decoded) < 32  # flat, not growing with the answer


def _steps(n: int) -> list[TokenStep]:
    return [TokenStep(i, -0.5, (i,), (-0.5,)) for i in range(n)]


async def test_a_consumer_that_keeps_up_gets_one_token_per_batch() -> None:
    async def paced() -> AsyncIterator[TokenStep]:
        for step in _steps(5):
            await asyncio.sleep(0.01)  # the pace under test: slower than the consumer
            yield step

    batches = [b async for b in TokenBatches(paced())]
    assert batches == [[s] for s in _steps(5)]


async def test_a_consumer_that_falls_behind_gets_everything_waiting_in_order() -> None:
    async def fast() -> AsyncIterator[TokenStep]:
        for step in _steps(50):
            await asyncio.sleep(0)
            yield step

    batches = []
    async for batch in TokenBatches(fast(), limit=16):
        batches.append(batch)
        await asyncio.sleep(0.005)  # a slow send
    assert [s for b in batches for s in b] == _steps(50)
    assert len(batches[0]) == 1  # the first token never waits for a second one
    assert max(len(b) for b in batches) == 16 and len(batches) < 10


async def test_under_load_frames_after_the_first_wait_for_more_tokens() -> None:
    async def paced() -> AsyncIterator[TokenStep]:
        for step in _steps(9):
            await asyncio.sleep(0.002)  # slower than the consumer: alone, one token per batch
            yield step

    held = [b async for b in TokenBatches(paced(), at_least=lambda: 3)]
    assert held == [_steps(9)[0:1], _steps(9)[1:4], _steps(9)[4:7], _steps(9)[7:9]]  # the end does not wait


def test_tokens_per_frame_grows_with_the_streams_and_is_bounded() -> None:
    assert [tokens_per_frame(n) for n in (1, 7, 8, 16, 24)] == [1, 1, 2, 3, 4]
    assert tokens_per_frame(10_000) == MAX_HELD_TOKENS


async def test_an_engine_error_arrives_after_the_tokens_before_it() -> None:
    async def failing() -> AsyncIterator[TokenStep]:
        for step in _steps(3):
            yield step
        raise EngineError("out of memory")

    received = []
    with pytest.raises(EngineError, match="out of memory"):
        async for batch in TokenBatches(failing()):
            received += batch
    assert received == _steps(3)


async def test_closing_early_stops_the_engine_generation() -> None:
    stopped = asyncio.Event()

    async def endless() -> AsyncIterator[TokenStep]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                yield TokenStep(i, 0.0, (), ())
                i += 1
        finally:
            stopped.set()  # VLLMEngine.generate aborts its request here

    batches = TokenBatches(endless())
    await anext(batches)
    await batches.aclose()
    assert stopped.is_set()


async def test_the_engine_has_the_request_before_the_executor_sends_anything() -> None:
    submitted: list[str] = []

    async def engine() -> AsyncIterator[TokenStep]:
        submitted.append("request")  # VLLMEngine.generate queues the request before its first wait
        await asyncio.sleep(0.001)
        yield _steps(1)[0]

    batches = await TokenBatches.start(engine())
    assert submitted == ["request"]  # before InferenceStarted is signed and sent
    assert [b async for b in batches] == [_steps(1)]


class BurstyEngine:
    """The real engine, except that all tokens arrive at once: the executor must batch them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       seed: bytes) -> AsyncIterator[TokenStep]:
        steps = [s async for s in self._engine.generate(prompt_ids, params, seed)]
        for step in steps:
            yield step


async def test_a_burst_of_tokens_reaches_the_client_as_one_verified_frame() -> None:
    engine = load_engine("torch", MODEL)
    try:
        answers = []
        for serving in (engine, BurstyEngine(engine)):
            hub = MemoryHub()
            nodes = await start_network(hub, serving, n=2)  # type: ignore[arg-type]
            client = await client_for(hub, nodes[0])
            frames = [e async for e in client.stream_chat([("user", "Count to ten.")],
                                                          model=MODEL, max_tokens=12)
                      if isinstance(e, TokensEvent)]
            answers.append(frames)
        steady, burst = answers
        assert len(burst) == 1 and len(steady) > 1
        assert burst[0].token_ids == [t for f in steady for t in f.token_ids]
        assert burst[0].text == "".join(f.text for f in steady)
    finally:
        await engine.close()
