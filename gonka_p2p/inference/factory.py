"""Pick an engine implementation by name, and warm it up; imports are lazy so a
TA-only node or a torch-only test never pays for importing vLLM."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gonka_p2p.inference.engine import Engine, EngineError
from gonka_p2p.inference.models import ModelSpec, model_spec
from gonka_p2p.inference.poc import PUBKEY_BYTES, WORK_SEED_BYTES, compute_leaf
from gonka_p2p.inference.sampler import SamplingParams

log = logging.getLogger(__name__)

EngineLoader = Callable[[str, ModelSpec], Engine]  # (engine kind, model) -> engine: how a node loads its models


def load_engine(kind: str, model: str | ModelSpec) -> Engine:
    """``kind`` is ``vllm`` (the executor's engine) or ``torch`` (the cross-check); ``model`` a
    name, a directory, or a full :class:`ModelSpec` (the pinned dtype, engine arguments)."""
    spec = model_spec(model)
    if kind == "vllm":
        try:
            from gonka_p2p.inference.vllm_engine import VLLMEngine
        except ImportError as e:
            raise EngineError(
                f"the vLLM engine is not installed ({e}); run scripts/setup.sh, "
                "or use --engine torch"
            ) from None
        return VLLMEngine(spec)
    if kind == "torch":
        from gonka_p2p.inference.torch_engine import TorchEngine

        if spec.tensor_parallel_size > 1 or spec.gpu_memory_utilization is not None:
            log.warning("%s: tensor_parallel_size and gpu_memory_utilization are vLLM's; the torch "
                        "engine ignores them", spec.source)
        return TorchEngine(spec)
    raise EngineError(f"unknown engine {kind!r}: use vllm or torch")


WARM_UP_SEED = b"gonka-p2p engine warm-up"  # nobody's inference id: its tokens are dropped
WARM_UP_TOKENS = 8


async def warm_up(engine: Engine) -> float:
    """Run each of the engine's paths once, so that no client pays for its first use; the seconds
    it took. The first generation through vLLM takes seconds (measured: 6 s of TTFT on a busy
    2-core machine, 0.14 s after it) that the demo's first client used to wait for.

    A short seeded generation (temperature 1: the seeded sampler's path, not greedy's), a
    teacher-forced score of its tokens (the validator's prefill) and one proof-of-compute
    nonce (the prover's prefill over a random prompt)."""
    started = time.perf_counter()
    prompt = engine.encode_chat([("user", "Say hello.")])
    params = SamplingParams(max_tokens=WARM_UP_TOKENS, temperature=1.0, logprobs_k=5)
    completion = [step.token_id async for step in engine.generate(prompt, params, WARM_UP_SEED)]
    await engine.score(prompt, completion, params.logprobs_k)
    await compute_leaf(engine, bytes(WORK_SEED_BYTES), bytes(PUBKEY_BYTES), 0)
    return time.perf_counter() - started
