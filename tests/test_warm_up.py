"""A node warms its engines up before it reports READY: a seeded generation, a score and a
proof-of-compute nonce run in ``Node.load_engines``, so a client's first request never pays
for the engine's first use (the demo's first request used to wait 19 s for it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from helpers import MODEL

from gonka_p2p.actors.node import Node
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine, ScoredCompletion, TokenStep
from gonka_p2p.inference.models import ModelSpec
from gonka_p2p.inference.sampler import SamplingParams


class RecordingEngine:
    """The real engine, recording what it was asked to run, in order."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def generate(self, prompt_ids: list[int], params: SamplingParams, seed: bytes) -> AsyncIterator[TokenStep]:
        self.calls.append(("generate", params))
        return self._inner.generate(prompt_ids, params, seed)

    async def score(self, prompt_ids: list[int], completion_ids: list[int], k: int,
                    with_logits: bool = False) -> ScoredCompletion:
        self.calls.append(("score", len(completion_ids)))
        return await self._inner.score(prompt_ids, completion_ids, k, with_logits)


async def test_engines_are_warmed_up_before_load_engines_returns(engine: Engine) -> None:
    recording = RecordingEngine(engine)
    key = Keypair.from_seed(b"warm")
    node = Node(NodeConfig(models=[MODEL], engine="torch"), key, MemoryHub().service(key), weights=None)
    steps: list[str] = []
    await node.load_engines(lambda kind, spec: recording, [ModelSpec(MODEL, MODEL)],  # type: ignore[arg-type,return-value]
                            steps.append)

    assert node.engines[MODEL] is recording
    generations = [p for what, p in recording.calls if what == "generate"]
    assert isinstance(generations[0], SamplingParams) and generations[0].temperature > 0  # the seeded sampler's path
    assert [what for what, _ in recording.calls] == ["generate", "score", "generate"]  # the last: a PoC nonce
    assert [what for what, n in recording.calls if what == "score" and n] == ["score"]  # scored real tokens
    assert [s.split()[0] for s in steps] == ["loading", "warming"]
