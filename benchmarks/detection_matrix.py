"""Detection matrix: how often the verification metric rejects honest and cheating
executors, per inference and per epoch, and what validation costs.

Rows are executors (honest ones in four configurations, and each cheat of
``gonka_p2p.inference.cheats``); each row runs ``--n`` inferences per sampling
mode (greedy; T=0.7 top-p 0.9) per model on generated prompts, and every
artifact goes through what a validator does: decode the artifact bytes, score
prompt + completion teacher-forced with the torch engine (fp32, one thread),
``verification.verify``. Columns:

* rejected -- share of inferences whose verdict is invalid, with the upper
  end of its 95% Wilson interval (0 of 200 only shows "<= 1.9%");
* mean distance -- mean over comparable inferences of the per-inference mean
  |claimed - recomputed| logprob, nats;
* epoch detection -- share of simulated epochs (``--epoch-size`` validated
  inferences drawn with replacement from the row's verdicts) in which the
  SPRT of ``verification.judge_epoch`` says "cheating";
* val/gen -- validation time (score + verify) over the row executor's
  generation time, summed over the row.

Honest rows: ``honest-torch`` (torch executor and validator, one thread),
``honest-threads`` (executor on two threads), ``honest-vllm`` (vLLM executor,
one request at a time), ``honest-vllm-batch`` (vLLM, ``--batch`` concurrent
requests batched). vLLM runs in a child process: it pins process-wide state
(threads, RNGs) that the torch rows must not inherit.

``--calibrate`` runs the honest rows on a disjoint prompt split and derives
the thresholds (about 3x the p99.9 of honest noise); with ``--write`` it
rewrites ``gonka_p2p/inference/thresholds.toml``.

Every validated inference is kept under ``benchmarks/results/rows/`` (one
file per model, row, split, max_tokens, thresholds and code version), so an
interrupted run resumes where it stopped and a larger ``--n`` only runs the
inferences the smaller one did not.

    OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --n 200
    OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --calibrate --n 100 --write
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from gonka_p2p.inference import cheats, verification  # noqa: E402
from gonka_p2p.inference.artifacts import InferenceArtifact  # noqa: E402
from gonka_p2p.inference.engine import ScoredCompletion  # noqa: E402
from gonka_p2p.inference.models import DEFAULT_MODEL, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.sampler import SamplingParams  # noqa: E402
from gonka_p2p.inference.torch_engine import TorchEngine  # noqa: E402
from gonka_p2p.inference.verification import (  # noqa: E402
    Evidence,
    EpochDecision,
    ModelThresholds,
    VerificationParams,
)

RESULTS = Path(__file__).parent / "results"
THRESHOLDS_FILE = Path(verification.__file__).with_name("thresholds.toml")
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}
HONEST = ("honest-torch", "honest-threads", "honest-vllm", "honest-vllm-batch")
SUBTLE = ("fp16", "bf16", "int8")
GROSS = ("int4", "small-model", "prefill", "fabricated", "truncated", "altered",
         "wrong-temperature")
ROWS = HONEST + SUBTLE + GROSS
SHORT_PREFIXES = (1, 4, 16)  # calibration checks the widened mean limits on prefixes this long
CALIBRATION_MARGIN = 3.0  # thresholds are this many times the honest p99.9 (p90 for "suspicious")

console = Console(stderr=True)


# ---------------------------------------------------------------------------
# Workload


_TEMPLATES = (
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three tips about {}.",
    "Describe {} in a few sentences.",
    "What are the pros and cons of {}?",
    "Write a short poem about {}.",
    "Summarize the history of {}.",
    "Why do people care about {}?",
    "Write a product description for {}.",
    "Tell me an interesting fact about {}.",
)
_SUBJECTS = (
    "a robot who learns to paint", "the ocean", "volcanoes", "a lighthouse keeper",
    "photosynthesis", "the moon landing", "baking bread", "chess", "rainforests",
    "a lost cat", "electric cars", "the Roman empire", "bees", "a rainy day in Paris",
    "quantum computers", "friendship", "mountain climbing", "the internet", "jazz music",
    "a time traveler", "recycling", "the human heart", "dinosaurs", "learning a language",
    "a small bakery", "solar panels", "the water cycle", "a dragon who is afraid of fire",
    "public libraries", "coffee", "earthquakes", "a night train", "gardening",
    "black holes", "the printing press", "a talking tree", "running a marathon",
    "penguins", "video games", "a city in the year 3000",
)


def prompts(split: str) -> list[str]:
    """All template x subject prompts in a seeded order; ``calibration`` and ``evaluation``
    take alternate ones, so thresholds are never evaluated on the prompts that set them."""
    every = [t.format(s) for t in _TEMPLATES for s in _SUBJECTS]
    order = np.random.default_rng(20240601).permutation(len(every))
    offset = {"calibration": 0, "evaluation": 1}[split]
    return [every[i] for i in order[offset::2]]


@dataclass(frozen=True)
class Job:
    mode: str
    index: int
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: bytes


def jobs(engine: TorchEngine, split: str, n: int, max_tokens: int) -> list[Job]:
    """``n`` inferences per mode; prompts cycle past the split's size, seeds never repeat."""
    texts = prompts(split)
    out = []
    for mode, sampling in MODES.items():
        params = SamplingParams(max_tokens=max_tokens, **sampling)
        for i in range(n):
            ids = engine.encode_chat([("user", texts[i % len(texts)])])
            seed = hashlib.blake2b(f"{split}/{mode}/{i}".encode(), digest_size=16).digest()
            out.append(Job(mode, i, tuple(ids), params, seed))
    return out


