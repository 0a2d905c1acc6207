"""An engine that serves a cheating strategy: what ``gonka-p2p node --cheater NAME`` runs.

The executor actor streams whatever its engine yields and commits to it, so a
cheater is simply an engine whose ``generate`` yields the steps of a cheating
strategy's artifact (``cheats.make_cheater``) instead of honest work. Its
evidence is consistent with what it streamed and committed -- the lie is in
*how* the tokens were made -- which is exactly what validators must catch.
Everything else (tokenizer, stop tokens, scoring) is the honest engine's.

The one hook into a node is its engine loader: :func:`cheating_loader` wraps
whatever loads honest engines, so neither the engine factory nor the actors
know that cheats exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gonka_p2p.adversary.cheats import Strategy, make_cheater
from gonka_p2p.inference.engine import Engine, ScoredCompletion, TokenStep
from gonka_p2p.inference.factory import EngineLoader
from gonka_p2p.inference.models import LocalModelFrontend, ModelSpec
from gonka_p2p.inference.sampler import SamplingParams


class CheatingEngine(LocalModelFrontend):
    def __init__(self, honest: Engine, cheat: str) -> None:
        self._honest = honest
        self._local = honest.local_model
        self._strategy: Strategy = make_cheater(cheat, honest)
        self.cheat = cheat
        self.model_name = honest.model_name
        self.eos_token_ids = honest.eos_token_ids

    async def generate(self, prompt_ids: list[int], params: SamplingParams, seed: bytes
                       ) -> AsyncIterator[TokenStep]:
        artifact = await self._strategy(prompt_ids, params, seed)
        for step in artifact.steps:
            yield step

    async def score(self, prompt_ids: list[int], completion_ids: list[int], k: int,
                    with_logits: bool = False) -> ScoredCompletion:
        return await self._honest.score(prompt_ids, completion_ids, k, with_logits)

    async def close(self) -> None:
        await self._honest.close()


def cheating_loader(load: EngineLoader, cheat: str) -> EngineLoader:
    """``load``, but every engine it returns serves ``cheat`` (validators must catch it)."""
    def load_cheating(kind: str, model: ModelSpec) -> Engine:
        return CheatingEngine(load(kind, model), cheat)
    return load_cheating
