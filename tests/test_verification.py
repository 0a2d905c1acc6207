"""The verification metric, rule by rule, and the epoch test.

Real artifacts come from the tiny model (torch engine, seconds); the near-tie
rules use hand-made logits so the margin is known exactly; the SPRT runs on
synthetic outcome streams drawn with fixed seeds, so every test is
deterministic: it always passes or always fails on a given build.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch
from test_sampler_batched import literal_cut_margin, literal_cut_pick_margin, literal_weights, splitmix_u32

from gonka_p2p.actors.node import verification_params_of
from gonka_p2p.adversary import cheats
from gonka_p2p.inference import verification
from gonka_p2p.inference import verification_params
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.adversary.engine import CheatingEngine
from gonka_p2p.inference.engine import ScoredCompletion, TokenStep
from gonka_p2p.inference.model_names import DEFAULT_MODEL, TINY_MODEL
from gonka_p2p.inference.models import ModelSpec
from gonka_p2p.inference.sampler import MIN_TEMPERATURE, SamplingParams, nucleus_mask, position_uniform
from gonka_p2p.inference.torch_engine import TorchEngine, token_step
from gonka_p2p.inference.verification import Billed, Contract, Evidence, Measurements, Verdict, verify
from gonka_p2p.inference.verification_params import (
    ModelThresholds,
    SprtParams,
    load_verification_params,
    thresholds_table,
    verification_params_from_obj,
)
from gonka_p2p.ledger.devnet import init_local_network
from gonka_p2p.ledger.genesis import Params, sprt_params_from_rates
from gonka_p2p.ledger.epoch_test import NO_CARRY, run_epoch_test
from gonka_p2p.ledger.rules import Observation
from gonka_p2p.wire.messages import response_hash

# Round test values, same order of magnitude as the calibrated ones (nats).
THRESHOLDS = ModelThresholds(logprob_tolerance=1e-4, max_mean_distance=2e-5,
                             suspicious_mean_distance=1e-5, reference_tokens=16)
GREEDY = SamplingParams(max_tokens=16)
SAMPLED = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9)
PLAIN = SamplingParams(max_tokens=16, temperature=1.0)
# Outside the tiny model's training corpus: it rambles on to max_tokens instead of stopping.
QUESTIONS = ("Write a short story about a robot who learns to paint.", "Describe the ocean.",
             "Explain volcanoes to a child.")


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(TINY_MODEL)


def prompt(engine: TorchEngine, i: int = 0) -> list[int]:
    return engine.encode_chat([("user", QUESTIONS[i % len(QUESTIONS)])])


def asked(artifact: InferenceArtifact, params: SamplingParams | None = None, billed: Billed | None = None
          ) -> Contract:
    """The contract of the request ``artifact`` answers: its prompt and seed, and ``params``
    (default: the parameters it states)."""
    return Contract(artifact.model, artifact.prompt_ids, params or artifact.params, artifact.seed, billed)


async def check(engine: TorchEngine, artifact: InferenceArtifact,
                thresholds: ModelThresholds = THRESHOLDS, contract: Contract | None = None) -> Verdict:
    """What a validator does: fetch the bytes, score teacher-forced, verify by the contract."""
    claim = InferenceArtifact.decode(artifact.encode())
    contract = contract or asked(claim)
    scored = await engine.score(list(contract.prompt_ids), claim.completion_ids,
                                contract.params.logprobs_k, with_logits=True)
    return verify(claim, scored, thresholds, contract=contract, eos_token_ids=engine.eos_token_ids)


def billed(artifact: InferenceArtifact) -> Billed:
    """What an honest executor's Finish puts on the ledger for ``artifact``."""
    return Billed(response_hash(artifact.completion_ids), len(artifact.prompt_ids), len(artifact.steps))


async def honest(engine: TorchEngine, params: SamplingParams, i: int = 0) -> InferenceArtifact:
    return await cheats.honest(engine)(prompt(engine, i), params, f"seed-{i}".encode())


def failed_rules(verdict: Verdict) -> set[str]:
    return {reason.split(":")[0] for reason in verdict.reasons}


# ---------------------------------------------------------------------------
# Honest work passes, short or long


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_honest_outputs_pass(engine: TorchEngine, params: SamplingParams) -> None:
    for i in range(len(QUESTIONS)):
        artifact = await honest(engine, params, i)
        verdict = await check(engine, artifact, contract=asked(artifact, billed=billed(artifact)))
        assert verdict.valid, verdict.reasons
        assert verdict.evidence is Evidence.CLEAN
        assert 0 < verdict.mean_distance < 1e-5 and verdict.sampling_mismatches == 0


async def test_honest_outputs_pass_the_shipped_thresholds(engine: TorchEngine) -> None:
    shipped = load_verification_params().for_model(engine.model_name)
    for params in (GREEDY, SAMPLED):
        verdict = await check(engine, await honest(engine, params), shipped)
        assert verdict.valid, verdict.reasons


