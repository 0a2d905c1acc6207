"""Proof of compute (issue 12): what it costs, whether weight follows compute, how cheats fare.

Three measurements, each a table (the load average is printed beside them:
the machine is shared, and every figure here is a rate of CPU time):

* **cost** -- nonces/s of one engine with ``inference.poc.DEFAULT_CONCURRENCY``
  nonces in flight, and the seconds to check one opened sample of
  ``SAMPLE_SIZE`` leaves; from them the share of an epoch's compute spent
  computing PoC (its compute windows, regular and confirmation, run the
  engine flat out) and validating PoC, at devnet parameters (the genesis
  defaults of ``ledger.genesis.Params``: epoch, windows, sample size; every
  participant checks every other's sample) and at production ones
  (``PRODUCTION`` below: an epoch of about a day, each sample checked by 3
  validators), at the block times in ``BLOCK_SECONDS``.
* **fairness** -- three child processes with CPU quotas 1 : 2 : 4 (cgroup v2
  ``cpu.max``, else v1 ``cpu.cfs_quota_us``, else ``taskset`` to 1, 2, 4 cores:
  the table says which) compute over the same wall-clock window; nonces each
  against 1 : 2 : 4.
* **cheats** -- a participant claiming k x the nonces it computed: its extra
  leaves are fabricated (random ids and logprobs, or an honest leaf relabelled
  with another nonce), every one is run through ``check_leaves``, and rounds
  are simulated with the ledger's own sample draw (``ledger.poc.sample_indices``):
  caught when the sample opens a fabricated leaf that fails. Beside it the
  analytic ``1 - (1/k)^s`` and the sample size that reaches 99 %. And a
  participant computing on a smaller model (``adversary.cheats`` small-model:
  a quarter of the layers dropped): the share of its leaves that fail, and of
  its rounds (samples of ``SAMPLE_SIZE``).

``--calibrate`` measures instead the honest noise that ``poc.LOGPROB_TOLERANCE``
is set from: torch (one nonce at a time, 1 and 2 threads) against vLLM at 1 and at
16 nonces in flight, every pair.

    OMP_NUM_THREADS=1 python benchmarks/poc_bench.py               # SmolLM2 on vLLM
    OMP_NUM_THREADS=1 python benchmarks/poc_bench.py --quick       # short windows, few rounds
    OMP_NUM_THREADS=1 python benchmarks/poc_bench.py --quick --model tiny-llama --engine torch  # smoke
    OMP_NUM_THREADS=1 python benchmarks/poc_bench.py --calibrate --n 600
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from gonka_p2p.inference import poc  # noqa: E402
from gonka_p2p.inference.engine import Engine  # noqa: E402
from gonka_p2p.inference.factory import load_engine  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL  # noqa: E402
from gonka_p2p.ledger import poc as poc_rules  # noqa: E402
from gonka_p2p.ledger.genesis import Params  # noqa: E402

_GENESIS = Params()
# Devnet: the genesis defaults the lead chose (ledger/genesis.py), read at run time; 4
# participants, each checking every other's sample.
DEVNET = {"name": "devnet", "epoch_blocks": _GENESIS.epoch_length_blocks,
          "compute_blocks": _GENESIS.poc_compute_blocks, "checks_per_participant": 4 - 1}
# Production: an epoch of about a day at 5 s blocks, a 180-block window, 100 participants, each
# sample checked by 3 validators (so each participant checks 3 samples per round on average).
PRODUCTION = {"name": "production", "epoch_blocks": 17_280, "compute_blocks": 180,
              "checks_per_participant": 3}
SAMPLE_SIZE = _GENESIS.poc_sample_size
BLOCK_SECONDS = (1.0, 5.0)
OVERCLAIMS = (1.1, 2.0, 10.0)
SHARES = (1, 2, 4)  # relative compute of the fairness run's three participants
# Their CPU quotas: together well under this 2-core machine, so that the others sharing it
# (0.25 : 0.5 : 1.0 measured 74 % off with ~1.5 cores busy elsewhere) do not starve the largest.
QUOTAS = tuple(0.1 * share for share in SHARES)
# Nonces in flight per fairness participant: a stop drops those in flight and vLLM finishes a
# batch at once, so fewer than the default keeps a 0.1-CPU participant's count from moving in
# steps of 16 (a third of what it computes in 20 s on SmolLM2).
FAIRNESS_CONCURRENCY = 4
CATCH_TARGET = 0.99
SEED = bytes(range(32))
PUBKEY = b"\x02" + hashlib.sha256(b"poc-bench").digest()

console = Console()


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# ---------------------------------------------------------------------------
# cost


async def nonce_rate(engine: Engine, seconds: float) -> tuple[list[bytes], float]:
    """Leaves computed in ``seconds`` of wall time (after a warm-up) and nonces/s."""
    await poc.compute_leaves(engine, SEED, PUBKEY, 10**9, 4)  # warm-up, nonces never used again
    run = poc.PocCompute(engine, SEED, PUBKEY)
    started = time.perf_counter()
    asyncio.get_running_loop().call_later(seconds, run.stop)
    leaves = await run.run()
    return leaves, len(leaves) / (time.perf_counter() - started)


async def cost(engine: Engine, seconds: float) -> dict:
    leaves, rate = await nonce_rate(engine, seconds)
    opened = {n: leaves[n] for n in random.Random(0).sample(range(len(leaves)),
                                                            min(SAMPLE_SIZE, len(leaves)))}
    started = time.perf_counter()
    verdict = await poc.check_leaves(engine, SEED, PUBKEY, engine.model_name, opened)
    check_s = (time.perf_counter() - started) * SAMPLE_SIZE / len(opened)
    assert verdict.ok, verdict.reason
    table = Table(title=f"PoC cost: {engine.model_name}, {type(engine).__name__}, "
                        f"{poc.DEFAULT_CONCURRENCY} in flight ({load()})")
    for column in ("network", "block s", "epoch s", "PoC window s", "PoC share",
                   "samples checked", "validation s", "validation share"):
        table.add_column(column, justify="right")
    for net in (DEVNET, PRODUCTION):
        checked = net["checks_per_participant"]
        for block_s in BLOCK_SECONDS:
            epoch_s = net["epoch_blocks"] * block_s
            window_s = net["compute_blocks"] * block_s
            table.add_row(net["name"], f"{block_s:g}", f"{epoch_s:,.0f}", f"{window_s:,.0f}",
                          f"{window_s / epoch_s:.2%}", str(checked), f"{checked * check_s:.2f}",
                          f"{checked * check_s / epoch_s:.3%}")
    console.print(f"nonces/s: {rate:.1f} ({len(leaves)} in {seconds:g} s); one sample of "
                  f"{SAMPLE_SIZE} checked in {check_s:.2f} s ({load()})")
    console.print(table)
    console.print(f"(regular rounds only; the confirmation round adds {_GENESIS.poc_confirm_compute_blocks} "
                  f"compute blocks per epoch at devnet parameters, "
                  f"{_GENESIS.poc_confirm_compute_blocks / _GENESIS.epoch_length_blocks:.0%} of it, and a "
                  f"second sample check)")
    return {"nonces_per_s": rate, "check_s": check_s, "leaves": leaves}


# ---------------------------------------------------------------------------
# fairness


@contextmanager
def cpu_quotas(cpus: tuple[float, ...]) -> Iterator[tuple[str, list[Path] | None]]:
    """One cgroup per entry of ``cpus`` under a common parent: each capped at its CPUs and
    weighted in proportion to them, so the split holds both on an idle machine (the caps bind)
    and on a busy one (the parent gets what three ordinary processes would, and the weights
    split it). Yields (how, each group's ``cgroup.procs``), or (why not, None)."""
    period = 100_000
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/cpu")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        root, how = v2, "cgroup v2 cpu.max + cpu.weight"
        parent_limits = {"cpu.weight": str(3 * 100), "cgroup.subtree_control": "+cpu"}

        def limits(c: float) -> dict[str, str]:
            return {"cpu.max": f"{int(c * period)} {period}",
                    "cpu.weight": str(round(c / cpus[0] * 100))}
    elif (v1 / "cpu.cfs_quota_us").exists():
        root, how = v1, "cgroup v1 cpu.cfs_quota_us + cpu.shares"
        parent_limits = {"cpu.shares": str(3 * 1024)}

        def limits(c: float) -> dict[str, str]:
            return {"cpu.cfs_period_us": str(period), "cpu.cfs_quota_us": str(int(c * period)),
                    "cpu.shares": str(round(c / cpus[0] * 1024))}
    else:
        yield "no cgroup cpu controller", None
        return
    parent = root / f"poc_bench_{os.getpid()}"
    groups = [parent / f"share{i}" for i in range(len(cpus))]
    try:
        try:
            parent.mkdir()
            for file, value in parent_limits.items():
                (parent / file).write_text(value)
            for group, c in zip(groups, cpus, strict=True):
                group.mkdir()
                for file, value in limits(c).items():
                    (group / file).write_text(value)
        except OSError as e:
            yield f"cgroups not writable ({e.strerror})", None
            return
        yield f"{how}, {' : '.join(f'{c:g}' for c in cpus)} CPU", [g / "cgroup.procs" for g in groups]
    finally:
        for group in [*groups, parent]:
            if group.exists():
                group.rmdir()


def _line_from(child: subprocess.Popen[str], wanted: Callable[[str], bool]) -> str:
    """The child's next stdout line that is ``wanted`` (engines log to stdout too)."""
    for line in child.stdout:
        if wanted(line.strip()):
            return line.strip()
    raise RuntimeError(f"worker {child.pid} exited with {child.wait()}")


def fairness(model: str, engine_kind: str, window_s: float) -> dict:
    """Three children load the engine, are then held to their share of compute -- a CPU quota
    each (``QUOTAS``), else ``taskset`` to 1, 2 and 4 cores with as many threads where the
    machine has 7 -- and compute for ``window_s`` after the same 'go'."""
    with ExitStack() as stack:
        how, procs_files = stack.enter_context(cpu_quotas(QUOTAS))
        pinned = procs_files is None and (os.cpu_count() or 1) >= sum(SHARES)
        if procs_files is None:
            how = (f"taskset to 1, 2, 4 cores and threads ({how})" if pinned
                   else f"NOT ENFORCED: {how}, and under {sum(SHARES)} cores for taskset")
        children = []
        for i, share in enumerate(SHARES):
            cores = set(range(sum(SHARES[:i]), sum(SHARES[:i + 1])))
            children.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--model", model, "--engine", engine_kind,
                 "--seconds", str(window_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, **({"OMP_NUM_THREADS": str(share)} if pinned else {})},
                preexec_fn=(lambda cores=cores: os.sched_setaffinity(0, cores)) if pinned else None))
        try:
            for i, child in enumerate(children):
                _line_from(child, lambda line: line == "ready")  # loaded at full speed
                if procs_files is not None:
                    procs_files[i].write_text(str(child.pid))  # moves every thread of the process
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            counts = [json.loads(_line_from(child, lambda line: line.startswith("{")))["nonces"]
                      for child in children]
        finally:  # on a failure the others read EOF instead of 'go', compute and exit
            for child in children:
                child.stdin.close()
                child.wait(timeout=300)
    expected = [share / sum(SHARES) for share in SHARES]
    shares = [c / sum(counts) for c in counts]
    error = max(abs(s / e - 1) for s, e in zip(shares, expected, strict=True))
    table = Table(title=f"Fairness: {model} on {engine_kind}, {window_s:g} s window, compute held by "
                        f"{how} ({load()})")
    for column in ("relative compute", "nonces", "share", "expected share", "ratio to the first"):
        table.add_column(column, justify="right")
    for share, c, s, e in zip(SHARES, counts, shares, expected, strict=True):
        table.add_row(str(share), str(c), f"{s:.3f}", f"{e:.3f}", f"{c / counts[0]:.2f}")
    console.print(table)
    console.print(f"largest share error vs 1:2:4: {error:.1%} (target <= 15 %)")
    return {"how": how, "counts": counts, "error": error}


