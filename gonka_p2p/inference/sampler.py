"""Reproducible sampling: the token at each position is a pure function of the
model's distribution there and 32 bits of public noise derived from (seed,
position), computed for a whole batch with tensor operations on the device
that holds the logits.

Why: a validator that recomputes the distribution teacher-forced can then
recompute which token an honest executor *had* to emit. This defeats the
pre-fill attack (a cheap model writes the text, the real model is only asked
for logprobs afterwards): the cheap model's tokens are not the ones the real
model's distribution and the public noise select. And the executor's engine
samples a batch of 256 in a few tensor passes, with no Python per request and
no copy of a logits row to the host.

Rule, per row (``logits`` are the model's float32 scores; inverse CDF in
token-id order over *integer* weights):

1. temperature 0: the token is ``argmax(logits)`` (lowest id on exact ties).
2. otherwise ``p = softmax(logits / temperature)`` in float32 and the weight
   of token i is the integer ``q_i = floor(p_i * 2**30)``.
3. top-k (``0 < k < vocab``): zero every weight below the k-th largest weight
   (ties at the k-th place are all kept).
4. top-p, with ``P = max(1, round(top_p * 2**32))`` (off when ``P = 2**32``):
   order tokens by (weight desc, id asc) and keep those whose exclusive prefix
   sum of weights is below ``max(1, floor(P * total / 2**32))`` (the heaviest
   token always stays), ``total`` being the sum of the weights left by 3.
5. noise: ``key`` = the seed's 8-byte BLAKE2b (person ``gonka-sample-v2``) as
   a big-endian int64, ``u`` = the top 32 bits of SplitMix64's
   output number ``position + 1`` for that key (one mix of ``key + (position
   + 1) * golden gamma``); ``t = floor(u * total / 2**32)`` with ``total``
   the sum of the weights left by 4.
6. the token is the first id whose inclusive prefix sum of weights exceeds ``t``.

Numerics. Everything after the softmax is integer arithmetic: prefix sums are
exact, so they do not depend on the order a device adds in (a GPU scan, a
CPU loop, a sum by chunks: all equal), nor on which rows share a batch. The
only floating-point steps are the division, the softmax and the scaling by a
power of two, all row-wise, so a row's weights are the same in a batch of 1
or 256 on one device (tests/test_sampler_batched.py). Across devices (CPU vs
GPU) the softmax may differ in the last bit of a probability; that moves a
CDF boundary by about 1e-7 of the mass, and the choice flips only when the
noise falls that close to it -- a near-tie, which the validator tolerates
(``check_token``'s ``tolerance``; its bound is orders of magnitude wider). A
weight is zero below 2**-30: no token under about one part in 10**9 is
ever drawn, and the drawn distribution is within ``vocab * 2**-30`` (1.4e-4
at 152k tokens, far less for a real model's tail) of ``p`` in total
variation. 30 bits keep every row's weights and sums in int32, which a CPU
converts and adds at float32's speed.

Properties the verification needs, and where they come from: the choice is a
pure function of (distribution, seed, position, parameters) (1-6 read
nothing else); the draw follows the processed distribution (u is uniform to
2**-32 and independent across positions: SplitMix64 is a bijective mixer of
a Weyl sequence); the executor cannot pick its noise (the seed is the
inference id, fixed before any token).

``check_token`` is the validator's side: it accepts the claimed token when it
is the rule's choice, or when numeric noise of size ``tolerance`` could have
flipped the choice to it (a near-tie), and reports the margin either way. A
token rules 3-4 cut has no interval in the validator's copy: it is measured at
the cut (how much the weights would have to move for the cut to keep it), and
accepted within ``cut_tolerance`` -- an executor whose copy of the model
differs in the last bits of bf16 puts a token just inside a nucleus that the
validator's copy ends just before -- *if* the noise picks it in a kept set
that holds it (the top-k with it beside or in place of the k-th, the nucleus
extended to it), within ``tolerance + cut_tolerance`` (:func:`is_near_tie`).
Without that second condition an executor could emit the token just past the
nucleus at any position where one lies within the cut tolerance, whatever the
noise said.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_KEY_PERSON = b"gonka-sample-v2"
WEIGHT_BITS = 30  # q_i = floor(p_i * 2**30): a row's weights sum below 2**31 (int32)
_CHUNK = 1024  # tokens per partial sum when locating the drawn token
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

# Below this, logits / temperature overflows float32 for ordinary logits: such a request is
# greedy in all but name, and its "sampling" would be whatever inf - inf makes of it.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """What the client asked for; exactly what the sampler and the validator apply."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    logprobs_k: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 32768:
            raise ValueError("max_tokens must be in 1..32768")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= 10.0):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 10]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 5 <= self.logprobs_k <= 20:
            raise ValueError("logprobs_k must be in 5..20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------
# Noise: int64 tensor arithmetic, wrapping like uint64 (two's complement)


def _signed(x: int) -> int:
    """The int64 with ``x``'s 64 bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def seed_key(seed: bytes) -> int:
    """The request's noise key (int64), hashed once per request, not per token."""
    digest = hashlib.blake2b(seed, digest_size=8, person=_KEY_PERSON).digest()
    return _signed(int.from_bytes(digest, "big"))


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def noise_bits(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``u`` of rule 5 for each row: int64 in ``[0, 2**32)``, on the tensors' device."""
    z = keys + (positions + 1) * _signed(_GAMMA)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return _shr(z ^ _shr(z, 31), 32)


def position_uniform(seed: bytes, position: int) -> float:
    """Rule 5's ``u / 2**32``: the uniform in [0, 1) that picks the token at ``position``."""
    bits = noise_bits(torch.tensor([seed_key(seed)]), torch.tensor([position]))
    return int(bits[0]) / 2.0**32


def _scale(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``floor(u * n / 2**32)`` exactly in int64 for ``0 <= u <= 2**32`` and
    ``0 <= n < 2**53`` (the product itself would overflow): split ``n`` at 2**26."""
    high, low = n >> 26, n & ((1 << 26) - 1)
    return (u * high + ((u * low) >> 26)) >> 6


# ---------------------------------------------------------------------------
# The rule over a batch


@dataclass(frozen=True)
class RowRules:
    """Each row's sampling parameters and noise key as tensors on the logits' device,
    plus what the host knows of them, so no device value decides which passes run."""

    temperature: torch.Tensor  # float32 [B]; 0 = greedy
    top_k: torch.Tensor  # int64 [B]; 0 = off
    top_p: torch.Tensor  # int64 [B]; round(top_p * 2**32), 2**32 = off
    keys: torch.Tensor  # int64 [B]
    sampled: torch.Tensor  # int64 indices of the rows with temperature > 0
    top_k_rows: tuple[int, ...]  # positions in ``sampled`` of the rows with top-k
    top_p_rows: tuple[int, ...]  # positions in ``sampled`` of the rows with top-p < 1
    max_top_k: int
    # the two tuples above on the device (None where empty), for a pass over the whole batch
    top_k_index: torch.Tensor | None
    top_p_index: torch.Tensor | None

    @classmethod
    def of(cls, rules: Sequence[tuple[SamplingParams, bytes]], vocab: int,
           device: torch.device | str = "cpu") -> RowRules:
        """The rows' rules from (params, seed) pairs, built once per batch change."""
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p, _ in rules]
        sampled = [i for i, (p, _) in enumerate(rules) if not p.greedy]
        top_p = [max(1, round(p.top_p * 2**32)) for p, _ in rules]
        top_k_rows = tuple(j for j, i in enumerate(sampled) if top_k[i])
        top_p_rows = tuple(j for j, i in enumerate(sampled) if top_p[i] < 2**32)
        return cls(
            temperature=tensor([p.temperature for p, _ in rules], torch.float32),
            top_k=tensor(top_k, torch.int64),
            top_p=tensor(top_p, torch.int64),
            keys=tensor([seed_key(s) for _, s in rules], torch.int64),
            sampled=tensor(sampled, torch.int64),
            top_k_rows=top_k_rows,
            top_p_rows=top_p_rows,
            max_top_k=max((top_k[i] for i in sampled), default=0),
            top_k_index=tensor(list(top_k_rows), torch.int64) if top_k_rows else None,
            top_p_index=tensor(list(top_p_rows), torch.int64) if top_p_rows else None,
        )

    @property
    def all_sampled(self) -> bool:
        return len(self.sampled) == len(self.temperature)


def _block_rows(device: torch.device) -> int | None:
    """Rows per pass over the weights: on a CPU, blocks whose float32 and int32
    temporaries stay in cache (1.5 MB at 49k tokens; measured ~2x faster at batch 256
    than the whole batch at once); a GPU takes the batch whole."""
    return 8 if device.type == "cpu" else None


def sample_batch(logits: torch.Tensor, rules: RowRules, positions: torch.Tensor) -> torch.Tensor:
    """The rule's token (int64 ``[B]``, on ``logits``' device) for every row of ``logits``
    ``[B, vocab]``, row i at ``positions[i]`` (int64 ``[B]``, same device)."""
    x = logits if logits.dtype == torch.float32 else logits.to(torch.float32)
    if len(rules.sampled) == 0:
        return first_argmax(x)
    # the greedy rows' picks; the sampled rows' entries are overwritten below
    tokens = torch.empty(len(x), dtype=torch.int64, device=x.device) if rules.all_sampled \
        else first_argmax(x)
    rows = x if rules.all_sampled else x.index_select(0, rules.sampled)
    u = noise_bits(rules.keys.index_select(0, rules.sampled),
                   positions.index_select(0, rules.sampled))
    block = _block_rows(x.device) or len(rows)
    picks = []
    for start in range(0, len(rows), block):
        q = token_weights(rows[start:start + block], rules, start)
        picks.append(_inverse_cdf(q, u[start:start + block]))
    return tokens.index_copy_(0, rules.sampled, torch.cat(picks))


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Rule 1 for every row of ``x`` ``[n, vocab]``: the lowest id holding the row's maximum.
    ``torch.argmax`` is one scalar pass on a CPU, ~6x slower than the vectorised maxima
    of chunks this takes first (then an argmax inside the one chunk that holds it)."""
    n, vocab = x.shape
    whole = vocab - vocab % _CHUNK
    if whole == 0:
        return torch.argmax(x, dim=-1)
    maxima = [x[:, :whole].view(n, -1, _CHUNK).amax(dim=-1)]
    if whole < vocab:
        maxima.append(x[:, whole:].amax(dim=-1, keepdim=True))
    maxima = torch.cat(maxima, dim=1)
    chunk = torch.argmax(maxima, dim=-1, keepdim=True)  # the first chunk holding the maximum
    ids = chunk * _CHUNK + torch.arange(_CHUNK, device=x.device)
    inside = x.gather(1, ids.clamp(max=vocab - 1)).masked_fill_(ids >= vocab, float("-inf"))
    return (chunk * _CHUNK + torch.argmax(inside, dim=-1, keepdim=True)).squeeze(1)


def _weights(rows: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Rule 2: the int32 weights ``floor(softmax(rows / temperature) * 2**WEIGHT_BITS)``."""
    return torch.softmax(rows / temperature, dim=-1).mul_(2.0**WEIGHT_BITS).to(torch.int32)


def token_weights(rows: torch.Tensor, rules: RowRules, first: int = 0) -> torch.Tensor:
    """Rules 2-4: the int32 weights of ``rows`` ``[n, vocab]`` (float32), which are the
    sampled rows ``first .. first + n`` of ``rules`` (positions in ``rules.sampled``)."""
    at = rules.sampled[first:first + len(rows)]
    temperature = rules.temperature.index_select(0, at).unsqueeze(1)
    q = _weights(rows, temperature)
    k_rows = _local(rules.top_k_rows, rules.top_k_index, first, len(rows))
    if k_rows is not None:
        k = rules.top_k.index_select(0, at.index_select(0, k_rows)).unsqueeze(1)
        sub = q.index_select(0, k_rows)
        kth = torch.topk(sub, min(rules.max_top_k, q.shape[1]), dim=-1).values.gather(1, k - 1)
        q.index_copy_(0, k_rows, sub.masked_fill_(sub < kth, 0))
    p_rows = _local(rules.top_p_rows, rules.top_p_index, first, len(rows))
    if p_rows is not None:
        sub = q.index_select(0, p_rows)
        share = rules.top_p.index_select(0, at.index_select(0, p_rows))
        total = sub.sum(dim=-1, dtype=torch.int64)
        threshold = _scale(share, total).clamp_min_(1)  # the heaviest token always stays
        q.index_copy_(0, p_rows, sub.masked_fill_(~nucleus_mask(sub, threshold), 0))
    return q


def _local(rows: tuple[int, ...], index: torch.Tensor | None, first: int, n: int) -> torch.Tensor | None:
    """The sorted ``rows`` inside ``first .. first + n``, relative to ``first``; None if none.
    ``index`` is ``rows`` on the device: a block holding them all (a GPU's whole batch) takes
    it as it is, with no host-to-device copy per step."""
    if first == 0 and (not rows or rows[-1] < n):
        return index
    inside = rows[bisect.bisect_left(rows, first):bisect.bisect_left(rows, first + n)]
    return torch.tensor([i - first for i in inside], device=index.device) if inside else None


def _inverse_cdf(q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rules 5-6 over int32 weights ``q`` ``[n, vocab]`` and noise ``u`` ``[n]``: find the
    chunk of ``_CHUNK`` tokens holding ``t`` from chunk sums, then the token inside it by
    a prefix sum of that chunk only (exact integers: the same as a whole-row prefix sum)."""
    n, vocab = q.shape
    whole = vocab - vocab % _CHUNK
    sums = [q[:, :whole].view(n, -1, _CHUNK).sum(dim=-1, dtype=torch.int32)]
    if whole < vocab:
        sums.append(q[:, whole:].sum(dim=-1, keepdim=True, dtype=torch.int32))
    ends = torch.cumsum(torch.cat(sums, dim=1), dim=-1, dtype=torch.int64)
    t = _scale(u, ends[:, -1]).unsqueeze(1)
    chunk = torch.searchsorted(ends, t, right=True).clamp_(max=ends.shape[1] - 1)
    before = torch.where(chunk > 0, ends.gather(1, (chunk - 1).clamp_min(0)), 0)
    ids = chunk * _CHUNK + torch.arange(_CHUNK, device=q.device)
    inside = q.gather(1, ids.clamp(max=vocab - 1)).masked_fill_(ids >= vocab, 0)
    offset = torch.searchsorted(torch.cumsum(inside, dim=-1, dtype=torch.int64) + before, t, right=True)
    return (chunk * _CHUNK + offset).squeeze(1).clamp_(max=vocab - 1)


def nucleus_tiers(device: torch.device) -> tuple[int, ...]:
    """Candidate counts ``nucleus_mask`` tries in turn on ``device``. A CPU pays per element:
    a top-64 is a fraction of a top-1024, and the few rows it leaves go on alone. A GPU pays
    per kernel and per wait for the host: on an H200, top-p over a batch of 64 or 256 real
    rows took 225 kernels, 13 synchronisations and 4.3-5.9 ms with the CPU's tiers and row
    picking, and 127 kernels, 1 synchronisation and 2.4-3.1 ms with one tier over every row,
    the same tokens (``benchmarks/sampler_profile.py``; the device was busy 0.4-1.9 ms)."""
    return (64, 1024) if device.type == "cpu" else (1024,)


def nucleus_mask(q: torch.Tensor, threshold: torch.Tensor,
                 tiers: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rule 4's kept tokens per row of int32 weights ``q`` ``[n, vocab]``: in (weight desc,
    id asc) order, those whose exclusive prefix sum is below ``threshold[i]``.

    A full sort of the vocabulary is the rule's hot spot, so it is first evaluated
    on the m heaviest tokens, m from ``tiers`` (default: ``nucleus_tiers``) in turn; that
    answer is exact when the cut falls strictly above the smallest candidate's weight
    (every token outside the candidates then weighs less than the cut). The first tier
    takes every row; a later one only the rows still unsettled; rows no tier settles are
    sorted whole. Integer prefix sums are exact, so every path gives the same set and a
    row's set does not depend on the other rows.
    """
    mask = torch.zeros_like(q, dtype=torch.bool)
    rows: torch.Tensor | None = None  # the unsettled rows; None: every row
    for m in (m for m in (nucleus_tiers(q.device) if tiers is None else tiers) if m < q.shape[1]):
        sub, bound = (q, threshold) if rows is None else (q.index_select(0, rows), threshold.index_select(0, rows))
        values, ids = torch.topk(sub, m, dim=-1)
        by_id = torch.argsort(ids, dim=-1)  # then a stable sort by weight keeps ids ascending on ties
        ids, values = ids.gather(-1, by_id), values.gather(-1, by_id)
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices
        ids, values = ids.gather(-1, order), values.gather(-1, order)
        kept = torch.cumsum(values, dim=-1, dtype=torch.int64) - values < bound.unsqueeze(1)
        cut = kept.sum(dim=-1, keepdim=True) - 1
        settled = (cut < m - 1) & (values.gather(-1, cut) > values[:, m - 1:])
        if rows is None:
            mask.scatter_(1, ids, kept & settled)
        else:  # an unsettled row's entries stay False here: a later pass writes them
            mask[rows.unsqueeze(1), ids] = kept & settled
        left = ~settled.view(-1)
        if not bool(left.any()):  # the pass's one wait for the device
            return mask
        rows = left.nonzero().view(-1) if rows is None else rows[left]
    rest = torch.arange(q.shape[0], device=q.device) if rows is None else rows
    values, ids = torch.sort(q.index_select(0, rest), dim=-1, descending=True, stable=True)
    before = torch.cumsum(values, dim=-1, dtype=torch.int64) - values
    kept = before < threshold.index_select(0, rest).unsqueeze(1)
    mask[rest] = torch.zeros_like(kept).scatter(-1, ids, kept)
    return mask


def choose_token(logits: torch.Tensor, params: SamplingParams, seed: bytes, position: int) -> int:
    """The token an honest executor emits at ``position`` given the raw ``logits`` row:
    ``sample_batch`` on a batch of one."""
    rules = RowRules.of([(params, seed)], logits.shape[-1], logits.device)
    positions = torch.tensor([position], device=logits.device)
    return int(sample_batch(logits.reshape(1, -1), rules, positions)[0])


# ---------------------------------------------------------------------------
# The validator's side


@dataclass(frozen=True)
class TokenCheck:
    """Whether a claimed token is what the rule picks, and by how much it missed."""

    ok: bool
    exact: bool
    margin: float  # greedy: nats below the max; sampled: CDF distance from the token's interval
    cut: float = float("inf")  # a token top-k/top-p cut: relative distance from the cut; inf: kept


def claim_margins(
    logits: torch.Tensor,
    params: SamplingParams,
    seed: bytes,
    claimed: torch.Tensor,
    first_position: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``check_token``'s margin (float64), exactness (bool) and cut margin (float64: for a
    token rules 3-4 cut, how far outside the cut it lies, :func:`_filter_margins`; inf for
    any other) for every row of ``logits`` ``[n, vocab]``, row i being position
    ``first_position + i`` and claiming ``claimed[i]`` (in the vocabulary). The weights
    are ``sample_batch``'s (rows in blocks on a CPU, as there), so an exact pick is
    exactly ``choose_token``'s."""
    assert logits.dim() == 2 and claimed.shape == (logits.shape[0],) and len(claimed) > 0
    assert bool(((claimed >= 0) & (claimed < logits.shape[1])).all())
    x = logits.to(torch.float32)
    at = claimed.to(x.device).unsqueeze(1)
    if params.greedy:
        scores = x.to(torch.float64)  # log_softmax's shift cancels in the difference
        best = first_argmax(x).unsqueeze(1)
        margin = (scores.gather(1, best) - scores.gather(1, at)).squeeze(1)
        return margin, (best == at).squeeze(1), torch.full_like(margin, float("inf"))
    n = len(claimed)
    rules = RowRules.of([(params, seed)] * n, x.shape[1], x.device)
    u = noise_bits(rules.keys, torch.arange(first_position, first_position + n, device=x.device))
    block = _block_rows(x.device) or n
    cdf = torch.cat([torch.cumsum(token_weights(x[i:i + block], rules, i), dim=-1, dtype=torch.int64)
                     for i in range(0, n, block)])
    total = cdf[:, -1]
    t = _scale(u, total)
    hi = cdf.gather(1, at).squeeze(1)
    lo = torch.where(at.squeeze(1) > 0, cdf.gather(1, (at - 1).clamp_min(0)).squeeze(1), 0)
    inside = (lo <= t) & (t < hi)
    miss = torch.where(t < lo, lo - t, t - hi + 1)  # >= 1 outside the interval
    margins = torch.where(inside, 0, miss).to(torch.float64) / total.to(torch.float64)
    excluded = hi <= lo  # zero weight: no amount of noise at a CDF boundary makes it a choice
    cut = torch.full_like(margins, float("inf"))
    margins = margins.masked_fill(excluded, float("inf"))
    if bool(excluded.any()):  # only those rows: a whole-vocabulary pass per row
        rows = excluded.nonzero().view(-1)
        x_cut, claimed_cut = x.index_select(0, rows), claimed.index_select(0, rows)
        cut_rows = _filter_margins(x_cut, params, claimed_cut)
        cut.index_copy_(0, rows, cut_rows)
        at_cut = cut_rows < float("inf")  # weighed, and left out by the cut alone
        if bool(at_cut.any()):
            picks = at_cut.nonzero().view(-1)
            margins.index_copy_(0, rows[picks], _cut_pick_margins(
                x_cut.index_select(0, picks), params, u.index_select(0, rows[picks]),
                claimed_cut.index_select(0, picks)).to(margins.device))
    return margins, inside & ~excluded, cut


def _cut_pick_margins(x: torch.Tensor, params: SamplingParams, u: torch.Tensor, claimed: torch.Tensor,
                      ) -> torch.Tensor:
    """``[n]`` float64 for tokens rules 3-4 leave out: the CDF margin of the noise point ``u``
    (``[n]``, rule 5's bits) from the token's interval in a kept set that a copy of the model
    keeping the token would have used (:func:`_kept_with`; the least over those sets).

    Why: a token just past the cut is a near-tie only if the noise picks it there too. An
    honest executor whose copy keeps it emits it only when ``u`` falls in its interval; a
    validator that asked only how far past the cut it lies let an executor emit the token
    just past the nucleus at every position, whatever the noise said."""
    q = _weights(x, params.temperature).to(torch.int64)
    ids = torch.arange(q.shape[1], device=q.device)
    return torch.tensor([min(_interval_margin(row * keep, c, u[i:i + 1]) for keep in _kept_with(row, params, c, ids))
                         for i, (row, c) in enumerate(zip(q, claimed.tolist(), strict=True))],
                        dtype=torch.float64)


def _kept_with(row: torch.Tensor, params: SamplingParams, claimed: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """The kept sets (bool ``[vocab]``) rules 3-4 give ``row`` (int64 weights) when a copy of the
    model keeps ``claimed``: the top-k with it beside, or in place of, the k-th (weight desc,
    id asc), then the nucleus of what is left, extended to it when it falls past the nucleus."""
    one = ids == claimed
    bases = [torch.ones_like(one)]
    if 0 < params.top_k < len(row):
        order = torch.sort(row, descending=True, stable=True).indices
        top = row >= row[order[params.top_k - 1]]
        bases = [top] if bool(top[claimed]) else [top | one, (top & (ids != order[params.top_k - 1])) | one]
    p_scaled = max(1, round(params.top_p * 2**32))
    if p_scaled >= 2**32:
        return bases
    kept = []
    for base in bases:
        sub = row * base
        threshold = _scale(torch.tensor([p_scaled], device=row.device), sub.sum().view(1)).clamp_min_(1)
        values, order = torch.sort(sub, descending=True, stable=True)
        nucleus = torch.zeros_like(one).scatter(0, order, torch.cumsum(values, 0) - values < threshold) & base
        if not bool(nucleus[claimed]):
            w = row[claimed]
            nucleus = (base & ((row > w) | ((row == w) & (ids < claimed)))) | one
        kept.append(nucleus)
    return kept


def _interval_margin(weights: torch.Tensor, claimed: int, u: torch.Tensor) -> float:
    """Rule 5's CDF distance (a share of the total) of the noise point ``u`` from ``claimed``'s
    interval under the int64 ``weights``, 0 inside: ``claim_margins``' margin for one row."""
    cdf = torch.cumsum(weights, 0)
    total = int(cdf[-1])
    t = int(_scale(u, cdf[-1:])[0])
    lo, hi = (int(cdf[claimed - 1]) if claimed else 0), int(cdf[claimed])
    return 0.0 if lo <= t < hi else (lo - t if t < lo else t - hi + 1) / total


def _filter_margins(logits: torch.Tensor, params: SamplingParams, claimed: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 for the claimed tokens of the rows of ``logits`` (a sampled request): the
    least relative change of the weights under which rules 3-4 keep the token --
    ``kth / w - 1`` below the top-k's k-th weight, ``(ahead + 1) / threshold - 1`` past the
    nucleus (``ahead``: the weight rule 3 leaves on the tokens before it in (weight desc,
    id asc) order), the larger when both cut it; inf for a token without weight, or one
    both keep.

    Why this unit: an executor's copy of the model that differs by ``e`` nats on each
    logprob scales every weight by ``exp(+-e / T)``, so any ratio of two weights, or of two
    sums of weights, by at most ``exp(2 e / T)``: a token within ``expm1(2 e / T)`` of the
    cut may have been kept there -- a near-tie at the cut, the same unit as the tolerance
    ``check_token`` gives a CDF boundary (``verification_params.cut_tolerance``)."""
    q = _weights(logits.to(torch.float32), params.temperature).to(torch.int64)
    at = claimed.to(q.device).unsqueeze(1)
    w = q.gather(1, at)
    margin = torch.zeros(len(q), dtype=torch.float64, device=q.device)
    if 0 < params.top_k < q.shape[1]:
        kth = torch.topk(q, params.top_k, dim=-1).values[:, -1:]
        margin = torch.where(w < kth, kth.double() / w.clamp_min(1).double() - 1.0, 0.0).squeeze(1)
        q = q.masked_fill(q < kth, 0).scatter_(1, at, w)  # the rest of the rule as if it were kept
    p_scaled = max(1, round(params.top_p * 2**32))
    if p_scaled < 2**32:
        threshold = _scale(torch.full_like(w, p_scaled), q.sum(dim=-1, keepdim=True)).clamp_min_(1)
        ids = torch.arange(q.shape[1], device=q.device)
        ahead = ((q > w) | ((q == w) & (ids < at))).to(torch.int64).mul_(q).sum(dim=-1, keepdim=True)
        past = torch.where(ahead >= threshold, (ahead + 1).double() / threshold.double() - 1.0, 0.0).squeeze(1)
        margin = torch.maximum(margin, past)
    return torch.where((w.squeeze(1) > 0) & (margin > 0), margin, float("inf"))


def check_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seed: bytes,
    position: int,
    claimed: int,
    tolerance: float,
    cut_tolerance: float = 0.0,
) -> TokenCheck:
    """Validator side of ``choose_token``: accept exact picks, near-ties within ``tolerance``
    of a CDF boundary, and tokens cut by top-k or top-p within ``cut_tolerance`` of the cut
    that the noise picks in a kept set holding them (:func:`is_near_tie`)."""
    if not 0 <= claimed < logits.numel():
        return TokenCheck(ok=False, exact=False, margin=float("inf"), cut=float("inf"))
    margins, exact, cut = claim_margins(logits.reshape(1, -1), params, seed, torch.tensor([claimed]), position)
    margin, cut_margin = float(margins[0]), float(cut[0])
    return TokenCheck(ok=is_near_tie(margin, cut_margin, tolerance, cut_tolerance), exact=bool(exact[0]),
                      margin=margin, cut=cut_margin)


def is_near_tie(margin: float, cut: float, tolerance: float, cut_tolerance: float) -> bool:
    """Whether a claimed token with ``claim_margins``' ``margin`` and ``cut`` is one honest noise
    could have made the pick. A token the cut keeps (``cut`` inf): within ``tolerance`` of its
    CDF interval. A token past the cut: within ``cut_tolerance`` of the cut, *and* the noise
    within ``tolerance + cut_tolerance`` of its interval in a kept set holding it -- the
    second term because the sets a copy could keep differ from the validator's by tokens
    whose weight, together, the cut tolerance bounds."""
    if cut == math.inf:
        return margin <= tolerance
    return cut <= cut_tolerance and margin <= tolerance + cut_tolerance
