"""Attack class: steering past the cut. A lying executor holds the pinned model (it needs
its distribution for honest-looking logprobs anyway) and, wherever a token lies just past the
top-k/top-p cut -- within the tolerance a bf16 copy's cut may move -- emits that token instead
of the seeded sampler's pick. The validator used to accept such a token by its distance from
the cut alone, at any noise point, so the executor could steer every position where one
exists (an early EOS included). Now a token past the cut is a near-tie only where the noise
also picks it in a kept set holding it (``sampler.is_near_tie``), as it must have for an
honest executor whose copy kept it."""

from __future__ import annotations

import pytest
import torch

from served_evidence import Served, id_of, judge, prompt_of, signed_request
from test_sampler_batched import literal_cut_pick_margin

from gonka_p2p.inference import verification_params
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.model_names import TINY_MODEL
from gonka_p2p.inference.sampler import RowRules, SamplingParams, _weights, choose_token, claim_margins, token_weights
from gonka_p2p.inference.torch_engine import TorchEngine, token_step

# Plain nucleus sampling, a common client request.
NUCLEUS = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9)
THRESHOLDS = verification_params.load_verification_params().for_model(TINY_MODEL)  # what the validator pins
CANDIDATES = 8  # tokens just past the nucleus tried per position


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(TINY_MODEL)


def _just_cut(row: torch.Tensor, params: SamplingParams, seed: bytes) -> torch.Tensor:
    """The heaviest tokens the nucleus leaves out (weight desc, id asc), the ones nearest the cut."""
    rules = RowRules.of([(params, seed)], row.numel())
    kept = token_weights(row.view(1, -1).float(), rules)[0]
    weights = _weights(row.view(1, -1).float(), params.temperature)[0]
    values, order = torch.sort(weights, descending=True, stable=True)
    return order[(kept[order] == 0) & (values > 0)][:CANDIDATES]


async def _steer_past_the_cut(engine: TorchEngine, prompt: list[int], params: SamplingParams, seed: bytes
                              ) -> tuple[InferenceArtifact, list[tuple[int, float]]]:
    """The lying executor: the pinned model's distribution at every position (it needs it for
    the honest-looking logprobs anyway), but wherever a token just past the nucleus is within
    ``cut_tolerance`` of the cut it emits that token instead of the seeded sampler's pick.
    Returns the artifact and, per steered position, the token's margin had the cut kept it."""
    tolerance = verification_params.cut_tolerance(THRESHOLDS, params.temperature)
    completion: list[int] = []
    steps, steered = [], []
    for position in range(params.max_tokens):
        row = (await engine.score(prompt, completion + [0], 5, with_logits=True)).logits[-1]
        token = choose_token(row, params, seed, position)
        cut = _just_cut(row, params, seed)
        if len(cut):
            _, _, cut_margin = claim_margins(row.unsqueeze(0).repeat(len(cut), 1), params, seed, cut, position)
            near = cut[cut_margin <= tolerance]
            near = near[near != token]
            if len(near):
                token = int(near[0])
                steered.append((position, literal_cut_pick_margin(row, params, seed, position, token)))
        steps.append(token_step(row, token, params.logprobs_k))
        completion.append(token)
        if token in engine.eos_token_ids:
            break
    return InferenceArtifact(engine.model_name, tuple(prompt), params, seed, tuple(steps)), steered


async def test_tokens_just_past_the_nucleus_are_accepted_whatever_the_seeded_noise(engine: TorchEngine) -> None:
    tie = verification_params.tie_tolerance(THRESHOLDS, NUCLEUS.temperature) \
        + verification_params.cut_tolerance(THRESHOLDS, NUCLEUS.temperature)
    for nonce in range(8):  # the first request (deterministic) with room for the attack
        request = signed_request(engine.model_name, NUCLEUS, [("user", "Describe the ocean.")], bytes([nonce]) * 16)
        artifact, steered = await _steer_past_the_cut(engine, prompt_of(engine, request), NUCLEUS, id_of(request))
        if len(steered) >= 3:
            break
    assert len(steered) >= 3, "the attack found no room: the test proves nothing"
    # No honest executor emits these tokens: even a copy of the model whose nucleus kept each of
    # them would have drawn it only with the noise point near its interval, which it is not.
    assert all(margin > tie for _, margin in steered), steered
    verdict = await judge(engine, Served.honestly(request, artifact))  # the validator's whole path
    assert verdict is not None
    assert not verdict.valid, (
        f"{len(steered)} of {len(artifact.steps)} tokens were not the seeded sampler's (positions "
        f"{[p for p, _ in steered]}), yet the verdict is valid, suspicious={verdict.suspicious}, "
        f"sampling_mismatches={verdict.sampling_mismatches}")
