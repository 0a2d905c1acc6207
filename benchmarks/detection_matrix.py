"""Detection matrix: how often the verification metric rejects honest and cheating
executors, per inference and per epoch, at a pinned dtype, and what validation costs.

Rows are executors (honest ones in four configurations, and each cheat of
``gonka_p2p.adversary.cheats``); each row runs ``--n`` inferences per sampling
mode (greedy; T=0.7 top-p 0.9; ``--modes`` adds plain T=1) per model on
generated prompts, executors and validator loading the model in ``--dtype``
(the genesis pin: float32 or bfloat16), and every artifact goes through what
a validator does: decode the
artifact bytes, score prompt + completion teacher-forced with the torch engine
(one thread), ``verification.verify`` with the thresholds of that dtype. Columns:

* rejected -- share of inferences whose verdict is invalid, with the upper
  end of its 95% Wilson interval (0 of 200 only shows "<= 1.9%");
* suspicious -- share of valid verdicts above the suspicious line (the epoch test's input);
* mean distance -- mean over comparable inferences of the per-inference mean
  |claimed - recomputed| logprob, nats;
* epoch det. -- share of simulated epochs (``--epoch-size`` validated inferences
  drawn with replacement from the row's verdicts) in which the ledger's epoch test
  (``ledger.epoch_test``) accuses the executor, nothing carried in;
* carried det., caught within -- the same test carried over chains of ``--chain``
  epochs as the ledger runs it: share of epochs accused, and the epochs within which
  99 % of chains are accused;
* val/gen -- validation time (score + verify) over the row executor's
  generation time, summed over the row.

Honest rows: ``honest-torch`` (torch executor and validator, one thread),
``honest-threads`` (executor on two threads), ``honest-vllm`` (vLLM executor,
one request at a time), ``honest-vllm-batch`` (vLLM, ``--batch`` concurrent
requests batched). vLLM runs in a child process: it pins process-wide state
(threads, RNGs) that the torch rows must not inherit. For the subtle cheats the
results also give the checked tokens a threshold on their mean distance needs
(``detection_stats.tokens_to_detect``).

``--calibrate`` runs the honest rows on a disjoint prompt split and derives
the thresholds of ``--dtype`` (``detection_calibration.py``); with ``--write`` it
merges them into ``gonka_p2p/inference/thresholds.toml``, every other model and
dtype kept.

Every validated inference is kept under ``benchmarks/results/rows/`` (one
file per model, dtype, row, split, max_tokens and code version), so an
interrupted run resumes where it stopped and a larger ``--n`` only runs the
inferences the smaller one did not.

    OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --n 200
    OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --calibrate --n 100 --write
    OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --dtype bfloat16 --calibrate --n 100 --write
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
from gonka_p2p.inference import verification_params  # noqa: E402
from gonka_p2p.inference.artifacts import InferenceArtifact  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.models import ModelSpec  # noqa: E402
from gonka_p2p.inference.sampler import SamplingParams  # noqa: E402
from gonka_p2p.inference.torch_engine import TorchEngine  # noqa: E402
from gonka_p2p.inference.verification import Contract, Evidence, Measurements  # noqa: E402
from gonka_p2p.inference.verification_params import VerificationParams  # noqa: E402
from gonka_p2p.ledger.devnet import distance_test_of  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from detection_calibration import calibrate, merged_table, thresholds_toml  # noqa: E402
from detection_stats import (  # noqa: E402
    CATCH_TARGET,
    HONEST_TARGET,
    OPERATING_EPOCH_SIZES,
    TOKEN_GRID,
    accusation_rate,
    carried_accusations,
    checked,
    distance_quantiles,
    epochs_to_catch,
    operating_characteristic,
    resampled_epochs,
    tokens_to_detect,
    wilson_upper,
)

RESULTS = Path(__file__).parent / "results"
THRESHOLDS_FILE = Path(verification.__file__).with_name("thresholds.toml")
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9},
         "plain": {"temperature": 1.0}}  # T = 1, no cut: only the CDF near-tie width judges its tokens
DEFAULT_MODES = ("greedy", "sampled")
HONEST = ("honest-torch", "honest-threads", "honest-vllm", "honest-vllm-batch")
CASTS = ("fp16", "bf16")  # cheats only against a pinned float32
SUBTLE = (*CASTS, "int8", "fp8")
SUBTLE_QUANTIZED = ("int8", "fp8")  # subtle at a pinned bfloat16 too
GROSS = ("int4", "small-model", "prefill", "fabricated", "truncated", "altered",
         "wrong-temperature", *cheats.STATING)
ROWS = HONEST + SUBTLE + GROSS

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


def jobs(engine: TorchEngine, split: str, n: int, max_tokens: int,
         modes: Iterable[str] = DEFAULT_MODES) -> list[Job]:
    """``n`` inferences per mode of ``modes``; prompts cycle past the split's size, seeds never repeat."""
    texts = prompts(split)
    out = []
    for mode in modes:
        params = SamplingParams(max_tokens=max_tokens, **MODES[mode])
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


