"""Judging from the serving engine's own evidence: the top-K logprobs of one prefill.

Why: the sampler check needs, at every position, where the noise point falls
in the model's distribution, and until now the validator held full logits
rows for it -- which vLLM cannot return cheaply, so a second, fp32 copy of the
model was loaded beside the serving engine. Here the evidence is what vLLM's
``prompt_logprobs`` returns from the engine that already holds the model: per
position the claimed token's exact logprob and the ``EVIDENCE_TOP_K`` largest
(id, logprob) pairs. What it leaves unknown is the tail: how the remaining
mass ``1 - sum(top-K)`` is spread over the other ids.

Theory of operation. Every quantity a rule compares is bounded over *every*
tail consistent with the evidence (each tail token at most as likely as the
K-th, together exactly the missing mass):

* distance and top-k: an id the executor lists that is not in the top-K has
  a recomputed logprob somewhere below the K-th one -- its error is bounded
  below by ``claimed - lp_K`` and unbounded above.
* sampling (``sampler`` rules 2-6): the inverse CDF runs in token-id order,
  so the claimed token's interval starts after the tail mass with smaller
  ids, which is bounded by the missing mass and by ``(number of tail ids
  below) x (the K-th weight)``; at a temperature other than 1 the tail's
  total itself is bounded by its most concentrated and its most spread
  arrangement (a sum of convex or concave powers is extreme there). With
  top-k below K, or a top-p nucleus that provably ends inside the top-K, the
  kept set is known and the interval is exact -- or nearly: away from T = 1
  the open tail total leaves the top-p threshold open too, so a few tokens at
  the cut (the *band*) may or may not be kept, and the interval is bounded
  over each nucleus the band allows (before, such a row was left open whole:
  5 of 6 honest SmolLM2 outputs at T = 0.7, top-p 0.9 needed the second pass
  for it). Integer weights round each boundary by at most one unit per token
  before it; that and float32 logprobs widen every bound (``_slack``).

So each rule gets a floor (the most favourable tail for the executor) and a
ceiling (the least favourable). A rule *fails* when its floor fails -- a
proven failure, the same as the full-row reference gives -- and a position is
*undecidable* when a floor passes but a ceiling does not. Greedy positions
are always decided (the argmax and the claimed logprob are both known).

Undecidable positions are counted and bounded; an output that keeps any
within the bound is resolved by a second prefill in the same engine that
lists the whole vocabulary (``full_rows``; slow, ~10 ms a position through
vLLM's output processor on a 49k vocabulary, so only for such outputs: plain
or wide sampling over a flat tail; ``served_check``). Never by a second model in the
participant's process (the torch engine stays a cross-check tool, out of
process). For an honest executor a position can only be undecidable when the
noise point falls outside every top-K token's *certain* interval (the part
of its interval that is its in every consistent tail), so
``honest_undecidable`` -- the sum over positions of that uncovered share,
computed from the top-K alone before the claimed token is looked at -- bounds
the expected count given the prefix. ``verification.check_undecidable``
fails an output whose count exceeds it beyond what chance allows (a
supermartingale bound, false alarm <= 1e-6 per output).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.inference.sampler import WEIGHT_BITS, SamplingParams, position_uniform

# Evidence the validator asks the engine for: top-K (id, logprob) per position. vLLM's
# max_logprobs is raised to it. At 1024 on SmolLM2 the missing mass beyond the top-K is
# small enough that sampled positions at T = 1 are mostly decided (benchmarks/validation_bench.py).
EVIDENCE_TOP_K = 1024
_FLOAT_SLACK = 4e-6  # float32 logprobs vs the float32 softmax the sampler runs: a few ulps of mass
_TIE = 1e-6  # relative gap under which a top-k or top-p cut is a tie the evidence cannot order
_UNIT = 2.0 ** -WEIGHT_BITS
UNDECIDABLE_FALSE_ALARM = 1e-6  # probability per output that rule 6 fails an honest executor
_LAMBDAS = (0.5, 1.0, 2.0, 4.0, 8.0)  # small lambdas test a large mu, large ones a mu near 0


def full_rows(steps: Sequence[TokenStep], vocab_size: int) -> torch.Tensor:
    """``[n, vocab]`` logprob rows from evidence that lists the whole vocabulary (an id
    missing from it is impossible: -inf). Logprobs are logits shifted by a constant, so
    the sampler and the metric take them as logits rows (the reference path)."""
    rows = torch.full((len(steps), vocab_size), -math.inf, dtype=torch.float32)
    ids = torch.tensor([s.top_ids for s in steps], dtype=torch.long)
    return rows.scatter_(1, ids, torch.tensor([s.top_logprobs for s in steps], dtype=torch.float32))


def too_many_undecidable(count: int, mu: float) -> bool:
    """Rule 6: ``count`` undecidable positions where honest work expects at most ``mu``.

    Given the prefix, an honest position is undecidable with probability at most its
    ``h_i`` (``mu`` is their sum), so for any fixed lambda ``exp(lambda U - (e^lambda - 1)
    mu)`` is a supermartingale over positions and, by Ville's inequality, exceeds
    ``len(_LAMBDAS) / UNDECIDABLE_FALSE_ALARM`` with probability at most
    ``UNDECIDABLE_FALSE_ALARM / len(_LAMBDAS)``; a union over ``_LAMBDAS`` keeps the total.
    Where ``mu`` ~ 0 (greedy; top-k or a nucleus inside the top-K) two undecidable
    positions fail; at ``mu`` = 10, about 33."""
    budget = math.log(len(_LAMBDAS) / UNDECIDABLE_FALSE_ALARM)
    return any(lam * count - math.expm1(lam) * mu >= budget for lam in _LAMBDAS)


def top_k_measurements(claim: Sequence[TokenStep], evidence: Sequence[TokenStep], params: SamplingParams,
                       seed: bytes, vocab_size: int) -> dict[str, Any]:
    """``verification.Measurements``' comparison fields for the executor's ``claim`` from
    the validator's top-K ``evidence``: floors where the reference has exact values,
    ceilings beside them, and the honest undecidable bound."""
    ids = torch.tensor([(s.token_id, *s.top_ids) for s in claim], dtype=torch.long)
    claimed = torch.tensor([(s.logprob, *s.top_logprobs) for s in claim], dtype=torch.float64)
    b = bounds(ids, claimed, list(evidence), params, seed, vocab_size)
    return dict(
        position_errors=tuple(b.errors_floor.mean(dim=1).tolist()),
        max_error=float(b.errors_floor.max()),
        top_k_shortfall=tuple(b.shortfall_floor.tolist()),
        sampling_margins=tuple(b.margin_floor.tolist()),
        error_ceilings=tuple(b.errors_ceiling.max(dim=1).values.tolist()),
        top_k_ceilings=tuple(b.shortfall_ceiling.tolist()),
        sampling_ceilings=tuple(b.margin_ceiling.tolist()),
        honest_undecidable=float(b.honest_undecidable.sum()),
        cut_margins=tuple(b.cut_floor.tolist()),
        cut_ceilings=tuple(b.cut_ceiling.tolist()),
    )


@dataclass(frozen=True)
class Bounds:
    """Floors and ceilings of every measured quantity, per position (float64 tensors)."""

    errors_floor: torch.Tensor  # [n, 1 + k] |claimed - recomputed| logprob, nats
    errors_ceiling: torch.Tensor  # [n, 1 + k]; inf for an id outside the top-K
    shortfall_floor: torch.Tensor  # [n] nats below the recomputed k-th logprob
    shortfall_ceiling: torch.Tensor  # [n]
    margin_floor: torch.Tensor  # [n] check_token's margin, CDF units (greedy: nats)
    margin_ceiling: torch.Tensor  # [n]
    honest_undecidable: torch.Tensor  # [n] bound on P(undecidable | honest, prefix)
    cut_floor: torch.Tensor  # [n] a cut token's distance from the cut (sampler's unit); inf: kept
    cut_ceiling: torch.Tensor  # [n]


def evidence_tensors(steps: list[TokenStep]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids [n, K] long, top logprobs [n, K] float64, claimed ids [n], claimed logprobs [n])."""
    ids = torch.tensor([s.top_ids for s in steps], dtype=torch.long)
    lps = torch.tensor([s.top_logprobs for s in steps], dtype=torch.float64)
    claimed = torch.tensor([s.token_id for s in steps], dtype=torch.long)
    claimed_lp = torch.tensor([s.logprob for s in steps], dtype=torch.float64)
    return ids, lps, claimed, claimed_lp