# ---------------------------------------------------------------------------
# Executors


Made = AsyncIterator[tuple[Job, InferenceArtifact, float]]  # job, artifact, generation seconds


async def torch_artifacts(row: str, engine: TorchEngine, work: list[Job]) -> Made:
    """A torch-engine row that runs a strategy, one inference at a time."""
    strategy = cheats.honest(engine) if row in ("honest-torch", "honest-threads") \
        else cheats.make_cheater(row, engine)
    threads = torch.get_num_threads()
    for job in work:
        torch.set_num_threads(2 if row == "honest-threads" else threads)
        started = time.perf_counter()
        artifact = await strategy(list(job.prompt_ids), job.params, job.seed)
        seconds = time.perf_counter() - started
        torch.set_num_threads(threads)
        yield job, artifact, seconds


async def tampered_artifacts(row: str, engine: TorchEngine, work: list[Job],
                             honest_records: dict[tuple[str, int], dict]) -> Made:
    """The honest-torch artifacts, tampered: the cheater did the honest work (its time is
    the generation time), then tampered with the artifact before handing it in."""
    tamper = cheats.tamper_for(row, engine.local_model.vocab_size)
    for job in work:
        record = honest_records[job.mode, job.index]
        yield job, tamper(InferenceArtifact.decode(base64.b64decode(record["artifact"]))), record["gen_s"]


def vllm_worker(model: str, work: list[Job], concurrency: int) -> list[tuple[bytes, float]]:
    """Child process: a vLLM executor generating ``work``, ``concurrency`` requests at a
    time; returns encoded artifacts and per-inference seconds (batch wall time / size)."""
    from gonka_p2p.inference.vllm_engine import VLLMEngine

    async def run() -> list[tuple[bytes, float]]:
        engine = VLLMEngine(model, max_num_seqs=max(2, concurrency))
        try:
            out: list[tuple[bytes, float]] = []
            for start in range(0, len(work), concurrency):
                chunk = work[start:start + concurrency]
                began = time.perf_counter()
                made = await asyncio.gather(*[
                    cheats.generate_artifact(engine, list(j.prompt_ids), j.params, j.seed)
                    for j in chunk])
                seconds = (time.perf_counter() - began) / len(chunk)
                out += [(a.encode(), seconds) for a in made]
            return out
        finally:
            await engine.close()

    return asyncio.run(run())


