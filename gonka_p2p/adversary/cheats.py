"""Cheating executors: strategies that produce an artifact the way a cheater would.

Used by ``benchmarks/detection_matrix.py`` (how often is each cheat caught?),
the simulator and the demo's ``--cheater`` flag. A strategy is an async
function ``(prompt_ids, params, seed) -> InferenceArtifact``, the same shape
as honest work (:func:`honest`). Most *claim* the pinned model and the
requested parameters -- that is the lie; the last family tells the truth
about what it did, which is not what was asked.

Four families, all built on the real engines rather than on copies of them:

* **Cheaper model** -- :func:`variant_engine` copies a ``TorchEngine`` with a
  transformed copy of its weights, then runs the honest generation path on
  it: fake-quantized weights (:func:`fake_quantize`, per-channel symmetric
  int8 / int4; :func:`fake_quantize_fp8`, e4m3), another dtype (:func:`cast`,
  fp16 / bf16 instead of a pinned fp32), fewer layers (:func:`drop_layers`).
* **Cheaper tokens, real evidence** -- :func:`prefill`: a cheap engine writes
  the completion, the real engine scores it teacher-forced (one prefill) and
  its honest-looking logprobs are claimed. :func:`wrong_temperature` samples
  with other parameters than the client asked for.
* **Tampered artifact** -- pure functions on an honest artifact:
  :func:`truncate`, :func:`alter_token`, :func:`fabricate_logprobs`.
* **Other terms, stated** -- honest work on parameters the client did not
  ask for, the artifact stating the ones used (:func:`stating`): fewer
  tokens (a smaller ``max_tokens``), another temperature, top-k or top-p;
  and :func:`steering`, which tries several parameter sets and keeps the
  completion it prefers. Validators judge by the client's signed request,
  so the statement itself is the failure.

``engine.CheatingEngine`` puts any of them behind the ``Engine``
interface, so an unmodified executor actor streams and commits the cheat's claim.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

import torch

from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine, EngineError, TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.inference.torch_engine import TorchEngine

Strategy = Callable[[list[int], SamplingParams, bytes], Awaitable[InferenceArtifact]]
ModelTransform = Callable[[torch.nn.Module], torch.nn.Module]


# ---------------------------------------------------------------------------
# Honest work, and the claim every cheat makes


async def generate_artifact(
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    seed: bytes,
    *,
    claim: SamplingParams | None = None,
    model: str | None = None,
) -> InferenceArtifact:
    """Run ``engine.generate`` and package the result, claiming ``model`` and ``claim``
    (default: the engine's model name and the parameters actually used)."""
    steps = tuple([s async for s in engine.generate(prompt_ids, params, seed)])
    return InferenceArtifact(model or engine.model_name, tuple(prompt_ids), claim or params,
                             seed, steps)


def honest(engine: Engine) -> Strategy:
    """What an honest executor does (the actor does the same through ``generate``)."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        return await generate_artifact(engine, prompt_ids, params, seed)
    return run


# ---------------------------------------------------------------------------
# Cheaper models: transforms of a copy of the pinned weights


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of an HF decoder-only model (Llama layout)."""
    return model.model.layers


def fake_quantize(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Round every linear weight of the decoder blocks to ``bits``-bit integers with one
    symmetric scale per output channel, and back: what a weight-only quantized
    deployment computes with. Embeddings and the (tied) head stay as they are."""
    qmax = 2 ** (bits - 1) - 1
    return _per_channel(model, qmax, lambda q: q.round().clamp(-qmax, qmax))


def fake_quantize_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """Round every linear weight of the decoder blocks to float8 e4m3 with one scale per
    output channel (its largest weight at e4m3's largest value), and back: an fp8
    weight deployment, the usual cheap serving format on recent GPUs."""
    fp8 = torch.float8_e4m3fn
    return _per_channel(model, torch.finfo(fp8).max, lambda q: q.to(fp8).to(torch.float32))


def _per_channel(model: torch.nn.Module, qmax: float,
                 rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """``rounding`` applied to each decoder linear weight scaled so that its output channel's
    largest magnitude is ``qmax``, then scaled back; in float32 whatever the model's dtype, so
    the only loss besides ``rounding`` is the final cast to that dtype."""
    with torch.no_grad():
        for module in decoder_layers(model).modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.to(torch.float32)
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
                module.weight.copy_(rounding(w / scale) * scale)
    return model


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run the whole model in ``dtype`` (weights and activations)."""
    return model.to(dtype)


def drop_layers(model: torch.nn.Module, n_drop: int) -> torch.nn.Module:
    """Remove ``n_drop`` evenly spaced decoder blocks (never the first): a smaller,
    cheaper model with the same vocabulary and interface."""
    layers = decoder_layers(model)
    n = len(layers)
    if not 1 <= n_drop < n:
        raise ValueError(f"can drop 1..{n - 1} of {n} layers, not {n_drop}")
    dropped = {min(n - 1, max(1, round((j + 1) * n / (n_drop + 1)))) for j in range(n_drop)}
    for candidate in range(n - 1, 0, -1):  # rounding collisions: fill up from the top
        if len(dropped) == n_drop:
            break
        dropped.add(candidate)
    kept = [layer for i, layer in enumerate(layers) if i not in dropped]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by position in the stack
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types)
                                    if i not in dropped]
    return model


def variant_engine(base: TorchEngine, transform: ModelTransform) -> TorchEngine:
    """A ``TorchEngine`` identical to ``base`` (name, tokenizer, stop tokens) but running
    ``transform`` applied to a deep copy of its weights. ``base`` is left untouched.

    TorchEngine has no public constructor from an in-memory model, so this
    swaps its model attribute on a shallow copy; the two share the forward
    lock, which is right: they share the cores."""
    engine = copy.copy(base)
    engine._model = transform(copy.deepcopy(base._model)).eval()
    return engine


# ---------------------------------------------------------------------------
# Cheaper tokens with real evidence


def prefill(cheap: Engine, real: Engine) -> Strategy:
    """The pre-fill attack: ``cheap`` writes the completion, ``real`` scores it teacher-forced
    (one prefill, far cheaper than decoding) and its logprobs are claimed as the evidence."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        written = await generate_artifact(cheap, prompt_ids, params, seed)
        scored = await real.score(prompt_ids, written.completion_ids, params.logprobs_k)
        return replace(written, model=real.model_name, steps=tuple(scored.steps))
    return run


def other_temperature(params: SamplingParams) -> SamplingParams:
    """A temperature the client did not ask for: 0.7 for greedy requests, else 1.0 (0.7 if
    1.0 was asked)."""
    if params.greedy:
        return replace(params, temperature=0.7)
    return replace(params, temperature=0.7 if params.temperature == 1.0 else 1.0)


def wrong_temperature(engine: Engine) -> Strategy:
    """Sample with :func:`other_temperature` and claim the requested parameters."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        return await generate_artifact(engine, prompt_ids, other_temperature(params), seed,
                                       claim=params)
    return run