def distance_bounds(artifact_ids: torch.Tensor, artifact_lps: torch.Tensor, ids: torch.Tensor,
                    lps: torch.Tensor, claimed_lp: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(error floor, error ceiling) ``[n, 1 + k]`` and (shortfall floor, shortfall ceiling)
    ``[n]`` for the artifact's (chosen, top-k) ids and logprobs, column 0 the chosen token,
    whose recomputed logprob ``claimed_lp`` the evidence always holds. Any other id outside
    the top-K ``ids`` has a recomputed logprob somewhere below the K-th."""
    found = artifact_ids.unsqueeze(2) == ids.unsqueeze(1)  # [n, 1 + k, K]
    known = found.any(dim=2)
    value = lps.gather(1, found.to(torch.uint8).argmax(dim=2))  # the (only) match, when known
    known[:, 0], value[:, 0] = True, claimed_lp
    lp_last = lps.min(dim=1, keepdim=True).values
    exact = (artifact_lps - value).abs()
    floor = torch.where(known, exact, (artifact_lps - lp_last).clamp_min(0.0))
    ceiling = torch.where(known, exact, math.inf)
    kth = lps.topk(k, dim=1).values[:, -1:]
    gap = torch.where(known, kth - value, kth - lp_last)[:, 1:].clamp_min(0.0)
    gap_ceiling = torch.where(known[:, 1:], gap, math.inf)
    return floor, ceiling, gap.max(dim=1).values, gap_ceiling.max(dim=1).values


def bounds(artifact_ids: torch.Tensor, artifact_lps: torch.Tensor, steps: list[TokenStep],
           params: SamplingParams, seed: bytes, vocab_size: int) -> Bounds:
    """Every rule's floors and ceilings from the top-K evidence ``steps`` (one per claimed
    position, ``top_ids`` of at least ``params.logprobs_k``) for the artifact's
    (chosen, top-k) ids and logprobs ``[n, 1 + k]``."""
    ids, lps, claimed, claimed_lp = evidence_tensors(steps)
    distance = distance_bounds(artifact_ids, artifact_lps, ids, lps, claimed_lp, params.logprobs_k)
    if params.greedy:
        margin = torch.maximum(lps.max(dim=1).values, claimed_lp) - claimed_lp
        never = torch.full_like(margin, math.inf)
        margins = (margin, margin, torch.zeros_like(margin), never, never)
    else:
        u = torch.tensor([position_uniform(seed, i) for i in range(len(steps))], dtype=torch.float64)
        margins = _sampling_bounds(ids, lps, claimed, claimed_lp, u, params, vocab_size)
    return Bounds(*distance, *margins)


# ---------------------------------------------------------------------------
# The sampling rule's bounds


@dataclass(frozen=True)
class _Rows:
    """One row per position of the known tokens (the top-K, then the claimed token when it is
    not among them), at the request's temperature, in units of the heaviest token's weight."""

    ids: torch.Tensor  # [n, K + 1] long
    weight: torch.Tensor  # [n, K + 1] float64; 0 on the duplicate claimed column
    known: torch.Tensor  # [n, K + 1] bool
    cap: torch.Tensor  # [n] the weight no tail token exceeds (the K-th known one's)
    tail_min: torch.Tensor  # [n] total tail weight, its least and greatest value
    tail_max: torch.Tensor
    n_tail: torch.Tensor  # [n] how many ids are in the tail


def _rows(ids: torch.Tensor, lps: torch.Tensor, extra_ids: torch.Tensor, extra_lp: torch.Tensor,
          extra_known: torch.Tensor, temperature: float, vocab_size: int) -> _Rows:
    all_ids = torch.cat([ids, extra_ids.unsqueeze(1)], 1)
    all_lp = torch.cat([lps, extra_lp.unsqueeze(1)], 1)
    known = torch.cat([torch.ones_like(ids, dtype=torch.bool), extra_known.unsqueeze(1)], 1)
    top = lps.max(dim=1, keepdim=True).values
    weight = torch.where(known, torch.exp((all_lp - top) / temperature), 0.0)
    last = lps.min(dim=1).values
    missing = (1.0 - torch.where(known, all_lp.exp(), 0.0).sum(dim=1)).clamp_min(0.0)
    n_tail = vocab_size - known.sum(dim=1)

    def at_t(raw: torch.Tensor) -> torch.Tensor:  # a raw probability's weight at the temperature
        return torch.where(raw > 0, torch.exp((raw.clamp_min(1e-300).log() - top[:, 0]) / temperature), 0.0)

    cap_raw = last.exp()
    extremes = []
    for mass in ((missing - 1e-6).clamp_min(0.0), missing + 1e-6):
        full = torch.floor(mass / cap_raw)
        concentrated = full * at_t(cap_raw) + at_t(mass - full * cap_raw)
        spread = n_tail * at_t(mass / n_tail.clamp_min(1))
        extremes += [concentrated, spread]
    low, high = torch.stack(extremes[:2]).min(dim=0).values, torch.stack(extremes[2:]).max(dim=0).values
    return _Rows(all_ids, weight, known, at_t(cap_raw), low, high, n_tail)


def _interval(a: torch.Tensor, n_below: torch.Tensor, n_above: torch.Tensor, total: torch.Tensor,
              cap: torch.Tensor, r_min: torch.Tensor, r_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least and greatest ``(a + B) / (total + R)`` over tails of weight ``R`` in
    ``[r_min, r_max]`` with ``B`` of it on ids below the token (at most ``cap`` per id):
    ``B`` runs from ``max(0, R - n_above cap)`` to ``min(R, n_below cap)``. Each bound is
    monotone in ``R`` between its kinks, so the extremes are at the ends or the kink."""
    def over(kink: torch.Tensor, b_of: object) -> torch.Tensor:
        points = torch.stack([r_min, r_max, torch.minimum(torch.maximum(kink, r_min), r_max)])
        return (a + b_of(points)) / (total + points)

    least = over(n_above * cap, lambda r: (r - n_above * cap).clamp_min(0.0)).min(dim=0).values
    most = over(n_below * cap, lambda r: torch.minimum(r, n_below * cap)).max(dim=0).values
    return least, most


