"""Where the batched sampler's time goes on a device (issue 13): per sampling mix, the wall
time of one ``sample_batch`` next to the time its kernels keep the device busy, how many
kernels it launches and how often the host waits for the device.

On an H200 the sampler cost about the same at batch 64 and 256 and at 49k and 152k
tokens (``sampler_bench``): a sign that launches and host round trips, not arithmetic,
set its time. This measures that directly (``torch.profiler``), so a change to the
sampler can be judged by the numbers that matter on a GPU.

``--variant FILE`` also times a candidate: a Python file whose top-level functions
replace ``gonka_p2p.inference.sampler``'s functions of the same name for the second
measurement, and whose tokens must equal the current ones (checked on every mix).

Rows are real logits: of the model (``--model``), or of a file written by
``--save-rows`` (so a machine without the model can run it).

    python benchmarks/sampler_profile.py --save-rows rows.pt            # where the model is
    python benchmarks/sampler_profile.py --rows rows.pt --batch 256     # on the GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sampler_bench import MIXES, model_logits, timed, widened  # noqa: E402

from gonka_p2p.inference import sampler  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL  # noqa: E402

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPIES = ("cudaMemcpy", "cudaMemcpyAsync")  # a device-to-host one waits for the device too


def profiled(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Per call of ``fn``: device-busy ms (sum of kernel times), kernels launched, host
    synchronisations and memory copies."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    return {"busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / repeats,
            "kernels": sum(e.count for e in kernels) / repeats,
            "syncs": sum(e.count for e in events if e.key in SYNCS) / repeats,
            "copies": sum(e.count for e in events if e.key in COPIES) / repeats,
            "table": events.table(sort_by="cpu_time_total", row_limit=18)}


@contextmanager
def replaced(path: Path | None):
    """``sampler``'s functions replaced by those ``path`` defines, for the block's duration."""
    if path is None:
        yield
        return
    spec = importlib.util.spec_from_file_location("_variant", path)
    variant = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = variant  # dataclasses look their module up while being defined
    spec.loader.exec_module(variant)
    names = [n for n, v in vars(variant).items()
             if callable(v) and hasattr(sampler, n) and getattr(sampler, n) is not v]
    kept = {n: getattr(sampler, n) for n in names}
    try:
        for n in names:
            setattr(sampler, n, getattr(variant, n))
        yield
    finally:
        for n, f in kept.items():
            setattr(sampler, n, f)


def measure(rows: torch.Tensor, vocabs: list[int], device: torch.device, repeats: int,
            label: str) -> tuple[list[dict], dict]:
    results, tokens = [], {}
    for vocab in vocabs:
        logits = widened(rows, vocab).to(device)
        positions = torch.arange(len(rows), device=device)
        for mix, rule in MIXES.items():
            rules = sampler.RowRules.of([(rule(i), f"bench-{i}".encode()) for i in range(len(rows))], vocab, device)
            call = lambda: sampler.sample_batch(logits, rules, positions)  # noqa: E731
            tokens[vocab, mix] = call().cpu()
            wall = timed(call, device, repeats) * 1e3
            results.append({"variant": label, "vocab": vocab, "mix": mix, "wall_ms": wall,
                            **profiled(call, device, repeats)})
    return results, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=Path, help="logits rows saved by --save-rows")
    parser.add_argument("--save-rows", type=Path, help="write the model's rows here (float16) and stop")
    parser.add_argument("--variant", type=Path, help="a file of replacement sampler functions to compare")
    parser.add_argument("--tables", action="store_true", help="print the profiler's op table per measurement")
    args = parser.parse_args()
    if args.save_rows:
        torch.save(model_logits(args.model, args.batch).to(torch.float16), args.save_rows)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = (torch.load(args.rows).to(torch.float32)[: args.batch] if args.rows
            else model_logits(args.model, args.batch))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# sampler profile: batch {len(rows)}, {name}, torch {torch.__version__}, "
          f"load average {os.getloadavg()}")
    results, tokens = measure(rows, args.vocabs, device, args.repeats, "current")
    if args.variant:
        with replaced(args.variant):
            candidate, candidate_tokens = measure(rows, args.vocabs, device, args.repeats, args.variant.stem)
        differ = [key for key in tokens if not torch.equal(tokens[key], candidate_tokens[key])]
        print(f"\nvariant {args.variant.stem}: tokens {'DIFFER at ' + str(differ) if differ else 'equal'} "
              "on every mix and vocabulary")
        results += candidate
    print("\n| variant | vocab | mix | wall ms | device busy ms | kernels | syncs | copies |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['vocab']} | {r['mix']} | {r['wall_ms']:.3f} | {r['busy_ms']:.3f} | "
              f"{r['kernels']:.0f} | {r['syncs']:.0f} | {r['copies']:.0f} |")
    if args.tables:
        for r in results:
            print(f"\n## {r['variant']} {r['vocab']} {r['mix']}\n{r['table']}")
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