# ---------------------------------------------------------------------------
# Other terms than the client's, stated in the artifact


Deviation = Callable[[SamplingParams], SamplingParams]


def fewer_tokens(params: SamplingParams) -> SamplingParams:
    """A quarter of the requested tokens (at least one): less work, billed as all of it."""
    return replace(params, max_tokens=max(1, params.max_tokens // 4))


def other_top_k(params: SamplingParams) -> SamplingParams:
    return replace(params, top_k=5 if params.top_k != 5 else 10)


def other_top_p(params: SamplingParams) -> SamplingParams:
    return replace(params, top_p=0.5 if params.top_p != 0.5 else 0.9)


def stating(engine: Engine, deviate: Deviation) -> Strategy:
    """Honest work on ``deviate(params)`` instead of ``params``, and an artifact that says so."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        return await generate_artifact(engine, prompt_ids, deviate(params), seed)
    return run


STEERING_CHOICES = ((0.0, 1.0), (0.3, 1.0), (1.0, 0.9), (1.3, 1.0))  # (temperature, top_p) tried


def mean_logprob(artifact: InferenceArtifact) -> float:
    """How confident the completion reads: its mean raw logprob (the steering preference;
    any other preference -- a word to push, a length -- is steered the same way)."""
    return sum(s.logprob for s in artifact.steps) / max(1, len(artifact.steps))


def steering(engine: Engine, prefer: Callable[[InferenceArtifact], float] = mean_logprob) -> Strategy:
    """Steering through parameter choice: one seed, every parameter set of
    :data:`STEERING_CHOICES` other than the requested one, and the completion ``prefer``
    likes best handed in, stating the parameters that made it."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        tried = [await generate_artifact(engine, prompt_ids, chosen, seed)
                 for t, p in STEERING_CHOICES
                 if (chosen := replace(params, temperature=t, top_p=p)) != params]
        return max(tried, key=prefer)
    return run


# ---------------------------------------------------------------------------
# Tampered artifacts


def truncate(artifact: InferenceArtifact) -> InferenceArtifact:
    """Keep the first half of the completion (at least one token): less work delivered."""
    keep = max(1, len(artifact.steps) // 2)
    return replace(artifact, steps=artifact.steps[:keep])


def alter_token(artifact: InferenceArtifact) -> InferenceArtifact:
    """Replace the middle token by the most likely *other* id of its own top-k list, with
    that id's claimed logprob, so the evidence at that position stays self-consistent."""
    position = len(artifact.steps) // 2
    step = artifact.steps[position]
    other = next(i for i, t in enumerate(step.top_ids) if t != step.token_id)
    forged = replace(step, token_id=step.top_ids[other], logprob=step.top_logprobs[other])
    steps = artifact.steps[:position] + (forged,) + artifact.steps[position + 1:]
    return replace(artifact, steps=steps)


def fabricate_logprobs(artifact: InferenceArtifact, vocab_size: int, seed: int = 0) -> InferenceArtifact:
    """Keep the tokens, make the evidence up: the chosen token listed first with a
    confident logprob, then random ids with decreasing logprobs -- what a cheater that
    never ran the pinned model can claim. Deterministic in ``seed``."""
    rng = random.Random(seed)
    k = artifact.params.logprobs_k
    steps = []
    for step in artifact.steps:
        others = _distinct_ids(rng, vocab_size, k - 1, exclude=step.token_id)
        top = -rng.uniform(0.01, 0.5)
        values = [top]
        for _ in others:
            values.append(values[-1] - rng.uniform(0.5, 3.0))
        steps.append(TokenStep(step.token_id, top, (step.token_id, *others), tuple(values)))
    return replace(artifact, steps=tuple(steps))


def _distinct_ids(rng: random.Random, vocab_size: int, n: int, exclude: int) -> list[int]:
    """``n`` distinct ids drawn uniformly from the vocabulary, never ``exclude``."""
    if vocab_size <= n:
        raise ValueError(f"a vocabulary of {vocab_size} has no {n} ids besides one")
    ids: list[int] = []
    while len(ids) < n:
        t = rng.randrange(vocab_size)
        if t != exclude and t not in ids:
            ids.append(t)
    return ids


def tampered(strategy: Strategy, tamper: Callable[[InferenceArtifact], InferenceArtifact]) -> Strategy:
    """Run ``strategy``, then ``tamper`` with its artifact before handing it in."""
    async def run(prompt_ids: list[int], params: SamplingParams, seed: bytes) -> InferenceArtifact:
        return tamper(await strategy(prompt_ids, params, seed))
    return run


# ---------------------------------------------------------------------------
# By name (benchmark rows, simulator, demo --cheater)

# Bump when a cheat would produce other artifacts for the same request (the detection
# benchmark keeps its measurements keyed by it).
CHEATS_VERSION = 1

CHEATS: dict[str, str] = {
    "fp16": "float16 weights and activations instead of the pinned float32",
    "bf16": "bfloat16 weights and activations instead of the pinned float32",
    "int8": "decoder weights fake-quantized to int8 (per-channel symmetric)",
    "int4": "decoder weights fake-quantized to int4 (per-channel symmetric)",
    "fp8": "decoder weights fake-quantized to float8 e4m3 (per-channel scale)",
    "small-model": "a quarter of the decoder layers dropped (at least one)",
    "prefill": "half the layers write the text, the real model scores it (pre-fill attack)",
    "fabricated": "real tokens, made-up logprobs",
    "truncated": "the first half of an honest completion",
    "altered": "an honest completion with its middle token replaced",
    "wrong-temperature": "sampled at another temperature than requested",
    "fewer-tokens": "a quarter of max_tokens, stating the smaller max_tokens",
    "stated-temperature": "another temperature than requested, stated in the artifact",
    "stated-top-k": "another top-k than requested, stated in the artifact",
    "stated-top-p": "another top-p than requested, stated in the artifact",
    "steering": "the preferred of several completions on other parameters, stating them",
}

ALIASES = {"small": "small-model"}  # the name for it


def cheat_named(name: str) -> str:
    """The canonical name of cheat ``name`` (an alias or itself); ValueError naming the
    choices when there is no such cheat."""
    name = ALIASES.get(name, name)
    if name not in CHEATS:
        raise ValueError(f"unknown cheat {name!r}: choose from {', '.join(CHEATS)}")
    return name


TAMPERS = ("fabricated", "truncated", "altered")
STATING: dict[str, Callable[[Engine], Strategy]] = {  # the cheats that state what they did
    "fewer-tokens": lambda engine: stating(engine, fewer_tokens),
    "stated-temperature": lambda engine: stating(engine, other_temperature),
    "stated-top-k": lambda engine: stating(engine, other_top_k),
    "stated-top-p": lambda engine: stating(engine, other_top_p),
    "steering": steering,
}


def tamper_for(name: str, vocab_size: int) -> Callable[[InferenceArtifact], InferenceArtifact]:
    """The artifact tampering called ``name`` (one of :data:`TAMPERS`)."""
    return {
        "fabricated": lambda a: fabricate_logprobs(a, vocab_size),
        "truncated": truncate,
        "altered": alter_token,
    }[name]


def make_cheater(name: str, engine: Engine) -> Strategy:
    """The strategy called ``name`` (see :data:`CHEATS`) built on ``engine``. Weight
    cheats need a ``TorchEngine``; tampering, temperature and stating cheats take any
    engine that has a ``local_model`` (both engines do)."""
    try:
        name = cheat_named(name)
    except ValueError as e:
        raise EngineError(str(e)) from None
    if name in TAMPERS:
        return tampered(honest(engine), tamper_for(name, engine.local_model.vocab_size))
    if name == "wrong-temperature":
        return wrong_temperature(engine)
    if name in STATING:
        return STATING[name](engine)
    if not isinstance(engine, TorchEngine):
        raise EngineError(f"cheat {name!r} changes the model's weights: it needs the torch engine")
    transforms: dict[str, ModelTransform] = {
        "fp16": lambda m: cast(m, torch.float16),
        "bf16": lambda m: cast(m, torch.bfloat16),
        "int8": lambda m: fake_quantize(m, 8),
        "int4": lambda m: fake_quantize(m, 4),
        "fp8": fake_quantize_fp8,
        "small-model": lambda m: drop_layers(m, max(1, len(decoder_layers(m)) // 4)),
        "prefill": lambda m: drop_layers(m, max(1, len(decoder_layers(m)) // 2)),
    }
    cheap = variant_engine(engine, transforms[name])
    return prefill(cheap, engine) if name == "prefill" else honest(cheap)