def vllm_worker(model: ModelSpec, work: list[Job], concurrency: int) -> list[tuple[bytes, float]]:
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


async def vllm_artifacts(model: ModelSpec, work: list[Job], concurrency: int) -> Made:
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


def cache_path(results: Path, model: ModelSpec, row: str, split: str, max_tokens: int) -> Path:
    """Where a row's records are kept; the name changes with anything that changes them:
    the model's dtype, the sampling modes, the length, this file's record shape, and the versions of the
    metric's measurements and of the cheats (not their source text: an equivalent rewrite
    must not throw away hours of measurements). Records are per inference (mode, index),
    so a larger --n reuses the smaller run's; they are threshold-free measurements, so new
    thresholds reuse them too."""
    versions = (MODES, max_tokens, RECORD_VERSION, verification.MEASURE_VERSION, cheats.CHEATS_VERSION)
    tag = hashlib.blake2b(repr(versions).encode(), digest_size=6).hexdigest()
    return results / "rows" / f"{model.served_as}-{model.dtype}-{split}-{row}-t{max_tokens}-{tag}.json"


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
    spec = ModelSpec(model, dtype=args.dtype)
    validator = TorchEngine(spec)
    work = jobs(validator, split, args.n, args.max_tokens, args.modes)
    needed = set(rows) | ({"honest-torch"} if set(rows) & set(cheats.TAMPERS) else set())
    results: dict[str, dict[tuple[str, int], dict]] = {}
    for row in [r for r in ROWS if r in needed]:
        path = cache_path(args.results, spec, row, split, args.max_tokens)
        done = load_records(path)
        todo = [j for j in work if (j.mode, j.index) not in done]
        task = progress.add_task(f"{model} {row}", total=len(work), completed=len(work) - len(todo))
        if row in cheats.TAMPERS:
            made = tampered_artifacts(row, validator, todo, results["honest-torch"])
        elif row.startswith("honest-vllm"):
            made = vllm_artifacts(spec, todo, args.batch if row.endswith("batch") else 1)
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


def row_class(row: str, dtype: str) -> str:
    """honest, subtle (caught by the epoch test: close to honest noise at ``dtype``) or gross
    (caught per inference). Casting to bf16 or fp16 is subtle only against a pinned fp32."""
    subtle = SUBTLE if dtype == DEFAULT_DTYPE else SUBTLE_QUANTIZED
    return "honest" if row.startswith("honest") else "subtle" if row in subtle else "gross"


def seed_of(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(parts).encode(), digest_size=4).digest())