async def test_short_honest_output_passes_and_short_cheats_fail(engine: TorchEngine) -> None:
    short = SamplingParams(max_tokens=2, temperature=0.7)
    artifact = await honest(engine, short, 1)
    assert len(artifact.steps) <= 2
    assert (await check(engine, artifact)).valid
    fabricated = cheats.fabricate_logprobs(artifact, engine.local_model.vocab_size)
    assert "distance" in failed_rules(await check(engine, fabricated))
    assert not (await check(engine, cheats.alter_token(artifact))).valid


async def test_early_stop_on_eos_passes(engine: TorchEngine) -> None:
    artifact = await cheats.honest(engine)(
        engine.encode_chat([("user", "What do bees make?")]), SamplingParams(max_tokens=64), b"s")
    assert len(artifact.steps) < 64 and artifact.completion_ids[-1] in engine.eos_token_ids
    assert (await check(engine, artifact)).valid


# ---------------------------------------------------------------------------
# Length and token agreement: mismatches fail (Gonka passes them)


async def test_truncated_output_fails_on_length(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    assert len(artifact.steps) == GREEDY.max_tokens  # no EOS: the truncation is visible
    verdict = await check(engine, cheats.truncate(artifact))
    assert failed_rules(verdict) == {"length"}


async def test_more_tokens_than_max_tokens_fails(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    claimed = dataclasses.replace(artifact, params=dataclasses.replace(GREEDY, max_tokens=8))
    assert "length" in failed_rules(await check(engine, claimed))


async def test_eos_before_the_end_fails(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    eos = min(engine.eos_token_ids)
    steps = list(artifact.steps)
    steps[5] = dataclasses.replace(steps[5], token_id=eos)
    verdict = await check(engine, dataclasses.replace(artifact, steps=tuple(steps)))
    assert {"length", "sampling"} <= failed_rules(verdict)


async def test_empty_completion_fails(engine: TorchEngine) -> None:
    artifact = dataclasses.replace(await honest(engine, GREEDY), steps=())
    verdict = verify(artifact, ScoredCompletion(steps=[], logits=torch.zeros(0, 10)), THRESHOLDS,
                     contract=asked(artifact), eos_token_ids=engine.eos_token_ids)
    assert not verdict.valid and verdict.mean_distance == math.inf


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_replaced_token_fails_the_sampling_rule(engine: TorchEngine, params: SamplingParams) -> None:
    artifact = await honest(engine, params)
    verdict = await check(engine, cheats.alter_token(artifact))
    assert "sampling" in failed_rules(verdict) and verdict.sampling_mismatches >= 1


async def test_recomputation_that_does_not_cover_the_claim_fails(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    scored = await engine.score(list(artifact.prompt_ids), artifact.completion_ids[:-1],
                                artifact.params.logprobs_k, with_logits=True)
    verdict = verify(artifact, scored, THRESHOLDS, contract=asked(artifact), eos_token_ids=engine.eos_token_ids)
    assert failed_rules(verdict) == {"recomputation"}


async def test_artifact_that_is_not_the_committed_response_fails(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    wrong = dataclasses.replace(billed(artifact), response_hash=response_hash([1, 2, 3]))
    verdict = await check(engine, artifact, contract=asked(artifact, billed=wrong))
    assert failed_rules(verdict) == {"response"}


# ---------------------------------------------------------------------------
# Evidence: form and distance


async def test_fabricated_logprobs_fail_distance_and_top_k(engine: TorchEngine) -> None:
    artifact = await honest(engine, SAMPLED)
    verdict = await check(engine, cheats.fabricate_logprobs(artifact, engine.local_model.vocab_size))
    assert {"distance", "top-k"} <= failed_rules(verdict)
    assert verdict.mean_distance > 1.0


async def test_a_single_wrong_logprob_fails(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    steps = list(artifact.steps)
    lps = list(steps[3].top_logprobs)
    lps[2] -= 10 * THRESHOLDS.logprob_tolerance
    steps[3] = dataclasses.replace(steps[3], top_logprobs=tuple(lps))
    verdict = await check(engine, dataclasses.replace(artifact, steps=tuple(steps)))
    assert failed_rules(verdict) == {"distance"}


@pytest.mark.parametrize("forge", ["nan", "duplicate_ids"])
async def test_malformed_evidence_fails(engine: TorchEngine, forge: str) -> None:
    artifact = await honest(engine, GREEDY)
    steps = list(artifact.steps)
    if forge == "nan":
        steps[0] = dataclasses.replace(steps[0], logprob=float("nan"))
    else:  # repeat the top-1 id: would pass a naive top-k set check
        steps[0] = dataclasses.replace(steps[0], top_ids=(steps[0].top_ids[0],) * 5,
                                       top_logprobs=(steps[0].top_logprobs[0],) * 5)
    claim = dataclasses.replace(artifact, steps=tuple(steps))
    scored = await engine.score(list(claim.prompt_ids), claim.completion_ids, 5, with_logits=True)
    verdict = verify(claim, scored, THRESHOLDS, contract=asked(claim), eos_token_ids=engine.eos_token_ids)
    assert failed_rules(verdict) == {"evidence"}


def test_mean_limit_widens_for_short_outputs_up_to_the_single_value_tolerance() -> None:
    t = THRESHOLDS
    assert t.mean_limit(t.max_mean_distance, 16) == t.max_mean_distance
    assert t.mean_limit(t.max_mean_distance, 64) == t.max_mean_distance
    assert t.mean_limit(t.max_mean_distance, 4) == pytest.approx(2 * t.max_mean_distance)
    assert t.mean_limit(t.max_mean_distance, 1) == pytest.approx(4 * t.max_mean_distance)
    longer = dataclasses.replace(t, reference_tokens=64)
    assert longer.mean_limit(t.max_mean_distance, 1) == t.logprob_tolerance  # 8x would exceed it


# ---------------------------------------------------------------------------
# Cheats that produce real-looking evidence


async def test_prefill_attack_fails_on_sampling_with_honest_looking_logprobs(engine: TorchEngine) -> None:
    attack = cheats.make_cheater("prefill", engine)
    for i in range(len(QUESTIONS)):
        artifact = await attack(prompt(engine, i), SAMPLED, f"seed-{i}".encode())
        verdict = await check(engine, artifact)
        assert failed_rules(verdict) == {"sampling"}, verdict.reasons
        assert verdict.max_distance < THRESHOLDS.logprob_tolerance  # the evidence itself is real


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("request_terms", [PLAIN, GREEDY], ids=["plain", "greedy"])
async def test_prefill_attack_without_a_cut_fails_on_sampling_at_each_pinned_dtype(
        engine: TorchEngine, request_terms: SamplingParams, dtype: str) -> None:
    """Plain T = 1 (the OpenAI default) and greedy: no top-p or top-k cut can catch a written
    token, so only the near-tie width stands between the pre-fill attack and a pass. At bf16
    both widths came from the per-value tolerance (0.97 nats here, 2.25 on SmolLM2: the noise
    of tail logprobs): the sampled width saturated at 1 and none of 12 failed; the greedy one
    let any token within 1.9 nats of the top pass, and 4 of 8 failed. The calibrated widths
    leave bf16 noise room (the tiny model's half-layer writer is close to it at T = 1: 8 of 12
    fail per output, and the epoch test catches the rest; greedy, 8 of 8)."""
    thresholds = load_verification_params(dtypes={TINY_MODEL: dtype}).for_model(TINY_MODEL)
    attack = cheats.make_cheater("prefill", engine)
    terms = dataclasses.replace(request_terms, max_tokens=32)
    written = failed = 0
    for i in range(12):
        artifact = await attack(prompt(engine, i), terms, f"seed-{i}".encode())
        if artifact.completion_ids == (await honest(engine, terms, i)).completion_ids:
            continue  # the writer happened to write the model's own answer: no cheat to catch
        written += 1
        failed += "sampling" in failed_rules(await check(engine, artifact, thresholds))
    assert written >= 6
    assert failed == written if dtype == "float32" else failed >= 2 * written // 3, (failed, written)


async def test_wrong_temperature_inside_the_bf16_near_tie_width_leaves_suspicious_wide_ties() -> None:
    """A plain T = 1 request sampled at 0.7, on a bf16 engine: most of its moved tokens stay
    inside the near-tie width (SmolLM2: none of 30 outputs failed), but they sit further from
    the sampler's choice than honest noise ever came, and enough of them in one output make it
    suspicious, which the epoch test aggregates: a dozen such outputs accuse their executor.
    Honest work at the same terms stays clean. (How many of the twelve fail, are suspicious
    or pass is a fact about the tiny model, not a promise: counts are not asserted.)"""
    engine = TorchEngine(ModelSpec(TINY_MODEL, dtype="bfloat16"))
    thresholds = load_verification_params(dtypes={TINY_MODEL: "bfloat16"}).for_model(TINY_MODEL)
    attack = cheats.make_cheater("wrong-temperature", engine)
    terms = dataclasses.replace(PLAIN, max_tokens=32)
    evidence = []
    for i in range(12):
        evidence.append((await check(engine, await attack(prompt(engine, i), terms, f"seed-{i}".encode()),
                                     thresholds)).evidence)
        honest_verdict = await check(engine, await honest(engine, terms, i), thresholds)
        assert honest_verdict.evidence is Evidence.CLEAN and honest_verdict.wide_ties == 0
    assert Evidence.SUSPICIOUS in evidence and catches([e.observation for e in evidence]), evidence


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 32, 100, 1000, 4096])
def test_the_wide_tie_limit_is_the_honest_binomial_tail(n_tokens: int) -> None:
    """At most WIDE_TIE_TAIL of honest outputs (wide ties at HONEST_WIDE_TIE_RATE per position)
    reach the limit, and one fewer would mark more: exact binomial sums, not the log-space ones."""
    p, k = verification_params.HONEST_WIDE_TIE_RATE, verification_params.wide_tie_limit(n_tokens)

    def at_least(j: int) -> float:
        return 1.0 - sum(math.comb(n_tokens, i) * p ** i * (1 - p) ** (n_tokens - i) for i in range(j))

    assert at_least(k) <= verification_params.WIDE_TIE_TAIL < (at_least(k - 1) if k > 1 else 1.0)


@pytest.mark.parametrize("cheat", ["int4", "small-model", "wrong-temperature"])
async def test_gross_cheats_fail(engine: TorchEngine, cheat: str) -> None:
    artifact = await cheats.make_cheater(cheat, engine)(prompt(engine), SAMPLED, b"seed-0")
    assert not (await check(engine, artifact)).valid


async def test_cheating_engine_streams_the_claim_through_the_engine_interface(engine: TorchEngine) -> None:
    cheater = CheatingEngine(engine, "truncated")
    artifact = await cheats.generate_artifact(cheater, prompt(engine), GREEDY, b"seed-0")
    assert artifact == cheats.truncate(await honest(engine, GREEDY))
    assert failed_rules(await check(engine, artifact)) == {"length"}


def test_drop_layers_and_fake_quantize_transform_a_copy(engine: TorchEngine) -> None:
    small = cheats.variant_engine(engine, lambda m: cheats.drop_layers(m, 1))
    assert len(cheats.decoder_layers(small._model)) == 1
    assert len(cheats.decoder_layers(engine._model)) == 2  # the base is untouched
    quantized = cheats.fake_quantize(cheats.variant_engine(engine, lambda m: m)._model, 4)
    weight = cheats.decoder_layers(quantized)[0].mlp.up_proj.weight
    for row in weight[:8]:
        assert len(torch.unique(row)) <= 15  # -7..7 times the row's scale


def test_fp8_fake_quantization_leaves_e4m3_values_times_one_scale_per_row(engine: TorchEngine) -> None:
    base = cheats.decoder_layers(engine._model)[0].mlp.up_proj.weight
    fp8 = cheats.decoder_layers(cheats.fake_quantize_fp8(
        cheats.variant_engine(engine, lambda m: m)._model))[0].mlp.up_proj.weight
    scale = base.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    q = fp8 / scale
    assert torch.allclose(q, q.to(torch.float8_e4m3fn).to(torch.float32), rtol=1e-5, atol=1e-6)
    assert not torch.equal(fp8, base) and torch.allclose(fp8, base, rtol=2 ** -3, atol=scale.max().item())


# ---------------------------------------------------------------------------
# The batched validation pass is the position-by-position rule, bit for bit


def reference_margin(row: torch.Tensor, params: SamplingParams, seed: bytes, position: int,
                     claimed: int) -> float:
    """``check_token``'s margin on one row, the plain way: greedy, nats below the float32
    row's maximum; sampled, the rule's integer weights (``literal_weights``) and noise, and
    the distance of ``t`` from the claimed token's interval as a share of the total."""
    if params.greedy:
        x = row.to(torch.float32).to(torch.float64)
        return float(x.max() - x[claimed])
    q = literal_weights(row, params)
    lo, hi, total = sum(q[:claimed]), sum(q[:claimed + 1]), sum(q)
    t = splitmix_u32(seed, position) * total >> 32
    if hi <= lo:  # past the cut: measured in a kept set holding it, if it has weight
        finite = math.isfinite(literal_cut_margin(row, params, claimed))
        return literal_cut_pick_margin(row, params, seed, position, claimed) if finite else math.inf
    return 0.0 if lo <= t < hi else (lo - t if t < lo else t - hi + 1) / total


def reference_measurements(engine: TorchEngine, artifact: InferenceArtifact
                           ) -> tuple[list[TokenStep], torch.Tensor, Measurements]:
    """What the validator's pass must return, computed position by position from a full
    forward pass (the LM head over every position): evidence, logits rows, measurements."""
    ids, n, k = list(artifact.prompt_ids) + artifact.completion_ids, len(artifact.steps), \
        artifact.params.logprobs_k
    with torch.inference_mode():
        rows = engine._model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    rows = rows[len(artifact.prompt_ids) - 1:][:n]
    evidence, errors, shortfalls, margins, cut = [], [], [], [], []
    for i, (row, step) in enumerate(zip(rows, artifact.steps, strict=True)):
        lp = torch.log_softmax(row, dim=-1)
        top = torch.topk(lp, k)
        evidence.append(TokenStep(step.token_id, float(lp[step.token_id]),
                                  tuple(top.indices.tolist()), tuple(top.values.tolist())))
        claimed = zip((step.token_id, *step.top_ids), (step.logprob, *step.top_logprobs))
        errors.append(torch.tensor([abs(v - float(lp[t])) for t, v in claimed], dtype=torch.float64))
        shortfalls.append(max(0.0, *(float(top.values[-1]) - float(lp[t]) for t in step.top_ids)))
        margins.append(reference_margin(row, artifact.params, artifact.seed, i, step.token_id))
        cut.append(literal_cut_margin(row, artifact.params, step.token_id))
    length = verification.check_length(artifact, engine.eos_token_ids)
    return evidence, rows, Measurements(
        n_tokens=n, temperature=artifact.params.temperature,
        structural=(length,) if length else (),
        position_errors=tuple(float(e.mean()) for e in errors),
        max_error=max(float(e.max()) for e in errors),
        top_k_shortfall=tuple(shortfalls), sampling_margins=tuple(margins),
        error_ceilings=tuple(float(e.max()) for e in errors),  # from rows, ceilings are the floors
        top_k_ceilings=tuple(shortfalls), sampling_ceilings=tuple(margins),
        cut_margins=tuple(cut), cut_ceilings=tuple(cut))


# Sampled at T=1.5 with top-p 0.99 the tiny model's nucleus spans thousands of tokens:
# the whole-vocabulary sort runs as well as both candidate tiers.
WIDE = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.99, top_k=3000)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, WIDE], ids=["greedy", "sampled", "wide"])
async def test_batched_validation_equals_the_position_by_position_rule(
        engine: TorchEngine, params: SamplingParams) -> None:
    honest_work = [await honest(engine, params, i) for i in range(len(QUESTIONS))]
    cheating = [await cheats.make_cheater(c, engine)(prompt(engine), params, b"seed-0")
                for c in ("prefill", "wrong-temperature", "small-model")]
    tampered = [cheats.tamper_for(t, engine.local_model.vocab_size)(honest_work[0])
                for t in cheats.TAMPERS]
    margins = set()
    for artifact in honest_work + cheating + tampered:
        scored = await engine.score(list(artifact.prompt_ids), artifact.completion_ids,
                                    params.logprobs_k, with_logits=True)
        evidence, rows, expected = reference_measurements(engine, artifact)
        assert scored.steps == evidence
        assert torch.equal(scored.logits, rows)
        assert verification.measure(artifact, scored, eos_token_ids=engine.eos_token_ids) == expected
        margins |= {m > 0 for m in expected.sampling_margins}
    assert margins == {False, True}  # both exact picks and misses were compared


@pytest.mark.parametrize("tiers", [None, (1024,), (64, 1024), (16, 64, 1024), ()],
                         ids=["cpu-default", "accelerator", "two", "three", "whole-sort"])
def test_nucleus_mask_tiers_equal_the_full_sort(tiers: tuple[int, ...] | None) -> None:
    """Rows settled by the 64-candidate tier, by the 1024 one, and by neither, in one batch,
    whichever tiers a device takes (an accelerator's single tier is run here too)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5000)
    logits[:2] *= 30.0  # peaked: a nucleus of a few tokens
    logits[2:4] *= 3.0  # a few hundred tokens
    logits[4:, :] = 0.0  # flat: every token ties, the nucleus is 90% of them
    q = (torch.softmax(logits, dim=-1) * 2.0**30).to(torch.int32)
    threshold = (round(0.9 * 2**32) * q.sum(dim=-1, dtype=torch.int64)) >> 32
    for row, limit, mask in zip(q, threshold, nucleus_mask(q, threshold, tiers), strict=True):
        values, ids = torch.sort(row, descending=True, stable=True)
        expected = torch.zeros_like(mask)
        expected[ids[(torch.cumsum(values, dim=0, dtype=torch.int64) - values) < limit]] = True
        assert torch.equal(mask, expected)
    sizes = nucleus_mask(q, threshold).sum(dim=-1).tolist()
    assert sizes[0] < 64 and 64 < sizes[2] < 1024 and sizes[4] > 1024, sizes


# ---------------------------------------------------------------------------
# Near-ties: hand-made logits with known margins


def one_position(row: torch.Tensor, token: int, params: SamplingParams, seed: bytes) -> Verdict:
    """Verify a one-token claim of ``token`` whose evidence is exactly ``row``'s."""
    step = token_step(row, token, params.logprobs_k)
    artifact = InferenceArtifact("m", (1,), params, seed, (step,))
    scored = ScoredCompletion(steps=[step], logits=row.unsqueeze(0))
    return verify(artifact, scored, THRESHOLDS, contract=asked(artifact), eos_token_ids=frozenset({token}))


@pytest.mark.parametrize("gap, accepted", [(1e-5, True), (1.5e-4, True), (3e-4, False), (0.5, False)])
def test_greedy_near_tie_tolerance(gap: float, accepted: bool) -> None:
    row = torch.tensor([4.0, 4.0 - gap, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0], dtype=torch.float64)
    params = SamplingParams(max_tokens=1)
    assert one_position(row, 0, params, b"s").valid  # the exact pick
    verdict = one_position(row, 1, params, b"s")  # the runner-up: ok within 2 x tolerance nats
    assert verdict.valid is accepted
    assert verdict.near_ties == (1 if accepted else 0)


@pytest.mark.parametrize("offset, accepted", [(1e-6, True), (1e-4, True), (1e-3, False), (0.05, False)])
def test_sampled_near_tie_tolerance(offset: float, accepted: bool) -> None:
    params = SamplingParams(max_tokens=1, temperature=1.0)
    u = position_uniform(b"s", 0)
    p0 = u + offset  # the CDF boundary after token 0 sits `offset` above u: token 0 is drawn
    rest = (1.0 - p0) / 7
    row = torch.log(torch.tensor([p0] + [rest] * 7, dtype=torch.float64))
    assert one_position(row, 0, params, b"s").valid
    assert one_position(row, 1, params, b"s").valid is accepted


# ---------------------------------------------------------------------------
# The epoch test


# The ledger's epoch test (``epoch_test.run_epoch_test``, nothing carried) run with the integer parameters a genesis
# derives from the metric's design rates: do those rates keep the promises they are designed to?
DESIGN = SprtParams()
LEDGER = Params(**sprt_params_from_rates(**dataclasses.asdict(DESIGN)))


def catches(observations: list[Observation]) -> bool:
    return run_epoch_test(observations, NO_CARRY, LEDGER).accused


def draw(rng: random.Random, fail: float, suspicious: float) -> Evidence:
    x = rng.random()
    return Evidence.FAILED if x < fail else Evidence.SUSPICIOUS if x < fail + suspicious else Evidence.CLEAN


def epoch_rate(fail: float, suspicious: float, epoch_size: int, epochs: int, seed: int) -> float:
    """Share of epochs accused when each verdict is drawn at the given rates."""
    rng = random.Random(seed)
    return sum(catches([draw(rng, fail, suspicious).observation for _ in range(epoch_size)])
               for _ in range(epochs)) / epochs


def test_sprt_rarely_accuses_an_executor_at_the_honest_design_rates() -> None:
    rate = epoch_rate(DESIGN.honest_fail_rate, DESIGN.honest_suspicious_rate, 50, 4000, seed=1)
    assert rate <= 0.001


def test_sprt_catches_the_weakest_designed_cheat_within_an_epoch() -> None:
    assert epoch_rate(DESIGN.cheat_fail_rate, DESIGN.cheat_suspicious_rate, 30, 2000, seed=2) >= 0.99


def test_sprt_accuses_a_consistently_failing_executor_after_a_few_verdicts() -> None:
    step = max(LEDGER.sprt_failed_hit_llr_micro, LEDGER.sprt_far_hit_llr_micro)
    needed = math.ceil(LEDGER.sprt_cheating_bound_micro / step)
    assert needed == 3
    assert catches([Evidence.FAILED.observation] * needed)
    assert not catches([Evidence.FAILED.observation] * (needed - 1))


def test_sprt_catches_a_raised_failure_rate_without_suspicious_distances() -> None:
    # 20% failures (40x the honest bound), e.g. a cheat caught only by the sampling rule
    assert epoch_rate(0.2, 0.0, 50, 1000, seed=3) >= 0.95


def test_sprt_keeps_testing_after_accepting_honest() -> None:
    clean, suspicious = Evidence.CLEAN.observation, Evidence.SUSPICIOUS.observation
    assert not catches([clean] * 60)
    assert catches([clean] * 60 + [suspicious] * 5)


def test_every_verdict_outcome_is_an_observation_of_the_ledger() -> None:
    assert {e.observation for e in Evidence} == set(Observation)


# ---------------------------------------------------------------------------
# The calibrated parameters


def test_shipped_thresholds_cover_both_models_and_are_consistent() -> None:
    params = load_verification_params()
    for model in (DEFAULT_MODEL, TINY_MODEL):
        t = params.for_model(model)
        assert 0 < t.suspicious_mean_distance <= t.max_mean_distance <= t.logprob_tolerance < 1e-2
    with pytest.raises(KeyError):
        params.for_model("unknown-model")


def test_thresholds_are_those_of_the_dtype_the_genesis_pins() -> None:
    fp32, bf16 = THRESHOLDS, ModelThresholds(0.5, 0.05, 0.02, 16)
    table = {"models": {"m": {**dataclasses.asdict(fp32), "calibration": {"date": "2026-12-03"},
                              "bfloat16": {**dataclasses.asdict(bf16), "calibration": {}}}}}
    assert verification_params_from_obj(table).for_model("m") == fp32
    assert verification_params_from_obj(table, {"m": "float32", "other": "bfloat16"}).for_model("m") == fp32
    assert verification_params_from_obj(table, {"m": "bfloat16"}).for_model("m") == bf16
    del table["models"]["m"]["bfloat16"]
    with pytest.raises(ValueError, match=r"models\.m\.bfloat16: missing keys"):  # judged by nothing: refused
        verification_params_from_obj(table, {"m": "bfloat16"})
    table["models"]["m"]["float16"] = dataclasses.asdict(bf16)
    with pytest.raises(ValueError, match="unknown keys"):
        verification_params_from_obj(table)


def test_shipped_bfloat16_thresholds_cover_both_models_and_are_wider_than_float32() -> None:
    for model in (DEFAULT_MODEL, TINY_MODEL):
        fp32 = load_verification_params().for_model(model)
        bf16 = load_verification_params(dtypes={model: "bfloat16"}).for_model(model)
        assert 0 < bf16.suspicious_mean_distance <= bf16.max_mean_distance <= bf16.logprob_tolerance
        assert bf16.max_mean_distance > 100 * fp32.max_mean_distance  # bf16 noise: ~1e-2 nats, fp32 ~1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", [DEFAULT_MODEL, TINY_MODEL])
def test_shipped_sampling_near_ties_hold_honest_noise_and_stay_far_from_saturation(model: str, dtype: str) -> None:
    """The CDF near-tie width covers the widest honest margin its calibration measured, yet
    leaves most of the mass a wrong token can miss by at T = 1: at bf16 it was the
    single-logprob tolerance's, saturated at 1, and no sampled token failed."""
    table = thresholds_table()["models"][model]
    record = (table if dtype == "float32" else table[dtype])["calibration"]
    t = load_verification_params(dtypes={model: dtype}).for_model(model)
    widest = record["max_sampled_margin_cdf"]
    assert widest < verification_params.tie_tolerance(t, 0.7) < 1.0
    assert verification_params.tie_tolerance(t, 1.0) < 0.4


@pytest.mark.parametrize("model", [DEFAULT_MODEL, TINY_MODEL])
def test_shipped_bfloat16_greedy_near_ties_hold_honest_noise_inside_the_per_value_tolerance(model: str) -> None:
    """The greedy near-tie covers the widest honest greedy margin its calibration measured, and
    is narrower than the per-value tolerance (tail logprobs' noise, 2.25 nats on SmolLM2): twice
    that tolerance was the width, and a pre-filled token 4.5 nats below the top passed."""
    record = thresholds_table()["models"][model]["bfloat16"]["calibration"]
    t = load_verification_params(dtypes={model: "bfloat16"}).for_model(model)
    assert record["max_greedy_margin_nats"] < verification_params.tie_tolerance(t, 0.0) < t.logprob_tolerance


def test_a_node_judges_by_the_thresholds_of_its_genesis_pinned_dtype(tmp_path: Path) -> None:
    net = init_local_network(tmp_path, nodes=1, clients=0, models=(TINY_MODEL,),
                             verification=thresholds_table(), dtype="bfloat16")
    assert verification_params_of(net.genesis).for_model(TINY_MODEL) == load_verification_params(
        dtypes={TINY_MODEL: "bfloat16"}).for_model(TINY_MODEL)


# ---------------------------------------------------------------------------
# The contract: the request's terms, not the artifact's statement of them


async def test_an_artifact_judged_by_the_terms_it_states_is_judged_by_the_requests(engine: TorchEngine) -> None:
    greedy_work = await honest(engine, GREEDY)  # honest greedy work, and it says so
    assert (await check(engine, greedy_work)).valid
    verdict = await check(engine, greedy_work, contract=asked(greedy_work, SAMPLED))  # T = 0.7 was asked
    assert "contract" in failed_rules(verdict)
    assert verdict.sampling_mismatches > 0  # and it is not what the seeded sampler picks at T = 0.7


async def test_counts_other_than_the_artifacts_fail(engine: TorchEngine) -> None:
    artifact = await honest(engine, GREEDY)
    inflated = dataclasses.replace(billed(artifact), completion_tokens=len(artifact.steps) + 1)
    assert failed_rules(await check(engine, artifact, contract=asked(artifact, billed=inflated))) == {"contract"}


def test_scorable_evidence_is_in_vocabulary_and_fits_the_context() -> None:
    assert verification.check_scorable([1, 2], [3], vocab_size=10, max_context=3) is None
    assert verification.check_scorable([1, 2], [10], vocab_size=10, max_context=3).startswith("evidence")
    assert verification.check_scorable([1, 2], [3, 4], vocab_size=10, max_context=3).startswith("length")
    assert verification.check_scorable([1, 2], [], vocab_size=10, max_context=3).startswith("length")


def test_the_tie_tolerance_saturates_at_a_vanishing_temperature() -> None:
    """A client may sign T = 1e-300: no request runs at it (greedy in all but name, its
    logits / T overflow), the bound is at most 1 (a CDF moves no further), not an
    OverflowError, and at the coldest runnable T a token top-k excludes is still refused."""
    assert verification_params.tie_tolerance(THRESHOLDS, 1e-300) == 1.0
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=1, temperature=1e-300)
    row = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0], dtype=torch.float64)
    cold = SamplingParams(max_tokens=1, temperature=MIN_TEMPERATURE, top_k=5)
    assert one_position(row, 0, cold, b"s").valid
    assert not one_position(row, 7, cold, b"s").valid