async def vllm_artifacts(model: str, work: list[Job], concurrency: int) -> Made:
    """A vLLM row: the whole batch in a child process, then its artifacts one by one."""
    if not work:
        return
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        made = await asyncio.wrap_future(pool.submit(vllm_worker, model, work, concurrency))
    for job, (data, seconds) in zip(work, made, strict=True):
        yield job, InferenceArtifact.decode(data), seconds


# ---------------------------------------------------------------------------
# Validation


def noise_stats(artifact: InferenceArtifact, recomputed: ScoredCompletion) -> dict[str, float]:
    """Threshold-free statistics of one comparison, for calibration: the largest and mean
    logprob error, how far below the recomputed k-th place a claimed top-k id falls, and
    the largest sampling margin (check_token's unit: nats greedy, CDF mass sampled)."""
    logprobs = verification.recomputed_logprobs(recomputed.logits)
    errors = verification.logprob_errors(artifact, logprobs)
    top_k_gap = float(verification.top_k_shortfall(artifact, logprobs).max())
    margin = verification.sampling_check(artifact, recomputed.logits, 0.0).worst_margin
    prefix_means = {f"mean_error_first_{m}": float(errors[:m].mean()) for m in SHORT_PREFIXES}
    return {"max_error": float(errors.max()), "mean_error": float(errors.mean()),
            "top_k_gap": top_k_gap, "sampling_margin": margin, **prefix_means}


async def validate(validator: TorchEngine, artifact: InferenceArtifact,
                   thresholds: ModelThresholds | None) -> dict:
    """What a validator does with fetched artifact bytes; the record of one inference."""
    began = time.perf_counter()
    claim = InferenceArtifact.decode(artifact.encode())
    scored = await validator.score(list(claim.prompt_ids), claim.completion_ids,
                                   claim.params.logprobs_k, with_logits=True)
    record: dict = {"n_tokens": len(claim.steps)}
    if thresholds is None:
        record.update(noise_stats(claim, scored))
    else:
        verdict = verification.verify(claim, scored, thresholds,
                                      eos_token_ids=validator.eos_token_ids)
        record.update(dataclasses.asdict(verdict))
        record["evidence"] = verdict.evidence.value
        record["reasons"] = [r.split(":")[0] for r in verdict.reasons]
    record["val_s"] = time.perf_counter() - began
    return record


# ---------------------------------------------------------------------------
# Running rows (with a cache, so an interrupted run resumes)


RECORD_VERSION = 3  # bump when the records this file writes change shape
# The metric's and the cheats' code as loaded: records made by other code are not reused.
_SOURCES = b"".join(Path(m.__file__).read_bytes() for m in (verification, cheats))


def cache_path(model: str, row: str, split: str, max_tokens: int,
               thresholds: ModelThresholds | None) -> Path:
    """Where a row's records are kept; the name changes with anything that changes them.
    Records are per inference (mode, index), so a larger --n reuses the smaller run's."""
    tag = hashlib.blake2b(repr((thresholds, MODES, max_tokens, RECORD_VERSION)).encode() + _SOURCES,
                          digest_size=6).hexdigest()
    return RESULTS / "rows" / f"{model}-{split}-{row}-t{max_tokens}-{tag}.json"


def load_records(path: Path) -> dict[tuple[str, int], dict]:
    records = json.loads(path.read_text()) if path.exists() else []
    return {(r["mode"], r["index"]): r for r in records}


def save_records(path: Path, records: dict[tuple[str, int], dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(records.values())))
    tmp.replace(path)


