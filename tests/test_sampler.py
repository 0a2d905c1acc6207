"""The reproducible sampler: each test states one property the protocol relies on.

Statistical tests draw with fixed seeds, so they are deterministic: they
either always pass or always fail on a given build, never flake.
"""

from __future__ import annotations

import math

import pytest
import torch

from gonka_p2p.inference.sampler import (
    RowRules,
    SamplingParams,
    check_token,
    choose_token,
    position_uniform,
    token_weights,
)

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0, 1.5, 0.9])


def params(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=16, **kwargs)


def processed_probs(logits: torch.Tensor, rule: SamplingParams) -> torch.Tensor:
    """The distribution the rule draws from: its integer weights, normalised."""
    weights = token_weights(logits.to(torch.float32).unsqueeze(0),
                            RowRules.of([(rule, b"")], logits.numel()))[0]
    return weights.to(torch.float64) / weights.sum(dtype=torch.int64)


def chi_square_critical(df: int, z: float = 4.26) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 4.26 is a 1e-5 tail."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_uniform_is_deterministic_in_range_and_varies() -> None:
    draws = [position_uniform(b"seed", i) for i in range(1000)]
    assert draws == [position_uniform(b"seed", i) for i in range(1000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert len(set(draws)) == 1000
    assert position_uniform(b"seed", 0) != position_uniform(b"seee", 0)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.05


def test_choice_is_a_pure_function_of_row_params_seed_position() -> None:
    p = params(temperature=1.0)
    picks = [choose_token(LOGITS, p, b"inference-1", i) for i in range(64)]
    assert picks == [choose_token(LOGITS.clone(), p, b"inference-1", i) for i in range(64)]
    assert picks != [choose_token(LOGITS, p, b"inference-2", i) for i in range(64)]
    assert len(set(picks)) > 3  # the noise really moves the choice


def test_temperature_zero_is_argmax_with_lowest_id_on_ties() -> None:
    for seed in (b"a", b"b", b"c"):
        for position in range(5):
            assert choose_token(LOGITS, params(), seed, position) == 0
    tied = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert choose_token(tied, params(), b"x", 0) == 1


def test_processed_probs_truncation() -> None:
    top_k = processed_probs(LOGITS, params(temperature=1.0, top_k=3))
    assert int((top_k > 0).sum()) == 3 and set(torch.nonzero(top_k).flatten().tolist()) == {0, 1, 8}
    assert math.isclose(float(top_k.sum()), 1.0, abs_tol=1e-12)
    assert int((processed_probs(LOGITS, params(temperature=1.0, top_k=9)) > 0).sum()) == 9
    full = processed_probs(LOGITS, params(temperature=1.0))
    top_p = processed_probs(LOGITS, params(temperature=1.0, top_p=0.6))
    kept = torch.nonzero(top_p).flatten().tolist()
    # the smallest most-likely set whose mass reaches 0.6: without its last member it falls short
    assert float(full[kept].sum()) >= 0.6
    least = min(kept, key=lambda i: float(full[i]))
    assert float(full[kept].sum() - full[least]) < 0.6


@pytest.mark.parametrize(
    "rule",
    [
        params(temperature=1.0),
        params(temperature=0.7),
        params(temperature=0.7, top_p=0.9),
        params(temperature=1.3, top_k=4),
        params(temperature=1.5, top_k=6, top_p=0.8),
    ],
    ids=["t1", "t0.7", "t0.7-p0.9", "t1.3-k4", "t1.5-k6-p0.8"],
)
def test_choices_follow_processed_probs(rule: SamplingParams) -> None:
    n = 6000
    probs = processed_probs(LOGITS, rule)
    counts = torch.zeros_like(probs)
    for i in range(n):
        counts[choose_token(LOGITS, rule, f"seed-{i}".encode(), i % 7)] += 1
    support = probs > 0
    assert float(counts[~support].sum()) == 0.0, "picked a token the rule excludes"
    expected = probs[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert chi2 < chi_square_critical(df), (chi2, df, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("rule", [params(), params(temperature=0.7, top_p=0.9)])
def test_check_accepts_the_honest_choice_and_rejects_others(rule: SamplingParams) -> None:
    rows = torch.randn(40, 50, generator=torch.Generator().manual_seed(7)) * 3
    for position, row in enumerate(rows):
        honest = choose_token(row, rule, b"inf", position)
        verdict = check_token(row, rule, b"inf", position, honest, tolerance=1e-6)
        assert verdict.ok and verdict.exact and verdict.margin == 0.0
        for other in range(row.numel()):
            if other != honest:
                assert not check_token(row, rule, b"inf", position, other, 1e-6).ok


def test_check_rejects_ids_outside_the_vocabulary() -> None:
    for claimed in (-1, LOGITS.numel()):
        verdict = check_token(LOGITS, params(temperature=1.0), b"s", 0, claimed, 1.0)
        assert not verdict.ok and verdict.margin == math.inf


def test_greedy_near_tie_is_tolerated_within_tolerance_only() -> None:
    row = torch.tensor([1.0, 1.0 - 1e-6, -2.0], dtype=torch.float64)
    verdict = check_token(row, params(), b"s", 0, 1, tolerance=1e-5)
    assert verdict.ok and not verdict.exact and 0 < verdict.margin < 1e-5
    assert not check_token(row, params(), b"s", 0, 1, tolerance=1e-7).ok
    assert not check_token(row, params(), b"s", 0, 2, tolerance=1e-5).ok


def test_sampled_near_tie_is_tolerated_within_tolerance_only() -> None:
    rule = params(temperature=1.0)
    u = position_uniform(b"tie", 3)
    # two tokens; token 0's mass ends 2e-6 above u (float32 probabilities resolve ~6e-8),
    # so the rule picks 0 by a hair
    p0 = u + 2e-6
    row = torch.tensor([math.log(p0), math.log(1.0 - p0)], dtype=torch.float64)
    assert choose_token(row, rule, b"tie", 3) == 0
    flipped = check_token(row, rule, b"tie", 3, 1, tolerance=1e-5)
    assert flipped.ok and not flipped.exact and 1e-6 < flipped.margin < 1e-5
    assert not check_token(row, rule, b"tie", 3, 1, tolerance=1e-7).ok


def test_a_token_just_outside_the_nucleus_is_a_near_tie_at_the_cut_only() -> None:
    """The executor's copy of the model keeps token 2 in a 0.9 nucleus; the validator's, off by
    at most ``e`` nats per logprob, ends the nucleus just before it. Within ``expm1(2 e / T)``
    of the cut it is a near-tie where the executor's noise drew it; not where the noise drew
    another token (else an executor could emit the token past the cut at will), and a token
    further out is not, whatever the tolerance at the cut."""
    rule = params(temperature=1.0, top_p=0.9)
    e, cut = 1e-3, math.expm1(2 * 1e-3)
    executor = torch.tensor([0.6, 0.2999, 0.06, 0.0401]).log()  # 0.8999 ahead of token 2: kept
    validator = executor + torch.tensor([e, e, -e, -e])  # about 0.90008 ahead of it: cut
    assert processed_probs(executor, rule)[2] > 0 and processed_probs(validator, rule)[2] == 0
    drawn = next(p for p in range(1000) if choose_token(executor, rule, b"s", p) == 2)
    near = check_token(validator, rule, b"s", drawn, 2, tolerance=0.0, cut_tolerance=cut)
    assert near.ok and not near.exact and 0 < near.cut <= cut
    assert not check_token(validator, rule, b"s", drawn, 2, tolerance=0.0, cut_tolerance=near.cut / 2).ok
    other = next(p for p in range(1000) if choose_token(executor, rule, b"s", p) == 0)
    steered = check_token(validator, rule, b"s", other, 2, tolerance=0.0, cut_tolerance=cut)
    assert not steered.ok and steered.cut == near.cut and steered.margin > cut
    far = check_token(validator, rule, b"s", 0, 3, tolerance=0.0, cut_tolerance=cut)
    assert not far.ok and far.cut > 0.05
    kept = check_token(validator, rule, b"s", 0, 0, tolerance=1.0)
    assert kept.ok and kept.cut == math.inf