@pytest.mark.parametrize("cheat", sorted(cheats.STATING))
async def test_cheats_that_state_what_they_did_fail(engine: TorchEngine, cheat: str) -> None:
    artifact = await cheats.make_cheater(cheat, engine)(prompt(engine), SAMPLED, b"seed-0")
    verdict = await check(engine, artifact, contract=asked(artifact, SAMPLED, billed(artifact)))
    assert "contract" in failed_rules(verdict), verdict.reasons


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
                                    SamplingParams(max_tokens=1, temperature=1.3, top_k=7)], ids=["nucleus", "top-k"])
def test_the_top_k_evidence_never_places_a_cut_token_further_out_than_the_whole_row(params: SamplingParams) -> None:
    """A token the cut surely leaves out gets a floor on its distance from the cut, from the
    top-K alone: never above the whole row's value (else an honest near-tie would fail
    on evidence that cannot see it), and far enough from 0 to fail a far-out token."""
    from gonka_p2p.inference.topk_evidence import _sampling_bounds

    rows = torch.randn(4, 400, generator=torch.Generator().manual_seed(5)) * 6.0  # nuclei inside the top-64
    for row in rows:
        lp = torch.log_softmax(row, dim=-1).double()
        top = torch.topk(lp, 64)
        claimed = torch.arange(row.numel())
        n = len(claimed)
        *_, cut_floor, cut_ceiling = _sampling_bounds(
            top.indices.repeat(n, 1), top.values.repeat(n, 1), claimed, lp[claimed], torch.full((n,), 0.5),
            params, row.numel())
        literal = torch.tensor([literal_cut_margin(row, params, t) for t in range(n)], dtype=torch.float64)
        decided = torch.isfinite(cut_floor)
        assert bool((cut_floor[decided] <= literal[decided]).all())
        assert bool(torch.isinf(cut_ceiling).all())
        assert bool((cut_floor[decided] > 0.05).any())  # far-out tokens fail from the evidence alone