def _order_stats(rows: _Rows, token_ids: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each ``token_ids[i, j]``: the kept known weight on smaller ids, and how many tail
    ids lie below and above it (prefix sums over the known ids in id order: O(K log K))."""
    order = torch.argsort(rows.ids, dim=1)
    ids = rows.ids.gather(1, order).contiguous()
    weight = torch.cumsum((rows.weight * kept).gather(1, order), dim=1)
    known = torch.cumsum(rows.known.gather(1, order).to(torch.long), dim=1)
    below = torch.searchsorted(ids, token_ids.contiguous())  # how many known ids are smaller
    at = (below - 1).clamp_min(0)
    a = torch.where(below > 0, weight.gather(1, at), 0.0)
    n_below = token_ids - torch.where(below > 0, known.gather(1, at), 0)
    return a, n_below, rows.n_tail.unsqueeze(1) - n_below


@dataclass(frozen=True)
class _Cut:
    """What rules 3-4 keep of the known tokens, as far as the evidence tells.

    A top-p threshold is a share of the total weight, and away from T = 1 the tail's part
    of that total is open, so a few known tokens just past the surely kept ones (the
    *band*, in the order the nucleus takes them) may or may not be kept: the kept set is
    ``kept`` plus the first m band tokens, for some m from 0 to the band's size."""

    kept: torch.Tensor  # [n, K + 1] bool: surely kept
    band: torch.Tensor  # [n, B] long: columns of the band tokens in nucleus order; -1 past a row's band
    sure: torch.Tensor  # [n] bool: the kept set is one of those (else the whole row is open)
    tail_kept: bool  # no filter at all: every token is kept, the tail too


MAX_BAND = 32  # band tokens bounded nucleus by nucleus; a row with a wider band stays open


def _nucleus(rows: _Rows, params: SamplingParams, vocab_size: int, top_k_count: int) -> _Cut:
    """What the cut keeps of each row's known tokens (``_Cut``)."""
    k_on = 0 < params.top_k < vocab_size
    p_scaled = max(1, round(params.top_p * 2**32))
    n = len(rows.ids)
    no_band = torch.full((n, 0), -1, dtype=torch.long)
    if not k_on and p_scaled >= 2**32:
        return _Cut(rows.known.clone(), no_band, torch.ones(n, dtype=torch.bool), True)
    order = torch.argsort(rows.ids, dim=1)
    order = order.gather(1, torch.sort(rows.weight.gather(1, order), dim=1, descending=True, stable=True).indices)
    w = rows.weight.gather(1, order)
    sure = torch.ones(n, dtype=torch.bool)
    kept_sorted = torch.ones_like(w, dtype=torch.bool)
    band = no_band
    if k_on:
        if params.top_k >= top_k_count:  # the cut falls in the tail: unknown
            return _Cut(rows.known.clone(), no_band, torch.zeros(n, dtype=torch.bool), False)
        kth, next_ = w[:, params.top_k - 1], w[:, params.top_k]
        full_max = rows.weight.sum(dim=1) + rows.tail_max  # integer weights may tie: 2 units apart
        sure &= (kth - next_) / full_max > 2 * _UNIT + kth * _TIE
        kept_sorted[:, params.top_k:] = False
    if p_scaled < 2**32:
        share = p_scaled / 2**32
        kept_w = w * kept_sorted
        before = torch.cumsum(kept_w, dim=1) - kept_w
        total_lo = kept_w.sum(dim=1) + (0.0 if k_on else rows.tail_min)
        total_hi = kept_w.sum(dim=1) + (0.0 if k_on else rows.tail_max)
        low, high = (share * total_lo * (1 - _TIE)).unsqueeze(1), (share * total_hi * (1 + _TIE)).unsqueeze(1)
        in_nucleus = before < low
        in_nucleus[:, 0] = True  # the heaviest token always stays
        uncertain = kept_sorted & rows.known.gather(1, order) & (before >= low) & (before < high)
        uncertain[:, 0] = False
        band = _band(order, uncertain)
        sure &= uncertain.sum(dim=1) <= MAX_BAND
        if not k_on:  # a tail token's exclusive prefix is at least the whole known top-K
            sure &= rows.weight[:, :-1].sum(dim=1) >= high.squeeze(1)
        kept_sorted &= in_nucleus
    kept = torch.zeros_like(kept_sorted).scatter(1, order, kept_sorted) & rows.known
    return _Cut(kept, band, sure, False)


def _band(order: torch.Tensor, uncertain: torch.Tensor) -> torch.Tensor:
    """``[n, B]`` the columns (``order`` maps sorted places to columns) of each row's band
    -- ``uncertain`` in sorted places, one run, since exclusive prefix sums only grow --
    in nucleus order, -1 past its end; B is the widest band up to ``MAX_BAND``."""
    size = uncertain.sum(dim=1, keepdim=True)
    width = min(int(size.max()) if len(size) else 0, MAX_BAND)
    start = uncertain.to(torch.uint8).argmax(dim=1, keepdim=True)
    step = torch.arange(width).unsqueeze(0)
    columns = order.gather(1, (start + step).clamp(max=order.shape[1] - 1))
    return torch.where(step < size, columns, -1)


def _nuclei(rows: _Rows, cut: _Cut, token_ids: torch.Tensor, a: torch.Tensor
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each kept set ``cut`` allows (the surely kept, then one more band token at a
    time): the kept weight on ids below each of ``token_ids`` ``[n, m]`` (``a`` for the
    surely kept alone) and the kept total ``[n, 1]``."""
    total = (rows.weight * cut.kept).sum(dim=1, keepdim=True)
    yield a, total
    for place in range(cut.band.shape[1]):
        column = cut.band[:, place:place + 1]
        weight = torch.where(column >= 0, rows.weight.gather(1, column.clamp_min(0)), 0.0)
        a = a + weight * (rows.ids.gather(1, column.clamp_min(0)) < token_ids)
        total = total + weight
        yield a, total


def _slack(count: torch.Tensor | int, kept_mass: torch.Tensor, temperature: float) -> torch.Tensor:
    """How far integer rounding (one unit per weighed token, and the total) and float32
    logprobs can move a boundary, in CDF units of a kept mass ``kept_mass`` of the whole."""
    return (count + 2) * _UNIT / kept_mass + _FLOAT_SLACK / min(temperature, 1.0)


def _sampling_bounds(ids: torch.Tensor, lps: torch.Tensor, claimed: torch.Tensor, claimed_lp: torch.Tensor,
                     u: torch.Tensor, params: SamplingParams, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """(margin floor, margin ceiling, honest undecidable bound, cut floor, cut ceiling), each
    ``[n]``, for a sampled request: the reference margin is ``max(0, lo - x, x - hi)`` for the
    claimed token's interval ``[lo, hi)`` and the noise point ``x`` (``u``), in CDF units; a
    token the cut surely leaves out has no interval (margin inf) and is measured at the cut."""
    n, top_count = ids.shape
    t = params.temperature
    in_top = (ids == claimed.unsqueeze(1)).any(dim=1)
    rows = _rows(ids, lps, claimed, claimed_lp, ~in_top, t, vocab_size)
    cut = _nucleus(rows, params, vocab_size, top_count)
    kept, tail_kept = cut.kept, cut.tail_kept
    r_min = rows.tail_min if tail_kept else torch.zeros(n, dtype=torch.float64)
    r_max = rows.tail_max if tail_kept else torch.zeros(n, dtype=torch.float64)
    kept_w = (rows.weight * kept).sum(dim=1)
    full_max = rows.weight.sum(dim=1) + rows.tail_max
    weighed = kept.sum(dim=1) + (cut.band >= 0).sum(dim=1)  # every token a nucleus may hold
    count = torch.full((n,), float(vocab_size)) if tail_kept else weighed.double()
    slack = _slack(count, (kept_w + r_min) / full_max, t)

    weight_c = torch.where(in_top, (rows.weight[:, :-1] * (ids == claimed.unsqueeze(1))).sum(dim=1),
                           rows.weight[:, -1])
    kept_c = (kept & (rows.ids == claimed.unsqueeze(1)) & rows.known).any(dim=1) | (tail_kept & ~in_top)
    in_band = ((cut.band >= 0) & (rows.ids.gather(1, cut.band.clamp_min(0)) == claimed.unsqueeze(1))).any(dim=1)
    sure = cut.sure & ~in_band  # a claimed token the cut may keep or not: open (a whole-vocabulary pass decides)
    a, n_below, n_above = (x.squeeze(1) for x in _order_stats(rows, claimed.unsqueeze(1), kept))
    lo, hi = _Extremes(), _Extremes()
    for a_m, total in _nuclei(rows, cut, claimed.unsqueeze(1), a.unsqueeze(1)):
        lo.add(*_interval(a_m.squeeze(1), n_below, n_above, total.squeeze(1), rows.cap, r_min, r_max))
        hi.add(*_interval(a_m.squeeze(1) + weight_c, n_below, n_above, total.squeeze(1), rows.cap, r_min, r_max))
    floor = torch.stack([torch.zeros(n, dtype=torch.float64), lo.least - slack - u,
                         u - slack - hi.most - slack]).max(dim=0).values
    ceiling = torch.stack([torch.zeros(n, dtype=torch.float64), lo.most + slack - (u - slack),
                           u - (hi.least - slack)]).max(dim=0).values
    # a token with no weight (filtered out, or below one unit) is never a choice at a CDF boundary
    unit = _UNIT * (1 + _TIE)
    weightless = weight_c / (rows.weight.sum(dim=1) + rows.tail_min) < _UNIT * (1 - _TIE)
    # surely cut: measured at the cut, and in a kept set holding it, which only a whole-vocabulary
    # pass knows (its margin: floor 0, ceiling inf)
    left_out = sure & ~kept_c & ~weightless
    zero_maybe = weight_c / full_max < unit
    floor = torch.where(weightless, math.inf, floor)
    ceiling = torch.where(weightless | left_out | zero_maybe, math.inf, ceiling)
    floor = torch.where(sure & ~left_out | weightless, floor, 0.0)
    ceiling = torch.where(sure, ceiling, math.inf)
    cut_floor = torch.where(left_out, _cut_floor(rows, params, weight_c, full_max, vocab_size), math.inf)
    return (floor, ceiling, _honest_undecidable(ids, lps, params, vocab_size, slack), cut_floor,
            torch.full_like(cut_floor, math.inf))  # the ceiling: a whole-vocabulary pass decides


class _Extremes:
    """The least of the lower values and the most of the upper values seen, elementwise:
    a bound's range over every nucleus a cut allows."""

    def __init__(self) -> None:
        self.least: torch.Tensor | float = math.inf
        self.most: torch.Tensor | float = -math.inf

    def add(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        self.least = torch.minimum(torch.as_tensor(self.least), lower)
        self.most = torch.maximum(torch.as_tensor(self.most), upper)


def _cut_floor(rows: _Rows, params: SamplingParams, weight_c: torch.Tensor, full_max: torch.Tensor,
               vocab_size: int) -> torch.Tensor:
    """``[n]`` the least distance from the cut (``sampler._filter_margins``) of a claimed token
    of weight ``weight_c`` that the cut surely leaves out, over every tail the evidence allows:
    below the top-k's k-th weight (known: the cut is inside the top-K), and past the nucleus
    by the known weight surely ahead of it against the largest threshold (the share of
    ``full_max``). Integer rounding (a unit per token, in the total's scale) is given to
    the executor, so the floor never exceeds the reference's value."""
    units = 2 * _UNIT * full_max  # a weight and a sum's rounding, in these weights' scale
    floor = torch.zeros_like(weight_c)
    kth = torch.full_like(weight_c, 0.0)
    if 0 < params.top_k < vocab_size:
        if params.top_k >= rows.weight.shape[1] - 1:  # the cut is in the tail: never sure (_nucleus)
            return floor
        kth = torch.sort(rows.weight[:, :-1], dim=1, descending=True).values[:, params.top_k - 1]
        floor = (kth * (1 - _TIE) - units) / (weight_c + units) - 1.0
    p_scaled = max(1, round(params.top_p * 2**32))
    if p_scaled < 2**32:
        heavier = rows.known & (rows.weight > weight_c.unsqueeze(1) * (1 + _TIE)) & (rows.weight >= kth.unsqueeze(1))
        ahead = (rows.weight * heavier).sum(dim=1) - heavier.sum(dim=1) * units
        threshold = p_scaled / 2**32 * full_max * (1 + _TIE) + units
        floor = torch.maximum(floor, ahead / threshold - 1.0)
    return floor.clamp_min(0.0)


def _honest_undecidable(ids: torch.Tensor, lps: torch.Tensor, params: SamplingParams, vocab_size: int,
                        slack: torch.Tensor) -> torch.Tensor:
    """``[n]`` the share of noise points not inside any top-K token's certain interval (the
    part of its interval that is its under every tail the evidence allows): only there
    can an honest executor's token be undecidable. From the top-K alone, so it is fixed
    before the claimed token is read."""
    n = len(ids)
    none = torch.zeros(n, dtype=torch.bool)
    rows = _rows(ids, lps, ids[:, 0], lps[:, 0], none, params.temperature, vocab_size)
    cut = _nucleus(rows, params, vocab_size, ids.shape[1])
    kept = cut.kept
    kept[:, -1] = False
    r_min = rows.tail_min if cut.tail_kept else torch.zeros(n, dtype=torch.float64)
    r_max = rows.tail_max if cut.tail_kept else torch.zeros(n, dtype=torch.float64)
    a, n_below, n_above = _order_stats(rows, ids, kept)
    expand = [x.unsqueeze(1).expand_as(a) for x in (rows.cap, r_min, r_max)]
    lo, hi = _Extremes(), _Extremes()  # over every nucleus: a token's interval is certain where all hold it
    for a_m, total in _nuclei(rows, cut, ids, a):
        lo.add(*_interval(a_m, n_below, n_above, total, *expand))
        hi.add(*_interval(a_m + rows.weight[:, :-1], n_below, n_above, total, *expand))
    certain = ((hi.least - lo.most - 2 * slack.unsqueeze(1)).clamp_min(0.0) * kept[:, :-1]).sum(dim=1)
    return torch.where(cut.sure, (1.0 - certain).clamp(0.0, 1.0), 1.0)
