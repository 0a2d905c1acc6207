"""A validator's check in the engine that serves the model: the top-K, then the whole vocabulary.

A check is one prefill whose evidence is the top ``EVIDENCE_TOP_K`` logprobs
per position (``topk_evidence``). Greedy outputs are decided there; an output
that keeps undecidable positions (sampling over a flat tail: on SmolLM2 every
honest output at T = 1 and 1 of 3 at T = 0.7, top-p 0.9 in ``validation_bench``),
or whose open tail could make it suspicious for its wide near-ties
(``Verdict.wide_ties_open``), is scored again in the same engine over the
whole vocabulary, where the verdict is the full-logits reference's. Every pass fails an output only on a
failure proven at its floors (or on rule 6, too many undecidable positions
for its evidence), so the second pass runs only while the first is valid.

What the second pass costs, and what did not cut it (SmolLM2 on a CPU, a
42-token prompt and a 32-token answer, ``score`` alone,
``benchmarks/score_cost.py``): 111 ms at k = 1, 138 ms at the top-K, 893 ms
over the whole vocabulary, about 11 ms a position of sorting 49k logprobs and
listing them as Python floats -- for the *prompt's* positions too (42 of 74
here): vLLM computes prompt logprobs from the first token on and turns off
prefix caching for such requests. A middle pass at the top 8,192 (259 ms) was
tried: it decided 2 of 3 nucleus outputs and none of 3 plain ones, for no net
gain (1.02x on SmolLM2, 0.81x on the tiny model, ``validation_bench``), so it
is not run. Prompt logprobs that start at the answer would halve the second
pass.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine, ScoredCompletion
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K, full_rows
from gonka_p2p.inference.verification import Contract, Verdict, verify
from gonka_p2p.inference.verification_params import ModelThresholds


@dataclass(frozen=True)
class ServedCheck:
    """The verdict, the undecidable positions the top-K pass left, and whether a second ran."""

    verdict: Verdict
    first_undecidable: int
    second_pass: bool


async def check_in_engine(engine: Engine, artifact: InferenceArtifact, contract: Contract,
                          thresholds: ModelThresholds) -> ServedCheck:
    """Judge ``artifact`` on ``contract`` from prefills in ``engine``: the top-K, then the whole
    vocabulary while that verdict is valid and leaves undecidable positions or open wide ties."""
    vocab = engine.local_model.vocab_size
    first = await _verify(engine, artifact, contract, thresholds, min(EVIDENCE_TOP_K, vocab))
    if not (first.valid and (first.undecidable or first.wide_ties_open)):
        return ServedCheck(first, first.undecidable, False)
    return ServedCheck(await _verify(engine, artifact, contract, thresholds, vocab), first.undecidable, True)


async def _verify(engine: Engine, artifact: InferenceArtifact, contract: Contract,
                  thresholds: ModelThresholds, k: int) -> Verdict:
    """One prefill with the top ``k`` logprobs per position, judged; with k = the vocabulary
    the rows are whole and the verdict is the reference's."""
    vocab = engine.local_model.vocab_size
    scored = await engine.score(list(contract.prompt_ids), artifact.completion_ids, k)
    if k >= vocab:
        scored = ScoredCompletion(scored.steps, full_rows(scored.steps, vocab))
    # The metric is pure CPU work (a few ms of float64 on [n, K] tables): off the loop.
    return await asyncio.to_thread(verify, artifact, scored, thresholds, contract=contract,
                                   eos_token_ids=engine.eos_token_ids, vocab_size=vocab)
