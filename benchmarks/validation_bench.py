"""Validation through the serving engine, side by side with generation and with the reference.

A participant's validator now scores in the vLLM engine that serves
(``inference/topk_evidence.py``: one prefill, top-K logprobs; an output that
leaves undecidable positions is scored again over the whole vocabulary,
``inference/served_check.py``), with no torch copy of the model in its
process. For each model this prints:

* cost -- vLLM generates ``--n`` honest inferences per mode ``--batch`` at a
  time (per-inference time = batch wall time / batch size, after a discarded
  warm-up batch); the same engine validates them one at a time ("serial") and
  all at once ("batched": the prefills share vLLM's batches); val/gen is the
  ratio of medians, or of totals for batched;
* memory -- the process's RSS after serving alone, after validating too, and
  after loading the torch copy the old path loaded lazily for every check;
* verdicts -- every row (honest vLLM work and the cheats of
  ``adversary/cheats.py``, made with the torch engine) judged from vLLM's
  evidence and from the reference (torch, full logits rows): the two must
  agree (validity and evidence class); rejected counts per row, undecidable
  positions and second passes.

vLLM runs in a child process (it pins process-wide state); the reference and
the cheats run in the parent.

    OMP_NUM_THREADS=1 python benchmarks/validation_bench.py --models tiny-llama smollm2-135m --n 4
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from detection_matrix import markdown, prompts  # sets the thread and log env first

import torch  # noqa: E402

from gonka_p2p.adversary import cheats  # noqa: E402
from gonka_p2p.inference import verification  # noqa: E402
from gonka_p2p.inference import verification_params  # noqa: E402
from gonka_p2p.inference.artifacts import InferenceArtifact  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL, TINY_MODEL  # noqa: E402
from gonka_p2p.inference.sampler import RowRules, SamplingParams, token_weights  # noqa: E402
from gonka_p2p.inference.served_check import check_in_engine  # noqa: E402
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K  # noqa: E402
from gonka_p2p.inference.torch_engine import TorchEngine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = {"greedy": {}, "nucleus": {"temperature": 0.7, "top_p": 0.9}, "plain": {"temperature": 1.0}}
CHEAT_ROWS = ("prefill", "int8", "int4", "small-model", "wrong-temperature", "fabricated", "altered")
Job = tuple[str, int, tuple[int, ...], SamplingParams, bytes]  # mode, index, prompt, params, seed


def rss_mb() -> float:
    """This process's resident set now, MB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def make_jobs(engine: TorchEngine, n: int, max_tokens: int) -> list[Job]:
    texts = prompts("evaluation")
    return [(mode, i, tuple(engine.encode_chat([("user", texts[i % len(texts)])])),
             SamplingParams(max_tokens=max_tokens, **sampling),
             hashlib.blake2b(f"validation/{mode}/{i}".encode(), digest_size=16).digest())
            for mode, sampling in MODES.items() for i in range(n)]


async def served_verdict(engine, artifact: InferenceArtifact, contract, thresholds) -> tuple:
    """What the validator actor does (``served_check``): top-K, then whole-vocabulary rows if anything
    is undecidable. (valid, evidence, undecidable positions, second pass?)."""
    check = await check_in_engine(engine, artifact, contract, thresholds)
    return check.verdict.valid, check.verdict.evidence.value, check.first_undecidable, check.second_pass


def vllm_worker(model: str, jobs: list[Job], batch: int, judged: list[tuple[bytes, Job]]) -> dict:
    """Child process: generate ``jobs`` (timed), validate them serially and batched (timed),
    measure RSS, then judge the ``judged`` artifacts the parent made."""
    from gonka_p2p.inference.vllm_engine import VLLMEngine

    async def run() -> dict:
        engine = VLLMEngine(model, max_num_seqs=max(batch, 8))
        thresholds = verification_params.load_verification_params().for_model(engine.model_name)
        out: dict = {"gen_s": [], "artifacts": []}
        try:
            made: list[InferenceArtifact] = []
            for start in range(-batch, len(jobs), batch):  # the first batch is warm-up, thrown away
                chunk = jobs[max(start, 0):start + batch] if start >= 0 else jobs[:batch]
                began = time.perf_counter()
                done = await asyncio.gather(*[cheats.generate_artifact(engine, list(j[2]), j[3], j[4])
                                              for j in chunk])
                if start >= 0:
                    out["gen_s"] += [(time.perf_counter() - began) / len(chunk)] * len(chunk)
                    made += done
            out["rss_serving"] = rss_mb()
            contracts = [verification.Contract(engine.model_name, j[2], j[3], j[4]) for j in jobs]
            await served_verdict(engine, made[0], contracts[0], thresholds)  # warm the scoring path
            serial, out["honest"] = [], []
            for artifact, contract in zip(made, contracts, strict=True):
                began = time.perf_counter()
                out["honest"].append(await served_verdict(engine, artifact, contract, thresholds))
                serial.append(time.perf_counter() - began)
            began = time.perf_counter()
            await asyncio.gather(*[served_verdict(engine, a, c, thresholds) for a, c in zip(made, contracts)])
            out.update(val_serial_s=serial, val_batched_s=time.perf_counter() - began, rss_validating=rss_mb())
            out["artifacts"] = [a.encode() for a in made]
            out["judged"] = [await served_verdict(engine, InferenceArtifact.decode(data),
                                                  verification.Contract(engine.model_name, j[2], j[3], j[4]),
                                                  thresholds) for data, j in judged]
            copy = TorchEngine(model)  # what the old path loaded beside vLLM for its first check
            out["rss_with_torch_copy"] = rss_mb()
            await copy.close()
        finally:
            await engine.close()
        return out

    return asyncio.run(run())