def summarize(model: str, row: str, records: list[dict], params: VerificationParams, args) -> list[dict]:
    """Per sampling mode: rejections, distances, the epoch test on one epoch (nothing carried)
    and carried over chains of ``--chain`` epochs (the ledger's rule), and costs."""
    out = []
    thresholds = params.for_model(model)
    for mode in dict.fromkeys(r["mode"] for r in records):
        rs = [r | dataclasses.asdict(verification.judge(measurements(r), thresholds))
              for r in records if r["mode"] == mode]
        rejected = sum(not r["valid"] for r in rs)
        comparable = [r["mean_distance"] for r in rs if math.isfinite(r["mean_distance"])]
        test = distance_test_of(thresholds)
        outcomes = [checked(r, test) for r in rs]
        seed = seed_of(model, args.dtype, row, mode)
        detection = accusation_rate(resampled_epochs(outcomes, args.epoch_size, args.epochs, seed), params)
        chains = args.epochs // args.chain
        carried, first = carried_accusations(
            [resampled_epochs(outcomes, args.epoch_size, args.chain, seed + c) for c in range(chains)], params)
        reasons: dict[str, int] = {}
        for r in rs:
            for reason in r["reasons"]:
                rule = reason.split(":")[0]
                reasons[rule] = reasons.get(rule, 0) + 1
        cls = row_class(row, args.dtype)
        rate = rejected / len(rs)
        within = epochs_to_catch(first)
        met = {"honest": rate <= 0.005 and detection <= HONEST_TARGET and carried <= HONEST_TARGET,
               "gross": rate >= CATCH_TARGET,
               "subtle": within is not None}[cls]
        out.append({
            "model": model, "dtype": args.dtype, "mode": mode, "row": row, "class": cls, "n": len(rs),
            "mean_tokens": sum(r["n_tokens"] for r in rs) / len(rs),
            "short_outputs": sum(r["n_tokens"] < 16 for r in rs),
            "rejected": rate, "rejected_upper95": wilson_upper(rejected, len(rs)),
            "suspicious": sum(r["evidence"] == Evidence.SUSPICIOUS for r in rs) / len(rs),
            "mean_distance": sum(comparable) / len(comparable) if comparable else math.inf,
            "epoch_detection": detection, "carried_detection": carried, "epochs_to_catch": within,
            "val_s": sum(r["val_s"] for r in rs) / len(rs),
            "gen_s": sum(r["gen_s"] for r in rs) / len(rs),
            "val_over_gen": sum(r["val_s"] for r in rs) / sum(r["gen_s"] for r in rs),
            "reasons": reasons, "target_met": met,
            **({} if test is None else {"distance_quantiles_nano": distance_quantiles(rs)}),
        })
    return out


_COLUMNS = ("model", "mode", "row", "class", "n", "tokens", "rejected", "(95% up)", "suspicious",
            "mean distance", "epoch det.", "carried det.", "caught within", "val ms", "gen ms", "val/gen",
            "target", "reasons")


def table_cells(s: dict) -> list[str]:
    target = {"honest": "rej<=0.5%, epochs<=0.1%", "gross": "rej>=99%", "subtle": "99% caught"}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1]))
    def share(key: str) -> str:  # "-": a row measured before this column existed
        return f"{100 * s[key]:.1f}%" if key in s else "-"

    within = s.get("epochs_to_catch")
    return [s["model"], s["mode"], s["row"], s["class"], str(s["n"]), f"{s['mean_tokens']:.1f}",
            share("rejected"), share("rejected_upper95"), share("suspicious"), f"{s['mean_distance']:.2e}",
            share("epoch_detection"), share("carried_detection"),
            "-" if s["class"] == "honest" or "carried_detection" not in s
            else f"{within} epochs" if within else "not within the chain",
            f"{1000 * s['val_s']:.0f}", f"{1000 * s['gen_s']:.0f}", f"{s['val_over_gen']:.2f}",
            ("met " if s["target_met"] else "MISSED ") + target[s["class"]], reasons]


