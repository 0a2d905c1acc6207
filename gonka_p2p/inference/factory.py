"""Pick an engine implementation by name; imports are lazy so a TA-only node
or a torch-only test never pays for importing vLLM."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gonka_p2p.inference.engine import Engine, EngineError
from gonka_p2p.inference.models import ModelSpec, model_spec

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