async def worker(model: str, engine_kind: str, seconds: float) -> None:
    """The child of :func:`fairness`: compute for ``seconds`` after 'go', print the count."""
    engine = load_engine(engine_kind, model)
    await poc.compute_leaves(engine, SEED, PUBKEY, 10**9, 4)  # warm-up
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    run = poc.PocCompute(engine, SEED, b"\x03" + PUBKEY[1:], concurrency=FAIRNESS_CONCURRENCY)
    asyncio.get_running_loop().call_later(seconds, run.stop)
    print(json.dumps({"nonces": len(await run.run())}), flush=True)
    await engine.close()


# ---------------------------------------------------------------------------
# cheats


def fabricated(leaves: list[bytes], claimed: int, vocab: int, rng: random.Random) -> dict[int, bytes]:
    """The leaves a cheater makes up for nonces ``len(leaves) .. claimed - 1``: every other one
    random ids under sorted plausible logprobs, the rest an honest leaf relabelled."""
    made = {}
    for nonce in range(len(leaves), claimed):
        if nonce % 2:
            ids = tuple(rng.sample(range(vocab), poc.TOP_K))
            values = tuple(sorted((-rng.expovariate(0.5) for _ in ids), reverse=True))
            made[nonce] = poc.encode_poc_leaf(poc.PocLeaf(nonce, ids, poc.float32_values(values)))
        else:
            honest = poc.decode_poc_leaf(rng.choice(leaves))
            made[nonce] = poc.encode_poc_leaf(poc.PocLeaf(nonce, honest.top_ids, honest.top_logprobs))
    return made


