"""Pick an engine implementation by name; imports are lazy so a TA-only node
or a torch-only test never pays for importing vLLM."""

from __future__ import annotations

from collections.abc import Callable

from gonka_p2p.inference.engine import Engine, EngineError

EngineLoader = Callable[[str, str], Engine]  # (engine kind, model) -> engine: how a node loads its models


def load_engine(kind: str, model: str) -> Engine:
    """``kind`` is ``vllm`` (the executor's engine) or ``torch`` (the cross-check)."""
    if kind == "vllm":
        try:
            from gonka_p2p.inference.vllm_engine import VLLMEngine
        except ImportError as e:
            raise EngineError(
                f"the vLLM engine is not installed ({e}); run scripts/setup.sh, "
                "or use --engine torch"
            ) from None
        return VLLMEngine(model)
    if kind == "torch":
        from gonka_p2p.inference.torch_engine import TorchEngine

        return TorchEngine(model)
    raise EngineError(f"unknown engine {kind!r}: use vllm or torch")
