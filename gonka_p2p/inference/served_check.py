"""A validator's check in the engine that serves the model: top-K passes, widening only as needed.

Why tiers: a check is one prefill whose evidence is the top ``k`` logprobs per
position (``topk_evidence``). Greedy outputs, and most sampled ones, are decided
at ``EVIDENCE_TOP_K``; an output that keeps undecidable positions used to be
scored again over the whole vocabulary, and that pass is what made checking a
sampled output cost several times its generation on a CPU: vLLM hands every
listed logprob through its output processor as a Python float, so a pass costs
in proportion to ``k`` (about 35 ms a position at SmolLM2's 49k). A position is
undecidable only while the tail beyond the top ``k`` could move the noise point
across a token's interval, and that tail shrinks fast with ``k``, so a pass at
``WIDER_TOP_K`` decides most of what the first left open at a sixth of the
whole-vocabulary cost; only what it still leaves open pays for the whole rows.

Soundness does not depend on the tiers: every pass fails an output only on a
failure proven at its floors (or on rule 6, too many undecidable positions for
its own evidence), and the last pass lists the whole vocabulary, where the
verdict is the full-logits reference's. Rule 6 may now run twice on an honest
output, so its false alarm per output is at most twice ``UNDECIDABLE_FALSE_ALARM``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine, ScoredCompletion
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K, full_rows
from gonka_p2p.inference.verification import Contract, Verdict, verify
from gonka_p2p.inference.verification_params import ModelThresholds

WIDER_TOP_K = 8 * EVIDENCE_TOP_K  # the second pass's k, before the whole vocabulary


@dataclass(frozen=True)
class ServedCheck:
    """The verdict, the undecidable positions the first pass left, and the k of every pass run."""

    verdict: Verdict
    first_undecidable: int
    passes: tuple[int, ...]


def evidence_tiers(vocab_size: int) -> tuple[int, ...]:
    """The k of each pass in turn, the last one the whole vocabulary."""
    return (*(k for k in (EVIDENCE_TOP_K, WIDER_TOP_K) if k < vocab_size), vocab_size)


async def check_in_engine(engine: Engine, artifact: InferenceArtifact, contract: Contract,
                          thresholds: ModelThresholds, tiers: tuple[int, ...] | None = None) -> ServedCheck:
    """Judge ``artifact`` on ``contract`` from prefills in ``engine``, one per k of ``tiers``
    (default ``evidence_tiers``; the last must be the vocabulary): the next runs only while
    the verdict is valid and leaves undecidable positions."""
    passes: list[int] = []
    first_undecidable = 0
    for k in tiers or evidence_tiers(engine.local_model.vocab_size):
        verdict = await _verify(engine, artifact, contract, thresholds, k)
        if not passes:
            first_undecidable = verdict.undecidable
        passes.append(k)
        if not (verdict.valid and verdict.undecidable):
            break
    return ServedCheck(verdict, first_undecidable, tuple(passes))


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
