"""The engine interface: token ids in, token ids and evidence out.

Every engine (vLLM in-process, torch/transformers) produces the *same*
artifact for the same model, prompt, sampling parameters and seed, so a
validator running either engine can check an executor running the other.

* ``generate`` streams one :class:`TokenStep` per generated position: the
  token the reproducible sampler (``sampler.choose_token``) picked from the
  raw distribution, that token's raw logprob (temperature 1, before any
  truncation) and the top-k raw alternatives. Generation stops after
  ``max_tokens`` or after emitting an end-of-sequence token (included).
* ``score`` is the validator's teacher-forced pass: one prefill over prompt +
  completion returning, for each completion position, the same record the
  generator would have produced, plus the raw logits row the sampler check
  needs (only when asked, they are large).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from gonka_p2p.inference.sampler import SamplingParams

if TYPE_CHECKING:
    from gonka_p2p.inference.models import LocalModel


@dataclass(frozen=True)
class TokenStep:
    """Evidence for one generated position."""

    token_id: int
    logprob: float  # raw logprob of token_id
    top_ids: tuple[int, ...]  # k most likely ids, most likely first
    top_logprobs: tuple[float, ...]  # their raw logprobs


@dataclass(frozen=True)
class ScoredCompletion:
    """Teacher-forced recomputation of a completion."""

    steps: list[TokenStep]
    logits: torch.Tensor | None  # [n_completion, vocab] raw logits, when requested


class EngineError(Exception):
    """The engine could not load a model or run a request; the message is for people."""


class Engine(Protocol):
    model_name: str
    eos_token_ids: frozenset[int]

    @property
    def local_model(self) -> LocalModel:
        """Tokenizer and limits, shared by every engine of this model (``check_request``)."""
        ...

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """Apply the model's chat template (with the generation prompt) and tokenize."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, seed: bytes
    ) -> AsyncIterator[TokenStep]:
        ...

    async def score(
        self,
        prompt_ids: list[int],
        completion_ids: list[int],
        k: int,
        with_logits: bool = False,
    ) -> ScoredCompletion:
        ...

    async def close(self) -> None:
        ...