def reference_verdict(engine: TorchEngine, artifact: InferenceArtifact, job: Job, thresholds) -> tuple:
    """(valid, evidence class, the chance the output would need a second pass heaviest first)."""
    contract = verification.Contract(engine.model_name, job[2], job[3], job[4])
    rows = asyncio.run(engine.score(list(job[2]), artifact.completion_ids, 5, with_logits=True))
    verdict = verification.verify(artifact, rows, thresholds, contract=contract, eos_token_ids=engine.eos_token_ids)
    return verdict.valid, verdict.evidence.value, heaviest_first_second_pass(rows.logits, job[3], job[4])


def heaviest_first_second_pass(logits: torch.Tensor, params: SamplingParams, seed: bytes) -> float:
    """The chance an honest output sampled from ``logits`` would still need the whole-vocabulary
    pass if the sampler's inverse CDF ran over tokens heaviest first instead of in id order
    (a protocol change, not made): a position would then be open only when the noise point
    falls past the top-K's weight, which it does with the processed tail's share (at T = 1;
    away from it the open tail total leaves a few more open)."""
    if params.greedy:
        return 0.0
    rules = RowRules.of([(params, seed)] * len(logits), logits.shape[1])
    weights = token_weights(logits.to(torch.float32), rules).to(torch.float64)
    top = torch.topk(weights, min(EVIDENCE_TOP_K, weights.shape[1]), dim=1).values.sum(dim=1)
    return 1.0 - float(torch.prod(top / weights.sum(dim=1)))


def run_model(model: str, args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]]]:
    reference = TorchEngine(model)
    thresholds = verification_params.load_verification_params().for_model(reference.model_name)
    work = make_jobs(reference, args.n, args.max_tokens)
    judged: list[tuple[str, bytes, Job]] = []
    for row in CHEAT_ROWS:
        strategy = cheats.make_cheater(row, reference)
        judged += [(row, asyncio.run(strategy(list(j[2]), j[3], j[4])).encode(), j) for j in work]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        got = pool.submit(vllm_worker, model, work, args.batch, [(d, j) for _, d, j in judged]).result()
    rows = [("honest-vllm", data, job) for data, job in zip(got["artifacts"], work, strict=True)]
    served = got["honest"] + got["judged"]
    verdict_rows: dict[tuple[str, str], list] = {}
    for (row, data, job), new in zip(rows + judged, served, strict=True):
        artifact = InferenceArtifact.decode(data)
        ref = reference_verdict(reference, artifact, job, thresholds)
        verdict_rows.setdefault((row, job[0]), []).append((ref, new))
    name = reference.model_name
    gen, serial = statistics.median(got["gen_s"]), statistics.median(got["val_serial_s"])
    second = sum(v[3] for v in got["honest"])
    heaviest_first = sum(ref[2] for (row, _), pairs in verdict_rows.items() if row == "honest-vllm" for ref, _ in pairs)
    cost = [[name, str(len(work)), f"{1000 * gen:.0f}", f"{1000 * serial:.0f}", f"{serial / gen:.3f}",
             f"{sum(got['val_serial_s']) / sum(got['gen_s']):.3f}", str(second), f"{heaviest_first:.2f}",
             f"{got['val_batched_s'] / sum(got['gen_s']):.3f}", f"{got['rss_serving']:.0f}",
             f"{got['rss_validating']:.0f}", f"{got['rss_validating'] / got['rss_serving']:.2f}",
             f"{got['rss_with_torch_copy']:.0f}"]]
    table = []
    for (row, mode), pairs in verdict_rows.items():
        table.append([name, row, mode, str(len(pairs)), str(sum(not r[0] for r, _ in pairs)),
                      str(sum(not v[0] for _, v in pairs)), str(sum(r[:2] != tuple(v[:2]) for r, v in pairs)),
                      str(sum(v[2] for _, v in pairs)), str(sum(v[3] for _, v in pairs))])
    return cost, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[TINY_MODEL, DEFAULT_MODEL])
    parser.add_argument("--n", type=int, default=4, help="inferences per mode and row")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for validation_bench.md")
    args = parser.parse_args()
    cost, verdicts = [], []
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    for model in args.models:
        c, v = run_model(model, args)
        cost += c
        verdicts += v
    text = "\n\n".join([
        f"# Validation through the serving engine\n\nn = {args.n} per mode and row, max_tokens = "
        f"{args.max_tokens}, vLLM batch = {args.batch}, K = {EVIDENCE_TOP_K}; modes: {', '.join(MODES)}; "
        f"load average {load}.",
        markdown(("model", "inferences", "gen ms", "val ms serial", "val/gen (medians)", "val/gen (totals)",
                  "second passes", "second passes heaviest first (expected)", "val/gen batched (totals)",
                  "RSS serving MB", "RSS + validating MB", "ratio", "RSS + old torch copy MB"), cost),
        markdown(("model", "row", "mode", "n", "rejected (reference)", "rejected (served)", "disagree",
                  "undecidable positions", "second passes"), verdicts),
    ])
    print(text)
    args.out.mkdir(exist_ok=True)
    (args.out / "validation_bench.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
