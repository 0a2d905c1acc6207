"""The batched sampler is the validator's rule, bit for bit, whatever the batch.

``literal_choice`` is the rule of ``sampler``'s docstring written the plain way
(one row, Python integers for the noise, a whole-row stable sort for top-p, a
whole-row prefix sum): the tests hold ``sample_batch`` (chunked sums, candidate
tiers, blocks of rows, greedy/sampled split) and the validator's
``choose_token``/``check_token`` to it over many seeds, positions, parameter
mixes and batch compositions.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gonka_p2p.inference.sampler import (
    MIN_TEMPERATURE,
    WEIGHT_BITS,
    RowRules,
    SamplingParams,
    check_token,
    choose_token,
    claim_margins,
    first_argmax,
    noise_bits,
    sample_batch,
    seed_key,
)

_MASK = (1 << 64) - 1


def splitmix_u32(seed: bytes, position: int) -> int:
    """Rule 5's ``u`` in Python integers: SplitMix64 output ``position + 1`` for the key."""
    z = (seed_key(seed) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 32


def literal_weights(row: torch.Tensor, params: SamplingParams) -> list[int]:
    """Rules 2-4 on one row (temperature > 0), as the sampler's docstring states them."""
    x = row.to(torch.float32).unsqueeze(0)
    p = torch.softmax(x / torch.tensor([[params.temperature]], dtype=torch.float32), dim=-1)[0]
    q = [int(v) for v in (p * 2.0**WEIGHT_BITS).to(torch.int64).tolist()]
    if 0 < params.top_k < len(q):
        kth = sorted(q, reverse=True)[params.top_k - 1]
        q = [w if w >= kth else 0 for w in q]
    if params.top_p < 1.0 and round(params.top_p * 2**32) < 2**32:
        share = max(1, round(params.top_p * 2**32))
        threshold = max(1, share * sum(q) >> 32)
        before, kept = 0, set()
        for i in sorted(range(len(q)), key=lambda i: (-q[i], i)):
            if before < threshold:
                kept.add(i)
            before += q[i]
        q = [w if i in kept else 0 for i, w in enumerate(q)]
    return q


def literal_cut_margin(row: torch.Tensor, params: SamplingParams, claimed: int) -> float:
    """A token's distance from the top-k/top-p cut as the sampler's docstring defines it: the
    relative change of the weights under which rules 3-4 keep it; inf when they keep it
    (or it has no weight)."""
    if params.greedy or literal_weights(row, params)[claimed] > 0:
        return math.inf
    x = row.to(torch.float32).unsqueeze(0)
    p = torch.softmax(x / torch.tensor([[params.temperature]], dtype=torch.float32), dim=-1)[0]
    q = [int(v) for v in (p * 2.0**WEIGHT_BITS).to(torch.int32).tolist()]
    w, margin = q[claimed], 0.0
    if w == 0:
        return math.inf
    if 0 < params.top_k < len(q):
        kth = sorted(q, reverse=True)[params.top_k - 1]
        margin = kth / w - 1 if w < kth else 0.0
        q = [v if v >= kth or i == claimed else 0 for i, v in enumerate(q)]
    if round(params.top_p * 2**32) < 2**32:
        threshold = max(1, max(1, round(params.top_p * 2**32)) * sum(q) >> 32)
        ahead = sum(v for i, v in enumerate(q) if (v, -i) > (w, -claimed))
        margin = max(margin, (ahead + 1) / threshold - 1 if ahead >= threshold else 0.0)
    return margin if margin > 0 else math.inf


def literal_cut_pick_margin(row: torch.Tensor, params: SamplingParams, seed: bytes, position: int,
                            claimed: int) -> float:
    """The sampled margin of a token past the cut, as the sampler's docstring defines it: the
    least, over the kept sets a copy keeping it would use (the top-k with it beside or in place
    of the k-th; then the nucleus, extended to it if it falls past), of the noise point's
    distance from its interval."""
    x = row.to(torch.float32).unsqueeze(0)
    p = torch.softmax(x / torch.tensor([[params.temperature]], dtype=torch.float32), dim=-1)[0]
    q = [int(v) for v in (p * 2.0**WEIGHT_BITS).to(torch.int64).tolist()]
    order = sorted(range(len(q)), key=lambda i: (-q[i], i))
    bases = [set(range(len(q)))]
    if 0 < params.top_k < len(q):
        top = {i for i, w in enumerate(q) if w >= q[order[params.top_k - 1]]}
        bases = [top] if claimed in top else [top | {claimed}, top - {order[params.top_k - 1]} | {claimed}]
    margins = []
    for base in bases:
        kept = base
        if round(params.top_p * 2**32) < 2**32:
            threshold = max(1, max(1, round(params.top_p * 2**32)) * sum(q[i] for i in base) >> 32)
            before, kept = 0, set()
            for i in (i for i in order if i in base):
                if before < threshold:
                    kept.add(i)
                before += q[i]
            if claimed not in kept:
                kept = {i for i in base if (q[i], -i) > (q[claimed], -claimed)} | {claimed}
        weights = [w if i in kept else 0 for i, w in enumerate(q)]
        lo, hi, total = sum(weights[:claimed]), sum(weights[:claimed + 1]), sum(weights)
        t = splitmix_u32(seed, position) * total >> 32
        margins.append(0.0 if lo <= t < hi else (lo - t if t < lo else t - hi + 1) / total)
    return min(margins)


def literal_choice(row: torch.Tensor, params: SamplingParams, seed: bytes, position: int) -> int:
    """The sampler's rule on one row, step by step as its docstring states it."""
    if params.greedy:
        x = row.to(torch.float32)
        return int(torch.nonzero(x == x.max())[0])
    q = literal_weights(row, params)
    t = splitmix_u32(seed, position) * sum(q) >> 32
    total = 0
    for i, w in enumerate(q):
        total += w
        if total > t:
            return i
    raise AssertionError("t is below the total")


RULES = [
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, temperature=MIN_TEMPERATURE),
    SamplingParams(max_tokens=8, temperature=1.0),
    SamplingParams(max_tokens=8, temperature=0.7),
    SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9),
    SamplingParams(max_tokens=8, temperature=1.3, top_k=40),
    SamplingParams(max_tokens=8, temperature=1.0, top_k=5, top_p=0.8),
    SamplingParams(max_tokens=8, temperature=1.5, top_p=0.5),  # settled by 64 or 1024 candidates
    SamplingParams(max_tokens=8, temperature=2.0, top_p=0.99),  # nuclei of thousands of tokens
    SamplingParams(max_tokens=8, temperature=10.0, top_p=0.95),  # flat: the whole-row sort
    SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-9),  # keeps only the heaviest
]


