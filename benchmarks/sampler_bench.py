"""Sampler benchmark (issue 13): the batched seeded sampler against the per-request path
it replaced, and against the engine's own decode step, side by side in one run.

1. Microbenchmark, on the device chosen at run time (CUDA when there is one, else
   the CPU): one ``sampler.sample_batch`` over ``--batch`` rows, for each vocabulary
   of ``--vocabs`` and each sampling mix, next to the old path -- ``SeededSampling``
   as of ``OLD``: per request per step, the row copied to the host and one
   ``choose_token`` of that commit's sampler (loaded from git). Rows are real
   logits of the model over a natural text; a larger vocabulary extends each row
   with logits drawn from its own lower half (a longer tail, as a bigger vocabulary
   has). The old path is timed on ``--old-rows`` rows and scaled to the batch.
2. vLLM end to end (one child process per configuration): ``--batch`` requests of
   ``--max-tokens`` tokens (EOS ignored), with the seeded sampler (``SeededSampling``,
   vLLM greedy on the forced rows) and with vLLM's own sampler at the same
   parameters: tokens/s over the run, and the median decode step (``engine.step()``
   while every request decodes). Where vLLM is not installed (an accelerator
   machine without its wheel), the same run on transformers instead: one batched
   forward per step over a KV cache in ``--dtype``, choosing with ``sample_batch``
   or with transformers' own temperature / top-p warpers and a multinomial draw.
   Transformers' step is slower than vLLM's (no CUDA graphs, no paged attention),
   so its share is a lower bound of the share against vLLM's step there.
3. The share: the batched sampler's time over the engine's own decode step. The model's
   vocabulary is its own (SmolLM2: 49152); for another vocabulary the step is the
   same model's, so the share there is against a step with a smaller LM head than a
   152k-vocabulary model would have (an upper bound on the share).

    OMP_NUM_THREADS=2 python benchmarks/sampler_bench.py
    OMP_NUM_THREADS=1 python benchmarks/sampler_bench.py --quick   # smoke: tiny model, small batch
    python benchmarks/sampler_bench.py --batch 64 --old-rows 0 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.models import load_local_model  # noqa: E402
from gonka_p2p.inference.sampler import RowRules, SamplingParams, sample_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD = "bab5d31"  # the last commit with the per-request SeededSampling
TEXT = ("The river wound through the valley, past the old mill and the orchards, until it met "
        "the sea. Every spring the farmers would gather on its banks to mend the nets, trade "
        "seeds and argue about the weather. Nobody remembered who had built the first bridge, "
        "but everyone agreed it should be repaired before the autumn rains. ") * 8
MIXES: dict[str, Callable[[int], SamplingParams]] = {
    "greedy": lambda i: SamplingParams(max_tokens=8),
    "T=1": lambda i: SamplingParams(max_tokens=8, temperature=1.0),
    "T=0.7 top-p 0.9": lambda i: SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9),
    "mixed": lambda i: (SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=1.0),
                        SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9),
                        SamplingParams(max_tokens=8, temperature=0.8, top_k=50))[i % 4],
}


def old_sampler() -> ModuleType:
    """``inference/sampler.py`` as of ``OLD``, under a private name."""
    source = subprocess.run(["git", "show", f"{OLD}:gonka_p2p/inference/sampler.py"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("_old_sampler", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    exec(compile(source, f"{OLD}:sampler.py", "exec"), module.__dict__)
    return module


def model_logits(model: str, batch: int) -> torch.Tensor:
    """``batch`` real next-token logits rows of ``model`` (float32) over ``TEXT``."""
    from transformers import AutoModelForCausalLM

    local = load_local_model(model)
    ids = local.tokenizer(TEXT)["input_ids"][: batch + 1]
    net = AutoModelForCausalLM.from_pretrained(local.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        rows = net(input_ids=torch.tensor([ids])).logits[0].to(torch.float32)
    return rows[torch.arange(batch) % len(rows)]


def widened(rows: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """``rows`` extended to ``vocab`` with logits drawn from each row's own lower half."""
    extra = vocab - rows.shape[1]
    if extra <= 0:
        return rows[:, :vocab].contiguous()
    g = torch.Generator().manual_seed(seed)
    low = rows.sort(dim=1).values[:, : rows.shape[1] // 2]
    picks = torch.randint(0, low.shape[1], (rows.shape[0], extra), generator=g)
    return torch.cat([rows, low.gather(1, picks)], dim=1)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def microbenchmark(rows: torch.Tensor, vocabs: list[int], device: torch.device, repeats: int,
                   old_rows: int) -> list[dict]:
    """Per (vocabulary, mix): the batched sampler's ms per step, and the old path's (not
    timed with ``old_rows`` 0: it needs the git history, which a copied tree lacks)."""
    old = old_sampler() if old_rows else None
    batch = rows.shape[0]
    results = []
    for vocab in vocabs:
        logits = widened(rows, vocab).to(device)
        positions = torch.arange(batch, device=device)
        for mix, rule in MIXES.items():
            rules = [(rule(i), f"bench-{i}".encode()) for i in range(batch)]
            row_rules = RowRules.of(rules, vocab, device)
            batched = timed(lambda: sample_batch(logits, row_rules, positions), device, repeats)

            def per_request() -> None:
                for i in range(old_rows):
                    old.choose_token(logits[i].cpu(), rules[i][0], rules[i][1], i)

            per = timed(per_request, device, 1) * batch / old_rows if old else math.nan
            results.append({"vocab": vocab, "mix": mix, "batched_ms": batched * 1e3,
                            "old_per_request_ms": per * 1e3, "speedup": per / batched})
    return results


def bench_prompts(tokenizer, batch: int, length: int = 12) -> torch.Tensor:
    """``batch`` prompts of exactly ``length`` tokens cut from ``TEXT`` (no padding needed)."""
    ids = tokenizer(TEXT)["input_ids"]
    return torch.tensor([ids[(7 * i) % (len(ids) - length):][:length] for i in range(batch)])


def torch_run(model: str, batch: int, max_tokens: int, seeded: bool, dtype: str,
              device: torch.device, repeats: int) -> dict:
    """vLLM's run on transformers: ``batch`` requests decoded together over one KV cache in
    ``dtype`` on ``device``, T=0.7 top-p 0.9, chosen by the seeded sampler or by
    transformers' own warpers and a multinomial draw; the best of ``repeats`` runs."""
    from transformers import AutoModelForCausalLM, TemperatureLogitsWarper, TopPLogitsWarper

    local = load_local_model(model)
    net = AutoModelForCausalLM.from_pretrained(local.path, dtype=getattr(torch, dtype)).to(device).eval()
    prompts = bench_prompts(local.tokenizer, batch).to(device)
    rule = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9)
    rules = RowRules.of([(rule, f"r{i}".encode()) for i in range(batch)], local.vocab_size, device)
    warpers = (TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9))

    def choose(logits: torch.Tensor, position: int) -> torch.Tensor:
        if seeded:
            return sample_batch(logits, rules, torch.full((batch,), position, device=device))
        for warp in warpers:
            logits = warp(None, logits)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).view(-1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    best: dict = {}
    for _ in range(repeats):
        steps = []
        sync()
        began = time.perf_counter()
        with torch.inference_mode():
            out = net(input_ids=prompts, use_cache=True)
            for position in range(max_tokens):
                start = time.perf_counter()
                token = choose(out.logits[:, -1].to(torch.float32), position)
                if position + 1 < max_tokens:
                    out = net(input_ids=token.view(-1, 1), past_key_values=out.past_key_values, use_cache=True)
                sync()
                steps.append(time.perf_counter() - start)
        wall = time.perf_counter() - began
        run = {"seeded": seeded, "engine": f"transformers {dtype}", "tokens": batch * max_tokens,
               "wall_s": wall, "tok_s": batch * max_tokens / wall,
               "decode_step_ms": statistics.median(steps[1:]) * 1e3}
        best = run if not best or run["wall_s"] < best["wall_s"] else best
    return best


def vllm_run(model: str, batch: int, max_tokens: int, seeded: bool) -> dict:
    """In a child process: one vLLM engine, ``batch`` requests of ``max_tokens`` at T=0.7,
    top-p 0.9 -- seeded (our processor) or vLLM's own sampler."""
    # in this process, on the V1 runner, as VLLMEngine runs it
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_V2_MODEL_RUNNER="0")
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.llm_engine import LLMEngine

    from gonka_p2p.inference.models import model_spec
    from gonka_p2p.inference.vllm_engine import rule_args, vllm_engine_args

    local = load_local_model(model)
    args = vllm_engine_args(local, model_spec(model), 1.0, batch, on_cpu=current_platform.is_cpu())
    if not seeded:
        args["logits_processors"] = None
    engine = LLMEngine.from_engine_args(EngineArgs(**args))
    words = TEXT.split()
    rule = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9)
    for i in range(batch):
        prompt = local.tokenizer(" ".join(words[i % 40: i % 40 + 12]))["input_ids"]
        common = dict(max_tokens=max_tokens, ignore_eos=True, detokenize=False, logprobs=5)
        params = (VllmSamplingParams(temperature=0.0, extra_args=rule_args(rule, f"r{i}".encode()), **common)
                  if seeded else VllmSamplingParams(temperature=0.7, top_p=0.9, **common))
        # (no per-request seed for vLLM's own sampler: vLLM 0.32 on a CPU fails on one)
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    steps, tokens = [], 0
    began = time.perf_counter()
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - start)
        tokens += sum(len(out.outputs[0].token_ids) for out in outputs if out.finished)
    wall = time.perf_counter() - began
    engine.engine_core.shutdown()
    decode = steps[-max(1, max_tokens // 2):]  # every request is decoding by then
    return {"seeded": seeded, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "decode_step_ms": statistics.median(decode) * 1e3}


def vllm_runs(model: str, batch: int, max_tokens: int) -> list[dict]:
    """Both configurations, each in a fresh spawned process (vLLM keeps process-wide state)."""
    runs = []
    for seeded in (False, True):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            runs.append(pool.submit(vllm_run, model, batch, max_tokens, seeded).result() | {"engine": "vLLM"})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, batch 8, 2 repeats")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--vocabs", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--old-rows", type=int, default=None, help="rows the old path is timed on")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES,
                        help="the transformers run's dtype, where vLLM is not installed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    quick = args.quick
    model = args.model or (TINY_MODEL if quick else DEFAULT_MODEL)
    batch = args.batch or (8 if quick else 256)
    vocabs = args.vocabs or ([49152] if quick else [49152, 151936])
    max_tokens = args.max_tokens or (4 if quick else 16)
    repeats = args.repeats or (2 if quick else 5)
    old_rows = min(batch, (4 if quick else 32) if args.old_rows is None else args.old_rows)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    print(f"# gonka-p2p sampler benchmark: {model}, batch {batch}, device {device}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    rows = model_logits(model, batch)
    micro = microbenchmark(rows, vocabs, device, repeats, old_rows)
    print(f"\n## Sampler per step, batch {batch} (old path timed on {old_rows} rows, scaled)")
    print("| vocab | mix | batched ms | old per-request ms | speedup |")
    print("|---|---|---|---|---|")
    for r in micro:
        print(f"| {r['vocab']} | {r['mix']} | {r['batched_ms']:.3f} | {r['old_per_request_ms']:.1f} | "
              f"{r['speedup']:.1f}x |", flush=True)
    if importlib.util.find_spec("vllm"):
        runs = vllm_runs(model, batch, max_tokens)
    else:
        runs = [torch_run(model, batch, max_tokens, seeded, args.dtype, device, repeats)
                for seeded in (False, True)]
    engine = runs[0]["engine"]
    print(f"\n## {engine} end to end ({model}, {batch} requests x {max_tokens} tokens, T=0.7 top-p 0.9)")
    print("| sampler | tok/s | decode step ms | wall s |")
    print("|---|---|---|---|")
    for r in runs:
        name = "seeded (sample_batch)" if r["seeded"] else f"{engine}'s own"
        print(f"| {name} | {r['tok_s']:.1f} | {r['decode_step_ms']:.2f} | {r['wall_s']:.2f} |")
    step = next(r for r in runs if not r["seeded"])["decode_step_ms"]
    print(f"\n## Batched sampler as a share of {engine}'s own decode step ({step:.2f} ms, {model})")
    print("| vocab | mix | share |")
    print("|---|---|---|")
    for r in micro:
        r["share_of_step"] = r["batched_ms"] / step
        print(f"| {r['vocab']} | {r['mix']} | {100 * r['share_of_step']:.2f} % |")
    print(f"\nload average at the end {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"model": model, "batch": batch, "device": str(device),
                                        "micro": micro, "vllm": runs}, indent=1))


if __name__ == "__main__":
    main()
