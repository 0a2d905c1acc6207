"""Detection matrix: how often the verification metric rejects honest and cheating
executors, per inference and per epoch, and what validation costs.

Rows are executors (honest ones in four configurations, and each cheat of
``gonka_p2p.adversary.cheats``); each row runs ``--n`` inferences per sampling
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
  ledger's epoch test (``rules.sprt_catches``) accuses the executor;
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
from collections.abc import AsyncIterator, Iterable
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

from gonka_p2p.adversary import cheats  # noqa: E402
from gonka_p2p.inference import verification  # noqa: E402
from gonka_p2p.inference.artifacts import InferenceArtifact  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.sampler import SamplingParams  # noqa: E402
from gonka_p2p.inference.torch_engine import TorchEngine  # noqa: E402
from gonka_p2p.inference.verification import (  # noqa: E402
    Contract,
    Evidence,
    Measurements,
    ModelThresholds,
    VerificationParams,
)
from gonka_p2p.ledger.genesis import Params, sprt_params_from_rates  # noqa: E402
from gonka_p2p.ledger.rules import sprt_catches  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THRESHOLDS_FILE = Path(verification.__file__).with_name("thresholds.toml")
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}
HONEST = ("honest-torch", "honest-threads", "honest-vllm", "honest-vllm-batch")
SUBTLE = ("fp16", "bf16", "int8")
GROSS = ("int4", "small-model", "prefill", "fabricated", "truncated", "altered",
         "wrong-temperature", *cheats.STATING)
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


async def validate(validator: TorchEngine, job: Job, artifact: InferenceArtifact) -> dict:
    """What a validator does with fetched artifact bytes, up to the (cheap, threshold-
    dependent) judgement: decode, score teacher-forced, measure by the job's request (the
    contract: its prompt, parameters and seed, never the artifact's statement of them).
    The record of one inference."""
    began = time.perf_counter()
    claim = InferenceArtifact.decode(artifact.encode())
    contract = Contract(validator.model_name, job.prompt_ids, job.params, job.seed)
    scored = await validator.score(list(contract.prompt_ids), claim.completion_ids,
                                   contract.params.logprobs_k, with_logits=True)
    measured = verification.measure(claim, scored, eos_token_ids=validator.eos_token_ids, contract=contract)
    return {**dataclasses.asdict(measured), "val_s": time.perf_counter() - began}


def measurements(record: dict) -> Measurements:
    return Measurements(**{f.name: tuple(v) if isinstance(v, list) else v
                           for f in dataclasses.fields(Measurements) for v in [record[f.name]]})


# ---------------------------------------------------------------------------
# Running rows (with a cache, so an interrupted run resumes)


RECORD_VERSION = 4  # bump when the records this file writes change shape


def cache_path(results: Path, model: str, row: str, split: str, max_tokens: int) -> Path:
    """Where a row's records are kept; the name changes with anything that changes them:
    the sampling modes, the length, this file's record shape, and the versions of the
    metric's measurements and of the cheats (not their source text: an equivalent rewrite
    must not throw away hours of measurements). Records are per inference (mode, index),
    so a larger --n reuses the smaller run's; they are threshold-free measurements, so new
    thresholds reuse them too."""
    versions = (MODES, max_tokens, RECORD_VERSION, verification.MEASURE_VERSION, cheats.CHEATS_VERSION)
    tag = hashlib.blake2b(repr(versions).encode(), digest_size=6).hexdigest()
    return results / "rows" / f"{model}-{split}-{row}-t{max_tokens}-{tag}.json"


def load_records(path: Path) -> dict[tuple[str, int], dict]:
    records = json.loads(path.read_text()) if path.exists() else []
    return {(r["mode"], r["index"]): r for r in records}


def save_records(path: Path, records: dict[tuple[str, int], dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(records.values())))
    tmp.replace(path)


async def run_model(model: str, rows: list[str], split: str, args,
                    progress: Progress) -> tuple[str, dict[str, list[dict]]]:
    """The model's canonical name and its records per row. Tampering rows need the
    honest-torch row, so it always runs (or loads) first when they are asked for."""
    validator = TorchEngine(model)
    work = jobs(validator, split, args.n, args.max_tokens)
    needed = set(rows) | ({"honest-torch"} if set(rows) & set(cheats.TAMPERS) else set())
    results: dict[str, dict[tuple[str, int], dict]] = {}
    for row in [r for r in ROWS if r in needed]:
        path = cache_path(args.results, model, row, split, args.max_tokens)
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
            record = await validate(validator, job, artifact)
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


def accusation_rate(epochs: Iterable[list[Evidence]], params: VerificationParams) -> float:
    """Share of ``epochs`` (each one executor's validated verdicts) the ledger's epoch test
    accuses, with the integer parameters a genesis derives from ``params``' rates."""
    ledger = Params(**sprt_params_from_rates(**dataclasses.asdict(params.sprt)))
    caught = [sprt_catches([e.observation for e in epoch], ledger) for epoch in epochs]
    return sum(caught) / len(caught)


def resampled_epochs(outcomes: list[Evidence], epoch_size: int, epochs: int,
                     seed: int) -> list[list[Evidence]]:
    """Epochs of ``epoch_size`` verdicts drawn with replacement from measured ones."""
    picks = np.random.default_rng(seed).integers(0, len(outcomes), size=(epochs, epoch_size))
    return [[outcomes[i] for i in epoch] for epoch in picks]


def synthetic_epochs(fail: float, suspicious: float, epoch_size: int, epochs: int,
                     seed: int) -> list[list[Evidence]]:
    """Epochs whose verdicts fail / look suspicious independently at the given rates."""
    draws = np.random.default_rng(seed).random((epochs, epoch_size))
    return [[Evidence.FAILED if x < fail else Evidence.SUSPICIOUS if x < fail + suspicious
             else Evidence.CLEAN for x in epoch] for epoch in draws]


# Per-inference outcome rates (failed, suspicious) the epoch test is characterised at.
OPERATING_POINTS = (
    ("honest, design rates", 0.005, 0.01), ("suspicious 10%", 0.0, 0.1),
    ("suspicious 20%", 0.0, 0.2), ("suspicious 30%", 0.0, 0.3), ("suspicious 50%", 0.0, 0.5),
    ("failed 10%", 0.1, 0.0), ("failed 20%", 0.2, 0.0), ("failed 50%", 0.5, 0.0),
)
OPERATING_EPOCH_SIZES = (10, 20, 30, 50)


def operating_characteristic(params: VerificationParams, epochs: int) -> list[list[str]]:
    """Accused share of epochs for synthetic executors: how much per-inference evidence
    the epoch test needs, independent of any model."""
    return [[label, f"{100 * fail:g}%", f"{100 * suspicious:g}%"] + [
        f"{100 * accusation_rate(synthetic_epochs(fail, suspicious, size, epochs, seed=size), params):.2f}%"
        for size in OPERATING_EPOCH_SIZES] for label, fail, suspicious in OPERATING_POINTS]


def row_class(row: str) -> str:
    return "honest" if row in HONEST else "subtle" if row in SUBTLE else "gross"


def summarize(model: str, row: str, records: list[dict], params: VerificationParams, args) -> list[dict]:
    out = []
    thresholds = params.for_model(model)
    for mode in MODES:
        rs = [r | dataclasses.asdict(verification.judge(measurements(r), thresholds))
              for r in records if r["mode"] == mode]
        rejected = sum(not r["valid"] for r in rs)
        comparable = [r["mean_distance"] for r in rs if math.isfinite(r["mean_distance"])]
        seed = int.from_bytes(hashlib.blake2b(f"{model}{row}{mode}".encode(), digest_size=4).digest())
        detection = accusation_rate(resampled_epochs([Evidence(r["evidence"]) for r in rs],
                                                     args.epoch_size, args.epochs, seed), params)
        reasons: dict[str, int] = {}
        for r in rs:
            for reason in r["reasons"]:
                rule = reason.split(":")[0]
                reasons[rule] = reasons.get(rule, 0) + 1
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
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"n": args.n, "max_tokens": args.max_tokens, "epoch_size": args.epoch_size,
            "epochs": args.epochs, "batch": args.batch, "modes": MODES,
            "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "thresholds": {m: dataclasses.asdict(t) for m, t in params.models.items()},
            "sprt": dataclasses.asdict(params.sprt)}
    operating = operating_characteristic(params, args.epochs)
    columns = ("executor", "failed", "suspicious", *(f"epochs of {n}" for n in OPERATING_EPOCH_SIZES))
    table = Table(title="Epoch test: accused share of epochs, synthetic executors")
    for column in columns:
        table.add_column(column)
    for cells in operating:
        table.add_row(*cells)
    Console(width=None if console.is_terminal else 200).print(table)
    summaries = merged_rows(args.results / "detection_matrix.json", summaries)
    n_per_model = {m: max(r["n"] for r in summaries if r["model"] == m)
                   for m in dict.fromkeys(r["model"] for r in summaries)}
    meta["n"] = n_per_model
    header = (f"n per row and mode (at most; each row's own is its n column): "
              f"{', '.join(f'{m} {n}' for m, n in n_per_model.items())}; "
              f"max_tokens = {args.max_tokens}, epochs of "
              f"{args.epoch_size} validated inferences ({args.epochs} simulated), "
              f"OMP_NUM_THREADS={meta['threads']}, torch {torch.__version__}.\n\n")
    text = header + markdown(_COLUMNS, [table_cells(s) for s in summaries]) + (
        f"\nEpoch test alone ({args.epochs} synthetic epochs per cell):\n\n"
        + markdown(columns, operating))
    (args.results / "detection_matrix.md").write_text(text)
    meta["operating_characteristic"] = [dict(zip(columns, cells)) for cells in operating]
    (args.results / "detection_matrix.json").write_text(
        json.dumps({"meta": meta, "rows": summaries}, indent=1))