async def cheats(engine: Engine, leaves: list[bytes], rounds: int, small_rounds: int) -> dict:
    rng = random.Random(1)
    pool = fabricated(leaves, len(leaves) + 2 * SAMPLE_SIZE, engine.local_model.vocab_size, rng)
    verdict = await poc.check_leaves(engine, SEED, PUBKEY, engine.model_name, pool)
    fails = set(verdict.failed)
    fail_rate = len(fails) / len(pool)
    table = Table(title=f"Overclaiming: sample s = {SAMPLE_SIZE}, {rounds} rounds each; "
                        f"{len(fails)}/{len(pool)} fabricated leaves failed check_leaves ({load()})")
    for column in ("k", "caught (measured)", "1-(1/k)^s", f"s for {CATCH_TARGET:.0%}"):
        table.add_column(column, justify="right")
    honest_n = 1000
    pool_nonces = sorted(pool)
    rows = []
    for k in OVERCLAIMS:
        claimed = round(k * honest_n)
        caught = 0
        for r in range(rounds):
            seed = hashlib.sha256(f"round {r} k {k}".encode()).digest()
            sample = poc_rules.sample_indices(seed, "cheater", engine.model_name, claimed, SAMPLE_SIZE)
            caught += any(i >= honest_n and pool_nonces[i % len(pool_nonces)] in fails for i in sample)
        analytic = 1 - (1 / k) ** SAMPLE_SIZE
        needed = math.ceil(math.log(1 - CATCH_TARGET) / math.log(1 / k))
        rows.append({"k": k, "caught": caught / rounds, "analytic": analytic, "needed": needed})
        table.add_row(f"{k:g}", f"{caught / rounds:.4f}", f"{analytic:.4f}", str(needed))
    console.print(table)
    console.print("sample size for 99 %: s >= ln(100) / ln(k): "
                  + ", ".join(f"k={k:g}: {math.ceil(math.log(100) / math.log(k))}"
                              for k in (1.01, 1.05, 1.1, 1.2, 1.5, 2, 10)))
    small = await small_model(engine, small_rounds)
    return {"fabricated_fail_rate": fail_rate, "overclaim": rows, "small_model": small}


