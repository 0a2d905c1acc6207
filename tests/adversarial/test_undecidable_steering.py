"""Attack: steer the output through positions the top-K evidence cannot decide.

A validator judges from the top ``EVIDENCE_TOP_K`` logprobs of one prefill
(``inference/topk_evidence.py``). In plain T = 1 sampling over a flat tail, the
ids outside the top-K hide where the noise point falls, so at some positions a
tail token other than the seeded sampler's pick cannot be told from it. An
executor holding the model can find those positions and emit a token of its
choice there -- here, the tail token nearest the honest pick's id that the
evidence leaves possible -- with the real model's logprobs for every claim.

What must hold: the top-K evidence alone passes such an artifact (its floors
are all met: the hole is real, rule 6's bound does not see a few positions),
and the validator's whole check path fails it on sampling, because an output
that leaves undecidable positions is scored again in the same engine over the
whole vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from gonka_p2p.inference import verification
from gonka_p2p.inference import verification_params
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.model_names import TINY_MODEL
from gonka_p2p.inference.sampler import SamplingParams, choose_token, position_uniform
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K, _sampling_bounds
from gonka_p2p.inference.torch_engine import TorchEngine, token_step
from gonka_p2p.ledger.transactions import FailureFlag

from served_evidence import Served, id_of, judge, prompt_of, signed_request

PLAIN = SamplingParams(max_tokens=32, temperature=1.0)
CANDIDATES = 256  # tail ids tried per position, nearest the honest pick's id first


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(TINY_MODEL)


async def steered(engine: TorchEngine, prompt: list[int], params: SamplingParams, seed: bytes
                  ) -> tuple[InferenceArtifact, int]:
    """The steering executor's artifact and how many positions it steered."""
    vocab, tolerance = engine.local_model.vocab_size, verification_params.tie_tolerance(THRESHOLDS, params.temperature)
    completion, steps, moved = [], [], 0
    for position in range(params.max_tokens):
        row = (await engine.score(prompt, completion + [0], 5, with_logits=True)).logits[-1]
        honest = choose_token(row, params, seed, position)
        logprobs = torch.log_softmax(row, dim=-1)
        top = torch.topk(logprobs, EVIDENCE_TOP_K)
        tail = torch.ones(vocab, dtype=torch.bool).index_fill_(0, top.indices, False).nonzero().view(-1)
        near = tail[(tail - honest).abs().argsort()[:CANDIDATES]]
        u = torch.full((len(near),), position_uniform(seed, position), dtype=torch.float64)
        floor, *_ = _sampling_bounds(top.indices.repeat(len(near), 1), top.values.double().repeat(len(near), 1),
                                       near, logprobs[near].double(), u, params, vocab)
        possible = near[floor <= tolerance]
        token = int(possible[0]) if len(possible) else honest
        moved += token != honest
        steps.append(token_step(row, token, params.logprobs_k))
        completion.append(token)
        if token in engine.eos_token_ids:
            break
    return InferenceArtifact(engine.model_name, tuple(prompt), params, seed, tuple(steps)), moved


THRESHOLDS = verification_params.load_verification_params().for_model(TINY_MODEL)


async def test_steering_through_undecidable_positions_is_caught(engine: TorchEngine) -> None:
    for nonce in range(8):  # the first request (deterministic) the attack finds room in
        request = signed_request(engine.model_name, PLAIN, [("user", "Describe the ocean.")], bytes([nonce]) * 16)
        prompt = prompt_of(engine, request)
        artifact, moved = await steered(engine, prompt, PLAIN, id_of(request))
        if moved >= 3:
            break
    assert moved >= 3, "the attack found nothing to steer: the test proves nothing"
    contract = verification.Contract(engine.model_name, tuple(prompt), PLAIN, id_of(request))
    evidence = await engine.score(prompt, artifact.completion_ids, EVIDENCE_TOP_K)
    top_k_only = verification.verify(artifact, evidence, THRESHOLDS, contract=contract,
                                     eos_token_ids=engine.eos_token_ids,
                                     vocab_size=engine.local_model.vocab_size)
    assert top_k_only.valid and top_k_only.undecidable >= moved  # the hole: floors pass, rule 6 allows it
    verdict = await judge(engine, Served.honestly(request, artifact))
    assert verdict is not None and not verdict.valid
    # every steered token the reference tells apart (some land within a near-tie of the pick)
    assert verdict.failure_flags & FailureFlag.SAMPLING and 1 <= verdict.sampling_mismatches <= moved