async def run_model(model: str, rows: list[str], split: str, args, params: VerificationParams | None,
                    progress: Progress) -> tuple[str, dict[str, list[dict]]]:
    """The model's canonical name and its records per row; ``params`` None means
    calibration (noise statistics instead of verdicts). Tampering rows need the
    honest-torch row, so it always runs (or loads) first when they are asked for."""
    validator = TorchEngine(model)
    thresholds = params.for_model(validator.model_name) if params else None
    work = jobs(validator, split, args.n, args.max_tokens)
    needed = set(rows) | ({"honest-torch"} if set(rows) & set(cheats.TAMPERS) else set())
    results: dict[str, dict[tuple[str, int], dict]] = {}
    for row in [r for r in ROWS if r in needed]:
        path = cache_path(model, row, split, args.max_tokens, thresholds)
        done = load_records(path)
        todo = [j for j in work if (j.mode, j.index) not in done]
        task = progress.add_task(f"{model} {row}", total=len(work), completed=len(work) - len(todo))
        if row in cheats.TAMPERS:
            made = tampered_artifacts(row, validator, todo, results["honest-torch"])
        elif row.startswith("honest-vllm"):
            made = vllm_artifacts(model, todo, args.batch if row.endswith("batch") else 1)
        else:
            made = torch_artifacts(row, validator, todo)
        async for job, artifact, gen_s in made:
            record = await validate(validator, artifact, thresholds)
            record = {"mode": job.mode, "index": job.index, "gen_s": gen_s, **record}
            if row == "honest-torch":
                record["artifact"] = base64.b64encode(artifact.encode()).decode()
            done[job.mode, job.index] = record
            progress.advance(task)
            if len(done) % 10 == 0:
                save_records(path, done)
        save_records(path, done)
        results[row] = done
        if not console.is_terminal:  # no live bar in a log file: one line per row instead
            console.log(f"{model} {row}: {len(work)} inferences done")
    await validator.close()
    return validator.model_name, {row: [done[j.mode, j.index] for j in work]
                                  for row, done in results.items()}


# ---------------------------------------------------------------------------
# Statistics


def wilson_upper(failures: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson score interval of a proportion."""
    if n == 0:
        return 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def epoch_detection(outcomes: list[Evidence], params: VerificationParams, epoch_size: int,
                    epochs: int, seed: int) -> float:
    """Share of simulated epochs judged "cheating": each epoch validates ``epoch_size``
    inferences drawn with replacement from this executor's verdicts."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(outcomes), size=(epochs, epoch_size))
    accused = sum(
        verification.judge_epoch([outcomes[i] for i in epoch], params.sprt) is EpochDecision.CHEATING
        for epoch in picks)
    return accused / epochs


def row_class(row: str) -> str:
    return "honest" if row in HONEST else "subtle" if row in SUBTLE else "gross"


def summarize(model: str, row: str, records: list[dict], params: VerificationParams, args) -> list[dict]:
    out = []
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        rejected = sum(not r["valid"] for r in rs)
        comparable = [r["mean_distance"] for r in rs if math.isfinite(r["mean_distance"])]
        outcomes = [Evidence(r["evidence"]) for r in rs]
        detection = epoch_detection(outcomes, params, args.epoch_size, args.epochs,
                                    seed=int(hashlib.blake2b(f"{model}{row}{mode}".encode(),
                                                             digest_size=4).hexdigest(), 16))
        reasons: dict[str, int] = {}
        for r in rs:
            for reason in r["reasons"]:
                reasons[reason] = reasons.get(reason, 0) + 1
        cls = row_class(row)
        rate = rejected / len(rs)
        met = {"honest": rate <= 0.005 and detection <= 0.001,
               "gross": rate >= 0.99,
               "subtle": detection >= 0.99}[cls]
        out.append({
            "model": model, "mode": mode, "row": row, "class": cls, "n": len(rs),
            "mean_tokens": sum(r["n_tokens"] for r in rs) / len(rs),
            "short_outputs": sum(r["n_tokens"] < 16 for r in rs),
            "rejected": rate, "rejected_upper95": wilson_upper(rejected, len(rs)),
            "mean_distance": sum(comparable) / len(comparable) if comparable else math.inf,
            "epoch_detection": detection,
            "val_s": sum(r["val_s"] for r in rs) / len(rs),
            "gen_s": sum(r["gen_s"] for r in rs) / len(rs),
            "val_over_gen": sum(r["val_s"] for r in rs) / sum(r["gen_s"] for r in rs),
            "reasons": reasons, "target_met": met,
        })
    return out


_COLUMNS = ("model", "mode", "row", "class", "n", "tokens", "rejected", "(95% up)",
            "mean distance", "epoch det.", "val ms", "gen ms", "val/gen", "target", "reasons")


def table_cells(s: dict) -> list[str]:
    target = {"honest": "rej<=0.5%, epochs<=0.1%", "gross": "rej>=99%", "subtle": "epochs>=99%"}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1]))
    return [s["model"], s["mode"], s["row"], s["class"], str(s["n"]), f"{s['mean_tokens']:.1f}",
            f"{100 * s['rejected']:.1f}%", f"{100 * s['rejected_upper95']:.1f}%",
            f"{s['mean_distance']:.2e}", f"{100 * s['epoch_detection']:.1f}%",
            f"{1000 * s['val_s']:.0f}", f"{1000 * s['gen_s']:.0f}", f"{s['val_over_gen']:.2f}",
            ("met " if s["target_met"] else "MISSED ") + target[s["class"]], reasons]