def lm_like_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows shaped like a model's: a few strong tokens over a long, heavy-tailed rest,
    with exact ties (a greedy tie among them) to exercise the lowest-id rules."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, vocab, generator=g) * 2.0
    rows += torch.where(torch.rand(n, vocab, generator=g) < 0.002, 8.0, 0.0)
    rows[:, 7] = rows[:, 3] = rows.max(dim=1).values  # an exact tie at the top
    return rows


@pytest.mark.parametrize("vocab", [50, 3000, 5000])
def test_one_row_choice_is_the_literal_rule(vocab: int) -> None:
    rows = lm_like_logits(12, vocab, seed=vocab)
    for i, row in enumerate(rows):
        for j, params in enumerate(RULES):
            seed, position = f"req-{i}-{j}".encode(), 31 * i + j
            assert choose_token(row, params, seed, position) == literal_choice(row, params, seed, position)


def test_noise_is_splitmix64_over_the_whole_key_and_position_range() -> None:
    r = random.Random(5)
    seeds = [r.randbytes(16) for _ in range(400)]
    positions = [r.choice([0, 1, 2**31, 2**40]) + r.randrange(1000) for _ in seeds]
    bits = noise_bits(torch.tensor([seed_key(s) for s in seeds]), torch.tensor(positions))
    assert bits.tolist() == [splitmix_u32(s, p) for s, p in zip(seeds, positions, strict=True)]


def test_first_argmax_is_the_lowest_id_of_the_maximum() -> None:
    x = lm_like_logits(6, 5000, seed=1)
    x[1, 4990] = x[1, 4999] = 1e4  # the maximum only in the last, partial chunk
    x[2, :] = 0.0
    assert first_argmax(x).tolist() == [int(torch.nonzero(r == r.max())[0]) for r in x]


def batch_rules(n: int, rng: random.Random) -> list[tuple[SamplingParams, bytes, int]]:
    return [(rng.choice(RULES), rng.randbytes(8), rng.randrange(4096)) for _ in range(n)]


