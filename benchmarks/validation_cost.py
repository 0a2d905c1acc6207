"""Validation cost: what a validator spends re-checking one inference, against what
generating it cost, before and after the batched validation pass, side by side.

For each model, ``--n`` honest inferences per sampling mode (greedy; T=0.7 top-p
0.9; prompts and seeds as ``detection_matrix.py`` makes them) are generated twice:
by the torch engine one at a time, and by the vLLM engine ``--batch`` requests
at a time (in a child process, batch wall time / batch size per inference). Each
artifact is then validated -- decode, score teacher-forced with the torch engine
(one thread), ``verification.measure`` -- by two validators in turn, alternating
which goes first so that drift on a shared machine hits both alike:

* ``baseline``: the validator code as of ``BASELINE`` (before the batched pass:
  the LM head over every prompt and completion position, per-position evidence
  and a per-position sampling check), loaded from git under private names;
* ``batched``: the code in this tree.

Both must produce identical ``Measurements`` (the run stops otherwise), so the
table compares the cost of the same verdicts. Ratios val/gen are per executor:
torch generation is memory-bound one token at a time, batched vLLM generation
shares each weight read among the batch, so the second ratio is the hard one.

    OMP_NUM_THREADS=1 python benchmarks/validation_cost.py
    OMP_NUM_THREADS=1 python benchmarks/validation_cost.py --models tiny-llama --n 2  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from detection_matrix import DEFAULT_MODES, Job, jobs, vllm_artifacts  # sets the thread and log env first

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from gonka_p2p.adversary import cheats  # noqa: E402
from gonka_p2p.inference import verification  # noqa: E402
from gonka_p2p.inference.artifacts import InferenceArtifact  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.torch_engine import TorchEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASELINE = "5a54fe2107da7e7d21c9884d95442e746051be26"  # last commit before the batched validation pass
EXECUTORS = ("torch", "vllm-batch")

console = Console(stderr=True)

Validate = Callable[[InferenceArtifact], Awaitable[verification.Measurements]]


def baseline_modules(commit: str) -> tuple[ModuleType, ModuleType]:
    """``(verification, torch_engine)`` as of ``commit``, each importing the sampler and
    artifacts of that commit, under private module names (the current ones stay as they are)."""
    modules = {}
    own = ("sampler", "artifacts")  # what the others import from their own commit, not this tree
    for name in (*own, "verification", "torch_engine"):
        source = subprocess.run(["git", "show", f"{commit}:gonka_p2p/inference/{name}.py"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        private = f"_baseline_{name}"
        for dependency in own:
            source = source.replace(f"gonka_p2p.inference.{dependency}", f"_baseline_{dependency}")
        spec = importlib.util.spec_from_loader(private, loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[private] = module  # dataclasses look their module up while being defined
        exec(compile(source, f"{commit[:7]}:{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["verification"], modules["torch_engine"]


def validator(engine: TorchEngine, metric: ModuleType) -> Validate:
    """What a validator does with fetched artifact bytes, up to the threshold-free
    measurements: decode, score teacher-forced with logits, measure."""
    async def validate(artifact: InferenceArtifact) -> verification.Measurements:
        claim = InferenceArtifact.decode(artifact.encode())
        scored = await engine.score(list(claim.prompt_ids), claim.completion_ids,
                                    claim.params.logprobs_k, with_logits=True)
        return metric.measure(claim, scored, eos_token_ids=engine.eos_token_ids)
    return validate


@dataclass
class Row:
    """One (model, executor, mode): per-inference seconds."""

    model: str
    executor: str
    mode: str
    tokens: list[int] = dataclasses.field(default_factory=list)
    gen_s: list[float] = dataclasses.field(default_factory=list)
    baseline_s: list[float] = dataclasses.field(default_factory=list)
    batched_s: list[float] = dataclasses.field(default_factory=list)


async def generated(executor: str, engine: TorchEngine, work: list[Job], batch: int
                    ) -> list[tuple[Job, InferenceArtifact, float]]:
    """``work`` generated by ``executor``, with the generation seconds of each inference.
    vLLM first runs one batch that is thrown away: its first steps include its warm-up."""
    if executor == "vllm-batch":
        warmup = work[:batch]
        made = [m async for m in vllm_artifacts(engine.model_name, warmup + work, batch)]
        return made[len(warmup):]
    out = []
    for job in work:
        started = time.perf_counter()
        artifact = await cheats.honest(engine)(list(job.prompt_ids), job.params, job.seed)
        out.append((job, artifact, time.perf_counter() - started))
    return out


async def timed(validate: Validate, artifact: InferenceArtifact
                ) -> tuple[verification.Measurements, float]:
    started = time.perf_counter()
    measured = await validate(artifact)
    return measured, time.perf_counter() - started


async def run_model(model: str, args: argparse.Namespace) -> list[Row]:
    engine = TorchEngine(model)
    old_verification, old_torch_engine = baseline_modules(args.baseline)
    old_engine = old_torch_engine.TorchEngine(model)
    baseline, batched = validator(old_engine, old_verification), validator(engine, verification)
    work = jobs(engine, "evaluation", args.n, args.max_tokens)
    rows = {(e, m): Row(engine.model_name, e, m) for e in EXECUTORS for m in DEFAULT_MODES}
    for executor in EXECUTORS:
        made = await generated(executor, engine, work, args.batch)
        for warmup in (baseline, batched):
            await warmup(made[0][1])
        for i, (job, artifact, gen_s) in enumerate(made):
            first, second = (baseline, batched) if i % 2 == 0 else (batched, baseline)
            a, b = await timed(first, artifact), await timed(second, artifact)
            (old_m, old_s), (new_m, new_s) = (a, b) if first is baseline else (b, a)
            # Later versions measure more, never less; and the sampling rule itself changed since the
            # baseline (inference/sampler.py, MEASURE_VERSION 2), so its margins are not comparable.
            shared = [f.name for f in dataclasses.fields(old_m) if f.name != "sampling_margins"]
            if [getattr(old_m, n) for n in shared] != [getattr(new_m, n) for n in shared]:
                raise SystemExit(f"{model} {executor} {job.mode} #{job.index}: the batched pass "
                                 f"measured {new_m}, the baseline {old_m}")
            row = rows[executor, job.mode]
            row.tokens.append(len(artifact.completion_ids))
            row.gen_s.append(gen_s)
            row.baseline_s.append(old_s)
            row.batched_s.append(new_s)
        console.log(f"{engine.model_name} {executor}: {len(made)} inferences validated twice")
    await engine.close()
    await old_engine.close()
    return list(rows.values())


COLUMNS = ("model", "executor", "mode", "n", "tokens", "gen ms", "val ms baseline",
           "val ms batched", "speedup", "val/gen baseline", "val/gen batched")


def cells(row: Row) -> list[str]:
    """Medians per inference, robust to bursts of load on a shared machine; the speedup is
    the median of the paired per-artifact ratios (both validators checked the same one)."""
    gen, old, new = (statistics.median(x) for x in (row.gen_s, row.baseline_s, row.batched_s))
    speedup = statistics.median(o / b for o, b in zip(row.baseline_s, row.batched_s, strict=True))
    return [row.model, row.executor, row.mode, str(len(row.gen_s)), f"{statistics.mean(row.tokens):.1f}",
            f"{1000 * gen:.0f}", f"{1000 * old:.1f}", f"{1000 * new:.1f}", f"{speedup:.2f}x",
            f"{old / gen:.3f}", f"{new / gen:.3f}"]


def report(rows: list[Row], args: argparse.Namespace) -> None:
    table = Table(title="Validation cost per inference (baseline and batched validator, same run)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "executor", "mode") else "right")
    body = [cells(r) for r in rows]
    for line in body:
        table.add_row(*line)
    Console(width=200).print(table)
    header = (f"n = {args.n} per executor and mode, max_tokens = {args.max_tokens}, vLLM batch = "
              f"{args.batch}, OMP_NUM_THREADS=1, torch {torch.__version__}; baseline = validator "
              f"code at {args.baseline[:7]}, batched = this tree. Identical Measurements for every "
              "artifact. Milliseconds are medians per inference; gen ms: torch one request at a "
              "time, vLLM batch wall time / batch size (after a discarded warm-up batch); val/gen "
              "= median val / median gen; speedup = median of per-artifact baseline/batched.\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation_cost.md").write_text(
        "# Validation cost\n\n" + header + "\n".join(lines) + "\n\nCommand: `"
        + " ".join(["OMP_NUM_THREADS=1 python benchmarks/validation_cost.py", *sys.argv[1:]]) + "`\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="inferences per executor and sampling mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=[TINY_MODEL, DEFAULT_MODEL])
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests of the vLLM executor")
    parser.add_argument("--baseline", default=BASELINE, help="commit whose validator is the baseline")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where validation_cost.md goes")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for model in args.models for row in await run_model(model, args)]
    report(rows, args)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
