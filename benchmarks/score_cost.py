"""What a validator's prefill costs in vLLM, by the k of its top-k logprobs and by where they are.

A check is ``engine.score``: one prefill over prompt + answer returning the top
k logprobs per answer position (``inference/served_check.py``: k = 1,024,
then the whole vocabulary for an output that leaves positions undecidable).
vLLM computes prompt logprobs from the first prompt token on, so the prompt's
positions pay for them too. This prints, side by side in one run and one
engine, the median time of ``score`` for each k, over the whole answer and
over its first few tokens (the prompt's share of the cost is the difference's
complement), and each as a multiple of k = 1 (the prefill itself). A second
table splits the cost above k = 1 into the two steps vLLM takes per scored
row, reproduced with torch on random rows of the same shape: the top-k of the
logprobs (a full sort at k = the vocabulary) and the lists of Python floats
and ints its output processor builds.

    OMP_NUM_THREADS=1 python benchmarks/score_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import statistics
import time
from pathlib import Path

from detection_matrix import markdown  # sets the thread and log env first

import torch  # noqa: E402

from gonka_p2p.inference.model_names import DEFAULT_MODEL  # noqa: E402
from gonka_p2p.inference.sampler import SamplingParams  # noqa: E402
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUESTION = "Write a short story about a robot who learns to paint."


async def median_ms(step, repeats: int) -> float:
    """Median milliseconds of ``step()``, awaited when it returns an awaitable."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = step()
        if inspect.isawaitable(result):
            await result
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


async def step_costs(n_rows: int, vocab: int, ks: tuple[int, ...], repeats: int) -> list[list[str]]:
    """Per k: ms for the top-k of ``n_rows`` logprob rows, and for turning it into Python lists."""
    logprobs = torch.log_softmax(torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(0)), dim=-1)
    rows = []
    for k in ks:
        top = torch.topk(logprobs, k, dim=-1)
        sort = await median_ms(lambda: torch.topk(logprobs, k, dim=-1), repeats)
        listing = await median_ms(lambda: (top.values.tolist(), top.indices.tolist()), repeats)
        rows.append([str(n_rows), str(k), f"{sort:.1f}", f"{listing:.1f}"])
    return rows


async def run(model: str, max_tokens: int, short: int, repeats: int) -> tuple[list[list[str]], list[list[str]]]:
    from gonka_p2p.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(model, max_num_seqs=8)
    try:
        prompt = engine.encode_chat([("user", QUESTION)])
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
        answer = [s.token_id async for s in engine.generate(prompt, params, b"score-cost".ljust(16, b"."))]
        vocab = engine.local_model.vocab_size
        rows = []
        base: dict[int, float] = {}  # answer tokens -> seconds at k = 1
        ks = tuple(dict.fromkeys((1, EVIDENCE_TOP_K, 8 * EVIDENCE_TOP_K, vocab)))
        for k in ks:
            for n in (len(answer), min(short, len(answer))):
                seconds = await median_ms(lambda: engine.score(prompt, answer[:n], k), repeats) / 1000
                if k == 1:
                    base[n] = seconds
                rows.append([engine.model_name, str(len(prompt)), str(n), str(k), f"{1000 * seconds:.1f}",
                             f"{seconds / base[n]:.2f}x"])
        return rows, await step_costs(len(prompt) + len(answer) - 1, vocab, ks, repeats)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--short", type=int, default=8, help="answer tokens of the short rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for score_cost.md")
    args = parser.parse_args()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    rows, steps = asyncio.run(run(args.model, args.max_tokens, args.short, args.repeats))
    text = (f"# Cost of a validator's prefill by k\n\nmedian of {args.repeats}; load average {load}.\n\n"
            + markdown(("model", "prompt tokens", "answer tokens", "k", "score ms", "x k = 1"), rows)
            + "\n\nvLLM's steps per scored row, on random rows of the same shape:\n\n"
            + markdown(("rows", "k", "top-k ms", "to Python lists ms"), steps))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score_cost.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
