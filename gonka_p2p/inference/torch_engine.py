"""The transformers engine: the reference the vLLM engine is checked against.

Why it exists: a validator must be able to re-score an executor's output with
an independent implementation, and tests need an engine that loads in seconds
with no engine process or KV-cache pool. It runs the same weights as vLLM
(see ``models``), in the dtype the genesis pins (``ModelSpec.dtype``, fp32
where nothing is pinned), and agrees with it to about 1e-5 in logprobs at fp32.

Choices:

* the pinned dtype, eager, one forward at a time (a lock), each request with its own KV
  cache. Concurrent requests interleave step by step instead of batching:
  simple, and batching is vLLM's job.
* Compute runs in a worker thread (``asyncio.to_thread``) so the event loop
  keeps serving the network while the model runs.
* The token at generated position i is ``sampler.choose_token(row, params,
  seed, i)`` on the raw logits row: ``sampler.sample_batch``, the function
  vLLM's batch runs, on a batch of one; the evidence is the raw (temperature 1)
  ``log_softmax`` of that row in float32, as vLLM's ``raw_logprobs`` mode
  computes it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import torch

from gonka_p2p.inference.engine import EngineError, ScoredCompletion, TokenStep
from gonka_p2p.inference.model_names import DEFAULT_MODEL
from gonka_p2p.inference.models import LocalModel, LocalModelFrontend, ModelSpec, load_local_model, model_spec
from gonka_p2p.inference.sampler import SamplingParams, choose_token


def token_step(logits_row: torch.Tensor, token_id: int, k: int) -> TokenStep:
    """The evidence record for ``token_id`` given the raw logits row it was chosen from."""
    return token_steps(logits_row.unsqueeze(0), [token_id], k)[0]


def token_steps(logits: torch.Tensor, token_ids: Sequence[int], k: int) -> list[TokenStep]:
    """``token_step`` for every row of ``logits`` ``[n, vocab]`` in one batched pass (the
    scoring pass has a row per completion token); row-wise ops, so bit-identical per row."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    top = torch.topk(logprobs, k, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long).view(-1, 1)).view(-1)
    return [TokenStep(token_id=t, logprob=lp, top_ids=tuple(ids), top_logprobs=tuple(values))
            for t, lp, ids, values in zip(token_ids, chosen.tolist(), top.indices.tolist(),
                                          top.values.tolist(), strict=True)]


class TorchEngine(LocalModelFrontend):
    """``Engine`` over transformers in the spec's dtype (a multi-GPU spec's engine arguments are vLLM's)."""

    def __init__(self, model: str | ModelSpec = DEFAULT_MODEL) -> None:
        from transformers import AutoModelForCausalLM

        spec = model_spec(model)
        self._local: LocalModel = load_local_model(spec)
        try:
            self._model = AutoModelForCausalLM.from_pretrained(
                self._local.path, dtype=spec.torch_dtype
            ).eval()
        except Exception as exc:
            raise EngineError(f"transformers cannot load {self._local.path}: {exc}") from exc
        self.model_name = self._local.name
        self.eos_token_ids = self._local.eos_token_ids
        self._lock = threading.Lock()  # one forward at a time: they share the cores

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, seed: bytes
    ) -> AsyncIterator[TokenStep]:
        self._local.check_request(prompt_ids, params.max_tokens)
        cache = None
        feed = list(prompt_ids)
        for position in range(params.max_tokens):
            step, cache = await asyncio.to_thread(
                self._next_step, feed, cache, params, seed, position
            )
            yield step
            if step.token_id in self.eos_token_ids:
                return
            feed = [step.token_id]

    def _next_step(
        self,
        feed: list[int],
        cache: object,
        params: SamplingParams,
        seed: bytes,
        position: int,
    ) -> tuple[TokenStep, object]:
        with self._lock, torch.inference_mode():
            out = self._open_model()(
                input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True
            )
        row = out.logits[0, -1]
        token = choose_token(row, params, seed, position)
        return token_step(row, token, params.logprobs_k), out.past_key_values

    async def score(
        self,
        prompt_ids: list[int],
        completion_ids: list[int],
        k: int,
        with_logits: bool = False,
    ) -> ScoredCompletion:
        self._local.check_request(prompt_ids, len(completion_ids))
        bad = [t for t in completion_ids if not 0 <= t < self._local.vocab_size]
        if bad:
            raise EngineError(f"completion token id {bad[0]} is outside the vocabulary")
        rows = await asyncio.to_thread(self._completion_logits, prompt_ids, completion_ids)
        return ScoredCompletion(steps=token_steps(rows, completion_ids, k),
                                logits=rows if with_logits else None)

    def _completion_logits(self, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
        """Raw logits predicting each completion token: one teacher-forced pass.

        The LM head runs only on the rows that predict completion tokens (the last
        ``n + 1`` positions, of which the final one predicts past the completion):
        prompt rows are never compared, and on a 49k vocabulary the head is most of
        the tiny model's pass and a quarter of SmolLM2's. The hidden states, and so
        the rows kept, are bit for bit those of a full pass.
        """
        n = len(completion_ids)
        with self._lock, torch.inference_mode():
            logits = self._open_model()(input_ids=torch.tensor([prompt_ids + completion_ids]),
                                        use_cache=False, logits_to_keep=n + 1).logits[0]
        return logits[:n].to(torch.float32)

    def _open_model(self) -> torch.nn.Module:
        if self._model is None:
            raise EngineError("the engine is closed")
        return self._model

    async def close(self) -> None:
        with self._lock:
            self._model = None