def detect_tokens(model: str, records: dict[str, list[dict]], args) -> list[list[str]]:
    """The tokens-to-detect table for the subtle cheats measured: per cheat and mode, the checked
    tokens the best aggregate (mean distance) needs, and what the ledger's test needs."""
    out = []
    subtle = [r for r in records if row_class(r, args.dtype) == "subtle"]
    for row in subtle if any(h in records for h in HONEST) else []:  # no honest rows: no line
        for mode in dict.fromkeys(r["mode"] for r in records[row]):
            honest = {h: [r for r in records[h] if r["mode"] == mode] for h in HONEST if h in records}
            cheat = [r for r in records[row] if r["mode"] == mode]
            tokens, line = tokens_to_detect(cheat, honest, args.bootstrap, seed_of(model, row, mode))
            per_epoch = args.epoch_size * sum(r["n_tokens"] for r in cheat) / len(cheat)
            out.append([model, args.dtype, mode, row, str(len(cheat)), f"{per_epoch:.0f}",
                        f"{tokens}" if tokens else f"> {TOKEN_GRID[-1]}", f"{line:.3e}"])
    return out


_TOKEN_COLUMNS = ("model", "dtype", "mode", "cheat", "n", "checked tokens per epoch",
                  "tokens to detect (mean distance)", "its line (nats)")


def section(dtype: str, summaries: list[dict], tokens: list[list[str]], args) -> str:
    """One dtype's part of the results file: its matrix and, where measured, tokens to detect."""
    rows = [s for s in summaries if s.get("dtype", DEFAULT_DTYPE) == dtype]
    n_per_model = {m: max(r["n"] for r in rows if r["model"] == m) for m in dict.fromkeys(r["model"] for r in rows)}
    text = (f"## {dtype}\n\nn per row and mode (at most; each row's own is its n column): "
            f"{', '.join(f'{m} {n}' for m, n in n_per_model.items())}.\n\n"
            + markdown(_COLUMNS, [table_cells(s) for s in rows]))
    mine = [t for t in tokens if t[1] == dtype]
    if mine:
        text += ("\nTokens to detect: checked tokens a threshold on their mean distance needs to accuse "
                 f"the cheat in >= {100 * CATCH_TARGET:g}% and every honest row in <= {100 * HONEST_TARGET:g}% "
                 f"({args.bootstrap} resampled sets of whole inferences each); the ledger's test is the "
                 "carried epoch test above (caught within).\n\n" + markdown(_TOKEN_COLUMNS, mine))
    return text


def write_matrix(summaries: list[dict], tokens: list[list[str]], args, params: VerificationParams) -> None:
    table = Table(title=f"Detection matrix, {args.dtype}")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")
    for s in summaries:
        table.add_row(*table_cells(s))
    Console(width=None if console.is_terminal else 200).print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "detection_matrix.json"
    old = previous(path)
    operating = operating_characteristic(params, args.epochs)
    columns = ("executor", "failed", "suspicious", *(f"epochs of {n}" for n in OPERATING_EPOCH_SIZES))
    summaries = merged_rows(old.get("rows", []), summaries)
    tokens = [t for t in old.get("meta", {}).get("tokens_to_detect", [])
              if (t[0], t[1]) not in {(u[0], u[1]) for u in tokens}] + tokens
    thresholds = {m: dataclasses.asdict(t) for m, t in params.models.items()}
    meta = {"max_tokens": args.max_tokens, "epoch_size": args.epoch_size, "epochs": args.epochs,
            "chain": args.chain, "batch": args.batch, "modes": {m: MODES[m] for m in args.modes},
            "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "thresholds": {**old.get("meta", {}).get("thresholds", {}), args.dtype: thresholds},
            "sprt": dataclasses.asdict(params.sprt), "tokens_to_detect": tokens,
            "operating_characteristic": [dict(zip(columns, cells)) for cells in operating]}
    dtypes = [d for d in DTYPES if any(s.get("dtype", DEFAULT_DTYPE) == d for s in summaries)]
    header = (f"max_tokens = {args.max_tokens}; epochs of {args.epoch_size} validated inferences "
              f"({args.epochs} simulated; carried: chains of {args.chain} epochs, the ledger's rule, "
              f"caught within = epochs until {100 * CATCH_TARGET:g}% of chains are accused); "
              f"OMP_NUM_THREADS={meta['threads']}, torch {torch.__version__}.\n\n")
    text = header + "\n".join(section(d, summaries, tokens, args) for d in dtypes) + (
        f"\nEpoch test alone, one epoch ({args.epochs} synthetic epochs per cell):\n\n"
        + markdown(columns, operating))
    (args.results / "detection_matrix.md").write_text(text)
    path.write_text(json.dumps({"meta": meta, "rows": summaries}, indent=1))


def previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def merged_rows(kept: list[dict], summaries: list[dict]) -> list[dict]:
    """``summaries`` after the rows a results file already holds for (model, dtype, row) this
    run did not measure: a run of some rows of one model and dtype (or at another --n)
    updates those rows only; each row states its own n."""
    def key(r: dict) -> tuple[str, str, str]:
        return r["model"], r.get("dtype", DEFAULT_DTYPE), r["row"]

    measured = {key(s) for s in summaries}
    try:
        return [r for r in kept if key(r) not in measured] + summaries
    except (KeyError, TypeError):
        return summaries


def markdown(columns: Iterable[str], rows: list[list[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


# ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="inferences per row and sampling mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                        help="sampling modes (default: %(default)s)")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES,
                        help="the pinned dtype executors and the validator load (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=[TINY_MODEL, DEFAULT_MODEL])
    parser.add_argument("--rows", nargs="+", choices=ROWS,
                        help="default: every row that means something at --dtype (casts: at float32 only)")
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests of honest-vllm-batch")
    parser.add_argument("--epoch-size", type=int, default=30, help="validated inferences per epoch")
    parser.add_argument("--epochs", type=int, default=2000, help="simulated epochs per row")
    parser.add_argument("--chain", type=int, default=20, help="epochs per chain of the carried epoch test")
    parser.add_argument("--bootstrap", type=int, default=4000, help="resampled sets per tokens-to-detect cell")
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
    thresholds_file = args.thresholds or THRESHOLDS_FILE
    if args.calibrate:
        honest_rows = args.rows or list(HONEST)  # a subset: to look at its noise (not to --write)
        if set(honest_rows) - set(HONEST) or (args.write and set(honest_rows) != set(HONEST)):
            raise SystemExit(f"--calibrate measures the honest rows ({', '.join(HONEST)}); --write needs all")
        table = verification_params.thresholds_table(thresholds_file) if thresholds_file.exists() else {}
        sprt = verification_params.verification_params_from_obj(table).sprt
        with Progress(*columns, console=console) as progress:
            for model in args.models:
                name, records = await run_model(model, honest_rows, "calibration", args, progress)
                val_over_gen = (sum(r["val_s"] for rs in records.values() for r in rs)
                                / sum(r["gen_s"] for rs in records.values() for r in rs))
                thresholds, measured = calibrate(
                    {row: [measurements(r) for r in rs] for row, rs in records.items()}, args.dtype, sprt,
                    val_over_gen)
                console.print(name, args.dtype, thresholds, measured)
                merged_table(table, name, args.dtype, thresholds, measured)
        text = thresholds_toml(table, sprt)
        if args.write:
            thresholds_file.write_text(text)
            console.print(f"wrote {thresholds_file}")
        else:
            print(text)
        return
    rows = args.rows or [r for r in ROWS if args.dtype == DEFAULT_DTYPE or r not in CASTS]
    with Progress(*columns, console=console) as progress:
        runs = [await run_model(model, rows, "evaluation", args, progress) for model in args.models]
    params = verification_params.load_verification_params(  # measurements need none
        args.thresholds, {name: args.dtype for name, _ in runs})
    summaries = [s for name, results in runs for row in rows
                 for s in summarize(name, row, results[row], params, args)]
    tokens = [t for name, results in runs for t in detect_tokens(name, results, args)]
    write_matrix(summaries, tokens, args, params)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