async def small_model(validator: Engine, rounds: int) -> dict:
    """A cheater computing its nonces on the small-model cheat, checked by ``validator``."""
    from gonka_p2p.adversary.cheats import decoder_layers, drop_layers, variant_engine
    from gonka_p2p.inference.torch_engine import TorchEngine

    base = TorchEngine(validator.model_name)
    cheap = variant_engine(base, lambda m: drop_layers(m, max(1, len(decoder_layers(m)) // 4)))
    caught, failed, opened = 0, 0, 0
    for r in range(rounds):
        nonces = random.Random(r).sample(range(100_000), SAMPLE_SIZE)
        leaves = [poc.encode_poc_leaf(await poc.compute_leaf(cheap, SEED, PUBKEY, n)) for n in nonces]
        verdict = await poc.check_leaves(validator, SEED, PUBKEY, validator.model_name,
                                         dict(zip(nonces, leaves, strict=True)))
        caught += not verdict.ok
        failed += len(verdict.failed)
        opened += len(nonces)
    await base.close()
    console.print(f"small model ({validator.model_name}, a quarter of the layers dropped): "
                  f"{failed}/{opened} leaves failed, {caught}/{rounds} rounds caught ({load()})")
    return {"leaves_failed": failed / opened, "rounds_caught": caught / rounds}


# ---------------------------------------------------------------------------
# calibration


async def calibrate(model: str, n: int) -> None:
    """Per-leaf honest error (largest rank-wise |logprob difference|) between configurations."""
    from gonka_p2p.inference.torch_engine import TorchEngine
    from gonka_p2p.inference.vllm_engine import VLLMEngine

    import torch

    runs: dict[str, list[poc.PocLeaf]] = {}
    torch_engine = TorchEngine(model)
    for threads in (1, 2):  # before vLLM starts: it makes torch.set_num_threads a no-op
        torch.set_num_threads(threads)
        leaves = await poc.compute_leaves(torch_engine, SEED, PUBKEY, 0, n, 1)
        runs[f"torch {threads}t"] = [poc.decode_poc_leaf(x) for x in leaves]
    await torch_engine.close()
    vllm = VLLMEngine(model, kv_cache_gib=0.5)
    try:
        for flight in (1, 16):
            leaves = await poc.compute_leaves(vllm, SEED, PUBKEY, 0, n, flight)
            runs[f"vllm x{flight}"] = [poc.decode_poc_leaf(x) for x in leaves]
    finally:
        await vllm.close()
    table = Table(title=f"Honest PoC noise: {model}, {n} nonces of {poc.PROMPT_TOKENS} random tokens ({load()})")
    for column in ("pair", "p50", "p99.9", "max", "top-1 differs", "top-k set differs"):
        table.add_column(column, justify="right")
    worst = []
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            errors = sorted(max(abs(x - y) for x, y in zip(p.top_logprobs, q.top_logprobs, strict=True))
                            for p, q in zip(runs[a], runs[b], strict=True))
            worst += errors
            table.add_row(f"{a} / {b}", f"{statistics.median(errors):.2e}",
                          f"{errors[min(len(errors) - 1, int(0.999 * len(errors)))]:.2e}", f"{errors[-1]:.2e}",
                          str(sum(p.top_ids[0] != q.top_ids[0] for p, q in zip(runs[a], runs[b]))),
                          str(sum(set(p.top_ids) != set(q.top_ids) for p, q in zip(runs[a], runs[b]))))
    console.print(table)
    worst.sort()
    p999 = worst[min(len(worst) - 1, int(0.999 * len(worst)))]
    console.print(f"all pairs: p99.9 {p999:.3e}, max {worst[-1]:.3e} -> tolerance 3 x p99.9 = {3 * p999:.3e} "
                  f"(in use: {poc.LOGPROB_TOLERANCE.get(model)})")


# ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    if args.worker:
        await worker(args.model, args.engine, args.seconds)
        return
    if args.calibrate:
        await calibrate(args.model, args.n)
        return
    console.print(f"[bold]gonka-p2p PoC benchmark[/bold]: {args.model} on {args.engine}"
                  f"{' (quick)' if args.quick else ''}, {os.cpu_count()} CPUs, {load()}")
    window = 5.0 if args.quick else 30.0
    engine = load_engine(args.engine, args.model)
    try:
        measured = await cost(engine, window)
        cheated = await cheats(engine, measured["leaves"], 2000 if args.quick else 20_000,
                               1 if args.quick else 4)
    finally:
        await engine.close()
    fair = fairness(args.model, args.engine, 20.0 if args.quick else 60.0)
    console.print(f"[bold]summary[/bold]: {measured['nonces_per_s']:.1f} nonces/s, sample check "
                  f"{measured['check_s']:.2f} s, fairness error {fair['error']:.1%}, fabricated leaves "
                  f"failing {cheated['fabricated_fail_rate']:.0%}, small-model rounds caught "
                  f"{cheated['small_model']['rounds_caught']:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "torch"))
    parser.add_argument("--quick", action="store_true", help="5 s windows, 2,000 rounds, one small-model round")
    parser.add_argument("--calibrate", action="store_true", help="measure honest noise (torch vs vLLM)")
    parser.add_argument("--n", type=int, default=600, help="nonces per configuration when calibrating")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    asyncio.run(main(parser.parse_args()))