def write_matrix(summaries: list[dict], args, params: VerificationParams) -> None:
    table = Table(title="Detection matrix")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")
    for s in summaries:
        table.add_row(*table_cells(s))
    Console(width=None if console.is_terminal else 200).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"n": args.n, "max_tokens": args.max_tokens, "epoch_size": args.epoch_size,
            "epochs": args.epochs, "batch": args.batch, "modes": MODES,
            "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "thresholds": {m: dataclasses.asdict(t) for m, t in params.models.items()},
            "sprt": dataclasses.asdict(params.sprt)}
    (RESULTS / "detection_matrix.json").write_text(
        json.dumps({"meta": meta, "rows": summaries}, indent=1))
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(table_cells(s)) + " |" for s in summaries]
    header = (f"n = {args.n} per row and mode, max_tokens = {args.max_tokens}, epochs of "
              f"{args.epoch_size} validated inferences ({args.epochs} simulated), "
              f"OMP_NUM_THREADS={meta['threads']}, torch {torch.__version__}.\n\n")
    (RESULTS / "detection_matrix.md").write_text(header + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# Calibration


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q, method="higher"))


def calibrate(records: dict[str, list[dict]]) -> tuple[ModelThresholds, dict]:
    """Thresholds from honest noise: CALIBRATION_MARGIN x p99.9 (max error, mean error)
    and x p90 (mean error) for "suspicious", the mean limits holding at the median output
    length; plus the record of what was measured."""
    every = [r for rs in records.values() for r in rs]
    max_errors = [r["max_error"] for r in every]
    mean_errors = [r["mean_error"] for r in every]
    thresholds = ModelThresholds(
        logprob_tolerance=CALIBRATION_MARGIN * quantile(max_errors, 0.999),
        max_mean_distance=CALIBRATION_MARGIN * quantile(mean_errors, 0.999),
        suspicious_mean_distance=CALIBRATION_MARGIN * quantile(mean_errors, 0.9),
        reference_tokens=int(np.median([r["n_tokens"] for r in every])),
    )
    # Short outputs: the widened limits must still hold the honest prefixes' means.
    short = {}
    for m in SHORT_PREFIXES:
        means = [r[f"mean_error_first_{m}"] for r in every]
        short[f"p999_mean_error_first_{m}"] = quantile(means, 0.999)
        short[f"mean_limit_first_{m}"] = thresholds.mean_limit(thresholds.max_mean_distance, m)
        short[f"suspicious_first_{m}"] = sum(
            v > thresholds.mean_limit(thresholds.suspicious_mean_distance, m) for v in means) / len(means)
    by_mode = {m: [r for r in every if r["mode"] == m] for m in MODES}
    measured = {
        "inferences": len(every),
        "honest_rows": sorted(records),
        "p999_max_error": quantile(max_errors, 0.999),
        "max_max_error": max(max_errors),
        "p999_mean_error": quantile(mean_errors, 0.999),
        "p90_mean_error": quantile(mean_errors, 0.9),
        "max_top_k_gap": max(r["top_k_gap"] for r in every),
        "max_greedy_margin_nats": max(r["sampling_margin"] for r in by_mode["greedy"]),
        "max_sampled_margin_cdf": max(r["sampling_margin"] for r in by_mode["sampled"]),
        "val_over_gen": sum(r["val_s"] for r in every) / sum(r["gen_s"] for r in every),
        **short,
    }
    return thresholds, measured