def test_a_near_tie_at_the_cut_passes_and_is_left_out_of_rule_6() -> None:
    """A token just past the cut passes when the noise picks it in a kept set holding it
    (its sampling margin), within the tie tolerance plus the cut's; not otherwise."""
    t = verification_params.load_verification_params().for_model(TINY_MODEL)
    tol, tie = verification_params.cut_tolerance(t, 0.7), verification_params.tie_tolerance(t, 0.7)

    def at_cut(margin: float, cut: float, margin_ceiling: float | None = None,
               cut_ceiling: float | None = None) -> Measurements:
        ceiling = margin if margin_ceiling is None else margin_ceiling
        return Measurements(
            n_tokens=3, temperature=0.7, structural=(), position_errors=(0.0,) * 3, max_error=0.0,
            top_k_shortfall=(0.0,) * 3, sampling_margins=(0.0, margin, 0.0), error_ceilings=(0.0,) * 3,
            top_k_ceilings=(0.0,) * 3, sampling_ceilings=(0.0, ceiling, 0.0),
            cut_margins=(math.inf, cut, math.inf),
            cut_ceilings=(math.inf, cut if cut_ceiling is None else cut_ceiling, math.inf))

    verdict = verification.judge(at_cut(0.0, tol / 2), t)
    assert verdict.valid and verdict.near_ties == 1 and verdict.sampling_mismatches == 0
    assert verification.judge(at_cut(tie + tol / 2, tol / 2), t).valid  # the sets a copy keeps differ a little
    assert not verification.judge(at_cut(tie + 2 * tol, tol / 2), t).valid  # the noise picked another token
    assert not verification.judge(at_cut(0.0, tol * 2), t).valid  # too far past the cut
    assert not verification.judge(at_cut(math.inf, math.inf), t).valid  # no weight: as before, a miss
    # from top-K evidence: open at the cut (floors within, ceilings not) -> resolved, never rule 6
    verdict = verification.judge(at_cut(0.0, tol / 2, margin_ceiling=math.inf, cut_ceiling=math.inf), t)
    assert verdict.valid and verdict.undecidable == 1