def merged_rows(path: Path, summaries: list[dict]) -> list[dict]:
    """``summaries`` after the rows the results file ``path`` already holds for (model, row)
    pairs this run did not measure: a run of some rows of one model (or of one model at
    another --n) updates those rows only; each row states its own n."""
    measured = {(s["model"], s["row"]) for s in summaries}
    try:
        kept = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["row"]) not in measured]
    except (OSError, ValueError, KeyError, TypeError):
        kept = []
    return kept + summaries


def markdown(columns: Iterable[str], rows: list[list[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


# ---------------------------------------------------------------------------
# Calibration


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q, method="higher"))


def calibrate(records: dict[str, list[dict]]) -> tuple[ModelThresholds, dict]:
    """Thresholds from honest measurements: CALIBRATION_MARGIN x p99.9 (largest error,
    mean error) and x p90 (mean error) for "suspicious", the mean limits holding at the
    median output length; plus the record of what was measured."""
    every = [measurements(r) for rs in records.values() for r in rs]
    max_errors = [m.max_error for m in every]
    mean_errors = [m.mean_error for m in every]
    thresholds = ModelThresholds(
        logprob_tolerance=CALIBRATION_MARGIN * quantile(max_errors, 0.999),
        max_mean_distance=CALIBRATION_MARGIN * quantile(mean_errors, 0.999),
        suspicious_mean_distance=CALIBRATION_MARGIN * quantile(mean_errors, 0.9),
        reference_tokens=int(np.median([m.n_tokens for m in every])),
    )
    greedy = [x for m in every if m.temperature == 0.0 for x in m.sampling_margins]
    sampled = [x for m in every if m.temperature > 0.0 for x in m.sampling_margins]
    measured = {
        "inferences": len(every),
        "honest_rows": sorted(records),
        "p999_max_error": quantile(max_errors, 0.999),
        "max_max_error": max(max_errors),
        "p999_mean_error": quantile(mean_errors, 0.999),
        "p90_mean_error": quantile(mean_errors, 0.9),
        "max_top_k_shortfall": max(x for m in every for x in m.top_k_shortfall),
        "greedy_positions_not_exact": sum(x > 0 for x in greedy),
        "max_greedy_margin_nats": max(greedy),
        "sampled_positions_not_exact": sum(x > 0 for x in sampled),
        "max_sampled_margin_cdf": max(sampled),
        "val_over_gen": (sum(r["val_s"] for rs in records.values() for r in rs)
                         / sum(r["gen_s"] for rs in records.values() for r in rs)),
    }
    # Short outputs: the widened mean limits must still hold the honest prefixes' means.
    for n in SHORT_PREFIXES:
        means = [sum(m.position_errors[:n]) / len(m.position_errors[:n]) for m in every]
        measured[f"p999_mean_error_first_{n}"] = quantile(means, 0.999)
        measured[f"mean_limit_first_{n}"] = thresholds.mean_limit(thresholds.max_mean_distance, n)
        measured[f"suspicious_share_first_{n}"] = sum(
            v > thresholds.mean_limit(thresholds.suspicious_mean_distance, n) for v in means) / len(means)
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
    lines += [f"{f.name} = {getattr(params.sprt, f.name)!r}  # {f.metadata['unit']}"
              for f in dataclasses.fields(params.sprt)]
    for model, (thresholds, measured) in sorted(calibrated.items()):
        lines += ["", f'[models."{model}"]']
        lines += [f"{f.name} = {value(getattr(thresholds, f.name))}  # {f.metadata['unit']}"
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
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the tables and the per-inference records go (default: %(default)s)")
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
                name, records = await run_model(model, list(HONEST), "calibration", args, progress)
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
    with Progress(*columns, console=console) as progress:
        runs = [await run_model(model, args.rows, "evaluation", args, progress)
                for model in args.models]
    params = verification.load_verification_params(args.thresholds)  # measurements need none
    summaries = [s for name, results in runs for row in args.rows
                 for s in summarize(name, row, results[row], params, args)]
    write_matrix(summaries, args, params)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