def thresholds_toml(calibrated: dict[str, tuple[ModelThresholds, dict]], params: VerificationParams,
                    args) -> str:
    """The thresholds file: values, and under each model the calibration that chose them."""
    def value(v: object) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v) if isinstance(v, int) else f"{v:.3e}"

    lines = [
        "# Verification thresholds per model and the epoch test (gonka_p2p/inference/verification.py).",
        "# Written by: OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --calibrate --write",
        f"#   --n {args.n} --max-tokens {args.max_tokens} (calibration prompt split, disjoint from the",
        "#   evaluation split). Pinned configuration: fp32 weights and compute on CPU, torch and",
        "#   vLLM engines as executors, the torch engine (one thread) as validator.",
        f"# Rule: thresholds = {CALIBRATION_MARGIN} x p99.9 of honest noise (p90 for",
        "#   suspicious_mean_distance); units: nats. With a few hundred honest inferences the",
        "#   p99.9 is close to the largest value observed, so the margin also covers the tail.",
        "# The [sprt] rates are design values, not measurements: honest_* are upper bounds",
        "#   above the measured honest rates (see calibration.*), cheat_* the weakest cheat the",
        "#   epoch test is designed for; alpha/beta are per Wald run.",
        "",
        "[sprt]",
    ]
    lines += [f"{f.name} = {getattr(params.sprt, f.name)!r}" for f in dataclasses.fields(params.sprt)]
    for model, (thresholds, measured) in sorted(calibrated.items()):
        lines += ["", f'[models."{model}"]']
        lines += [f"{f.name} = {value(getattr(thresholds, f.name))}"
                  for f in dataclasses.fields(thresholds)]
        lines += ["", f'[models."{model}".calibration]',
                  f"date = {value(time.strftime('%Y-%m-%d'))}",
                  f"torch = {value(torch.__version__)}"]
        lines += [f"{k} = {value(v)}" for k, v in measured.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="inferences per row and sampling mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=[TINY_MODEL, DEFAULT_MODEL])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests of honest-vllm-batch")
    parser.add_argument("--epoch-size", type=int, default=30, help="validated inferences per epoch")
    parser.add_argument("--epochs", type=int, default=2000, help="simulated epochs per row")
    parser.add_argument("--thresholds", type=Path, default=None, help="default: the package's file")
    parser.add_argument("--calibrate", action="store_true", help="measure honest noise instead")
    parser.add_argument("--write", action="store_true", help="with --calibrate: rewrite thresholds.toml")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if args.calibrate:
        params = verification.load_verification_params(args.thresholds) \
            if (args.thresholds or THRESHOLDS_FILE).exists() else VerificationParams(models={})
        calibrated = {}
        with Progress(*columns, console=console) as progress:
            for model in args.models:
                name, records = await run_model(model, list(HONEST), "calibration", args, None,
                                                progress)
                calibrated[name] = calibrate(records)
        for model, (thresholds, measured) in calibrated.items():
            console.print(model, thresholds, measured)
        text = thresholds_toml(calibrated, params, args)
        if args.write:
            THRESHOLDS_FILE.write_text(text)
            console.print(f"wrote {THRESHOLDS_FILE}")
        else:
            print(text)
        return
    params = verification.load_verification_params(args.thresholds)
    summaries = []
    with Progress(*columns, console=console) as progress:
        for model in args.models:
            name, results = await run_model(model, args.rows, "evaluation", args, params, progress)
            for row in args.rows:
                summaries += summarize(name, row, results[row], params, args)
    write_matrix(summaries, args, params)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