@pytest.mark.parametrize("vocab", [3000, 49152 + 17])
def test_a_mixed_batch_picks_each_rows_reference_token(vocab: int) -> None:
    rng = random.Random(vocab)
    rows = lm_like_logits(40, vocab, seed=vocab)
    rules = batch_rules(len(rows), rng)
    picked = sample_batch(rows, RowRules.of([(p, s) for p, s, _ in rules], vocab),
                          torch.tensor([pos for _, _, pos in rules]))
    expected = [choose_token(row, p, s, pos) for row, (p, s, pos) in zip(rows, rules, strict=True)]
    assert picked.tolist() == expected
    checks = [check_token(row, p, s, pos, t, tolerance=0.0)
              for row, (p, s, pos), t in zip(rows, rules, picked.tolist(), strict=True)]
    assert all(c.ok and c.exact and c.margin == 0.0 for c in checks)


def test_a_request_gets_the_same_token_in_any_batch_position_and_size() -> None:
    rng = random.Random(11)
    vocab = 5000
    own = lm_like_logits(1, vocab, seed=99)[0]
    for params in RULES:
        seed, position = b"the-request", 17
        alone = choose_token(own, params, seed, position)
        for size in (1, 2, 9, 33, 64):
            others = lm_like_logits(size, vocab, seed=size)
            others_rules = batch_rules(size, rng)
            at = rng.randrange(size)
            others[at] = own
            others_rules[at] = (params, seed, position)
            picked = sample_batch(others, RowRules.of([(p, s) for p, s, _ in others_rules], vocab),
                                  torch.tensor([pos for _, _, pos in others_rules]))
            assert int(picked[at]) == alone, (params, size, at)


def test_positions_and_seeds_move_the_choice_and_nothing_else_does() -> None:
    row = lm_like_logits(1, 3000, seed=4)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0)
    rules = RowRules.of([(params, b"s")] * 64, 3000)
    picks = sample_batch(row.expand(64, -1).contiguous(), rules, torch.arange(64)).tolist()
    assert picks == [choose_token(row, params, b"s", i) for i in range(64)]
    assert len(set(picks)) > 3
    again = sample_batch(row.expand(64, -1).contiguous(), RowRules.of([(params, b"t")] * 64, 3000),
                         torch.arange(64)).tolist()
    assert again != picks


@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_batch_on_the_accelerator_picks_the_cpu_reference_tokens(vocab: int, seed: int) -> None:
    """Where a GPU is at hand: the same rows sampled there give the CPU's tokens except at
    near-ties (the softmax may differ in a last bit), which the validator tolerates."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    rng = random.Random(seed)
    rows = lm_like_logits(256, vocab, seed=seed)
    rules = batch_rules(256, rng)
    row_rules = [(p, s) for p, s, _ in rules]
    positions = torch.tensor([pos for _, _, pos in rules])
    cpu = sample_batch(rows, RowRules.of(row_rules, vocab), positions)
    gpu = sample_batch(rows.cuda(), RowRules.of(row_rules, vocab, "cuda"), positions.cuda()).cpu()
    differ = (cpu != gpu).nonzero().view(-1).tolist()
    for i in differ:
        p, s, pos = rules[i]
        assert check_token(rows[i], p, s, pos, int(gpu[i]), tolerance=1e-5).ok
    # a near-tie is rare, and rarer the fewer CDF boundaries a row has: on an H200 (torch
    # 2.11) 0-2 of 256 rows differed at 49152 tokens and up to 4 at 151936
    assert len(differ) <= 256 * vocab // 49152 // 32


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
                                    SamplingParams(max_tokens=1, temperature=1.3, top_k=7),
                                    SamplingParams(max_tokens=1, temperature=1.0, top_k=20, top_p=0.8)],
                         ids=["nucleus", "top-k", "both"])
def test_every_tokens_distance_from_the_cut_is_the_literal_one(params: SamplingParams) -> None:
    """... and so is the sampled margin of every token past the cut, measured in a kept set
    holding it: a near-tie at the cut only where the noise picks it there too."""
    rows = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 2.5
    for position, row in enumerate(rows):
        claimed = torch.arange(row.numel())
        margins, _, cut = claim_margins(row.expand(row.numel(), -1), params, b"cut", claimed, position)
        literal = [literal_cut_margin(row, params, t) for t in range(row.numel())]
        assert cut.tolist() == literal
        assert any(math.isfinite(c) for c in literal) and any(math.isinf(c) for c in literal)
        past = [t for t, c in enumerate(literal) if math.isfinite(c)]
        assert [float(margins[t]) for t in past] == [
            literal_cut_pick_margin(row, params, b"cut", position + t, t) for t in past]
        assert any(0 < float(margins[t]) < math.inf for t in past)
