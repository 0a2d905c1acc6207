"""The verification metric: is an executor's artifact what the committed model,
run honestly with the committed seed and parameters, would have produced?

Theory of operation. A validator holds an :class:`InferenceArtifact` (the
executor's claim: token ids, top-k raw logprobs, sampling parameters, seed)
and a :class:`ScoredCompletion` it computed itself: one teacher-forced pass of
the pinned model over prompt + claimed completion: the serving engine's top
``EVIDENCE_TOP_K`` logprobs per position (``topk_evidence``: a floor and a
ceiling per measurement, rules fail on floors, a position between them is
undecidable and rule 6 bounds those), or raw logits rows (the reference:
tests, calibration, the out-of-process cross-check; exact).
:func:`verify` is :func:`measure` (the expensive, threshold-free comparison:
:class:`Measurements`) then :func:`judge` (cheap: the rules with the model's
thresholds), returning a :class:`Verdict`, valid only if every rule passes.
The split lets calibration measure honest work once and choose thresholds
without re-running a model. The rules, each a pure function below:

0. ``check_contract`` -- the client's signed request is the contract: the
   artifact states its model, prompt, sampling parameters, ``max_tokens`` and
   seed (the inference id), and the ledger bills the token counts of the
   executor's Finish; all of them must be the contract's. Every later rule
   applies the *contract's* parameters and seed, never the artifact's own
   statement of them: an executor that sampled greedily when T = 1 was asked,
   or stopped after 4 of 64 tokens, and said so, does not get judged by the
   terms it chose (one seed would otherwise admit a completion per parameter
   set the executor cared to try).
1. ``check_length`` -- the completion ends the way an honest engine ends one:
   at most ``max_tokens`` tokens, at least one, an EOS token only as the last
   token, and an early stop only on EOS. (Gonka's public code passes length
   and token mismatches; here they fail.)
2. ``check_claim_covered`` and ``check_evidence_form`` -- the recomputation is
   over exactly the claimed ids, and the evidence is well formed: finite
   logprobs <= 0, distinct in-vocabulary top-k ids. A NaN would otherwise
   slip through every "greater than" comparison, and a top-k list repeating
   the top-1 id would pass the set check.
3. ``check_distance`` -- the claimed logprobs (chosen token and top-k) are the
   recomputed ones: no single value off by more than ``logprob_tolerance``
   and their mean absolute difference at most ``max_mean_distance``. The mean
   is over this output's own positions only (Gonka divides by max(100, n),
   which lets short outputs claim anything).
4. ``check_top_k_set`` -- the claimed top-k ids are the recomputed top-k,
   up to near-ties at the k-th place.
5. ``check_sampling`` -- each claimed token is the one ``sampler.choose_token``
   picks from the recomputed logits with the artifact's seed and parameters,
   up to near-ties that numeric noise could flip (greedy: of
   ``greedy_noise``, calibrated at bf16 from honest greedy margins; sampled: of
   ``tie_noise``, calibrated at bf16 from honest CDF margins; at bf16 the
   single-logprob tolerance, set by tail logprobs, would make nearly every
   token a near-tie).
   A token the recomputed top-k/top-p cut leaves out has no interval to be
   near: it passes only within ``cut_tolerance`` of the cut (noise of
   ``cut_noise`` nats; calibrated at bf16, where an honest executor's copy of
   the model ends a nucleus a token later than the validator's in about one
   sampled output in ten, and the single-logprob tolerance would keep every
   token). This is what defeats the pre-fill attack (cheap model writes, real model
   scores): honest-looking logprobs are not enough, the tokens must be the
   ones the real distribution and the public noise select.
6. ``check_undecidable`` -- no more undecidable positions than honest work
   leaves, beyond chance (``topk_evidence.too_many_undecidable``); positions
   open only at a cut are left to the whole-vocabulary pass that resolves
   every undecidable output.

All thresholds live in :class:`ModelThresholds` (``verification_params``), one record per model and
pinned dtype, calibrated from measured honest noise (both engines, CPU) as
about 3x its p99.9; ``thresholds.toml`` holds them and the calibration that
chose them (``benchmarks/detection_matrix.py --calibrate``), and each network
pins its copy in genesis (``verification``), so its validators judge alike.

Each verdict is failed, suspicious (valid, but its mean distance is above
the honest bulk, or it holds more *wide ties* -- claims inside the near-tie
width yet further from the sampler's choice than honest noise came in
calibration -- than an honest output of its length shows but rarely:
:func:`wide_ties`) or clean (:class:`Evidence`). Per executor the ledger folds
them into its epoch test, two restarted Wald SPRTs in integer micro-nats carried
across epochs until they decide (``ledger.epoch_test``; the only
implementation): the failure test asks whether failures come more often than
honest noise explains; the distance test whether failed-or-suspicious verdicts
do -- the aggregate that catches a subtle cheat whose single outputs stay
within the per-inference limits. Its integer parameters are derived
(``ledger.genesis.sprt_params_from_rates``) from the design rates here
(``verification_params.SprtParams``): "honest" bounds above the calibrated rates, "cheating"
the weakest cheat to catch.

Pure: no I/O, clocks or randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import Enum

import torch

from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import ScoredCompletion
from gonka_p2p.inference.sampler import SamplingParams, claim_margins, is_near_tie
from gonka_p2p.inference.verification_params import (
    ModelThresholds, cut_tolerance, tie_tolerance, wide_tie_floor, wide_tie_limit)
from gonka_p2p.inference.topk_evidence import too_many_undecidable, top_k_measurements
from gonka_p2p.ledger.rules import Observation
from gonka_p2p.wire.messages import response_hash

# Bump when :func:`measure` would return other numbers for the same artifact and
# scores: the detection benchmark keeps hours of measurements keyed by it (a faster
# but equivalent implementation keeps the version; tests hold it to the reference).
# 2: integer sampler weights, SplitMix64 noise. 3: ceilings and the honest undecidable bound.
# 4: a token's distance from the top-k/top-p cut (cut_margins). 5: a token past the cut has
# the sampling margin of a kept set holding it (sampler.is_near_tie), no longer inf.
MEASURE_VERSION = 5

# ---------------------------------------------------------------------------
# The contract: what an artifact is judged against


@dataclass(frozen=True)
class Billed:
    """What the ledger recorded from the executor's FinishInference, and bills the client for."""

    response_hash: bytes
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Contract:
    """The terms of one inference: the client's signed request (model, prompt as this
    validator tokenizes it, sampling parameters and ``max_tokens``), its seed (the
    inference id) and, when it settled on a ledger, what the ledger bills (``billed``)."""

    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: bytes
    billed: Billed | None = None


def check_contract(artifact: InferenceArtifact, contract: Contract) -> tuple[str, ...]:
    """Every term the artifact states, and every count the ledger bills, is the contract's."""
    reasons = []
    if artifact.model != contract.model:
        reasons.append(f"contract: the artifact is for model {artifact.model!r}, the request "
                       f"asked {contract.model!r}")
    if artifact.prompt_ids != contract.prompt_ids:
        reasons.append("contract: the artifact's prompt is not the request's")
    for f in fields(SamplingParams):
        stated, asked = getattr(artifact.params, f.name), getattr(contract.params, f.name)
        if stated != asked:
            reasons.append(f"contract: the artifact states {f.name} {stated!r}, the request asked {asked!r}")
    if artifact.seed != contract.seed:
        reasons.append("contract: the artifact's seed is not the inference id")
    billed = contract.billed
    if billed is not None:
        counts = (len(artifact.prompt_ids), len(artifact.steps))
        if (billed.prompt_tokens, billed.completion_tokens) != counts:
            reasons.append(f"contract: the ledger bills {billed.prompt_tokens} prompt + "
                           f"{billed.completion_tokens} completion tokens, the artifact holds "
                           f"{counts[0]} + {counts[1]}")
        if response_hash(artifact.completion_ids) != billed.response_hash:
            reasons.append("response: the artifact's tokens are not the committed response")
    return tuple(reasons)


def check_scorable(prompt_ids: list[int], completion_ids: list[int], vocab_size: int,
                   max_context: int) -> str | None:
    """The evidence is something the model can be run over: a completion of in-vocabulary
    ids that fits, with the prompt, in the model's context. An honest executor cannot
    produce anything else; checked before the validator's pass, so an engine failure after
    it is the validator's own fault, not the executor's."""
    if not completion_ids:
        return "length: the completion is empty"
    bad = [t for t in (*prompt_ids, *completion_ids) if not 0 <= t < vocab_size]
    if bad:
        return f"evidence: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
    if len(prompt_ids) + len(completion_ids) > max_context:
        return (f"length: {len(prompt_ids)} prompt + {len(completion_ids)} completion tokens "
                f"exceed the model's context of {max_context}")
    return None


# ---------------------------------------------------------------------------
# Measuring: the expensive, threshold-free half


@dataclass(frozen=True)
class Measurements:
    """What the rules judge: a claim compared with its recomputation, before any threshold.

    Kept apart from the judgement so that calibration measures honest work
    once and thresholds can be re-chosen without re-running any model.
    """

    n_tokens: int
    temperature: float  # the claimed sampling temperature (0 = greedy): sets the tie unit
    structural: tuple[str, ...]  # failed rules that need no threshold: length, response, form
    position_errors: tuple[float, ...]  # nats, per position: mean |claimed - recomputed| of k+1 logprobs
    max_error: float  # nats: largest single |claimed - recomputed| logprob (inf: not comparable)
    top_k_shortfall: tuple[float, ...]  # nats, per position (see top_k_shortfall)
    sampling_margins: tuple[float, ...]  # per position, check_token's margin; 0 = the sampler's pick
    # The same three at the least favourable tail for the executor (top-K evidence); equal to the
    # floors above when the validator held logits rows. Per position; errors: the largest of k + 1.
    error_ceilings: tuple[float, ...] = ()
    top_k_ceilings: tuple[float, ...] = ()
    sampling_ceilings: tuple[float, ...] = ()
    honest_undecidable: float = 0.0  # mu: expected undecidable positions of honest work, at most
    # Per position, for a token the top-k/top-p cut: how far outside the cut (sampler.claim_margins,
    # relative; its sampling margin is then measured in a kept set holding it); inf for every other.
    # () = inf everywhere. Floors and ceilings as above.
    cut_margins: tuple[float, ...] = ()
    cut_ceilings: tuple[float, ...] = ()

    @property
    def comparable(self) -> bool:
        return math.isfinite(self.max_error)

    @property
    def mean_error(self) -> float:
        """nats: mean |claimed - recomputed| over every compared logprob (inf: not comparable)."""
        if not self.comparable:
            return math.inf
        return sum(self.position_errors) / len(self.position_errors)


def check_length(artifact: InferenceArtifact, eos_token_ids: frozenset[int]) -> str | None:
    """An honest engine emits 1..max_tokens tokens and stops early only right after an EOS."""
    ids = artifact.completion_ids
    n, max_tokens = len(ids), artifact.params.max_tokens
    if n == 0:
        return "length: the completion is empty"
    if n > max_tokens:
        return f"length: {n} tokens exceed max_tokens {max_tokens}"
    early_eos = [i for i, t in enumerate(ids[:-1]) if t in eos_token_ids]
    if early_eos:
        return f"length: end-of-sequence token at position {early_eos[0]}, not at the end"
    if n < max_tokens and ids[-1] not in eos_token_ids:
        return f"length: stopped after {n} of {max_tokens} tokens without an end-of-sequence token"
    return None


def check_claim_covered(artifact: InferenceArtifact, recomputed: ScoredCompletion) -> str | None:
    """The validator's pass covers exactly the claimed ids (a logits row or >= k top ids each)."""
    claimed, ids = artifact.completion_ids, [s.token_id for s in recomputed.steps]
    rows = len(ids) if recomputed.logits is None else len(recomputed.logits)
    if ids != claimed or rows != len(claimed):
        return f"recomputation: covers {len(ids)} tokens / {rows} rows, not the {len(claimed)} claimed tokens"
    if recomputed.logits is None and any(len(s.top_ids) < artifact.params.logprobs_k for s in recomputed.steps):
        return f"recomputation: fewer than {artifact.params.logprobs_k} top ids per position"
    return None


def check_evidence_form(artifact: InferenceArtifact, vocab_size: int) -> str | None:
    """Logprobs finite and <= 0; top-k ids distinct and in the vocabulary; token ids in range."""
    k = artifact.params.logprobs_k
    for i, s in enumerate(artifact.steps):
        values = (s.logprob, *s.top_logprobs)
        if not all(math.isfinite(v) and v <= 0.0 for v in values):
            return f"evidence: position {i} has a logprob that is not a finite number <= 0"
        ids = (s.token_id, *s.top_ids)
        if len(s.top_ids) != k or len(set(s.top_ids)) != k:
            return f"evidence: position {i} does not list {k} distinct top ids"
        if not all(0 <= t < vocab_size for t in ids):
            return f"evidence: position {i} names a token outside the vocabulary"
    return None


def recomputed_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Raw logprobs as the engines compute their evidence (log_softmax in float32).
    Computing them in float64 instead would count the float32 rounding of a 50k-term
    logsumexp (up to ~1e-4 nats on peaked rows) as executor noise. Kept in float32:
    the comparisons widen only the values they pick to float64 (exact, order-keeping),
    not the whole ``[n, vocab]`` table."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def logprob_errors(artifact: InferenceArtifact, logprobs: torch.Tensor) -> torch.Tensor:
    """``[n, 1 + k]`` absolute differences between claimed and recomputed raw logprobs
    of the chosen token and of each claimed top-k id."""
    ids = torch.tensor([(s.token_id, *s.top_ids) for s in artifact.steps], dtype=torch.long)
    claimed = torch.tensor([(s.logprob, *s.top_logprobs) for s in artifact.steps],
                           dtype=torch.float64)
    return (claimed - logprobs.gather(1, ids).to(torch.float64)).abs()


def top_k_shortfall(artifact: InferenceArtifact, logprobs: torch.Tensor) -> torch.Tensor:
    """``[n]`` nats by which the worst claimed top-k id at each position falls below the
    recomputed k-th logprob (0 when all are in the recomputed top-k). With k distinct
    ids claimed, a shortfall is the same as the two sets differing."""
    k = artifact.params.logprobs_k
    kth = logprobs.topk(k, dim=1).values[:, -1:].to(torch.float64)
    ids = torch.tensor([s.top_ids for s in artifact.steps], dtype=torch.long)
    return (kth - logprobs.gather(1, ids).to(torch.float64)).clamp_min(0.0).max(dim=1).values


def sampling_margins(artifact: InferenceArtifact, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` ``sampler.check_token``'s margin and cut margin at every position, with the
    artifact's seed and params: margin 0 where the claimed token is the sampler's pick.
    All positions in one batched pass (``claim_margins``), bit for bit the per-position values."""
    claimed = torch.tensor(artifact.completion_ids, dtype=torch.long)
    margins, _, cut = claim_margins(logits, artifact.params, artifact.seed, claimed)
    return margins, cut


def measure(
    artifact: InferenceArtifact,
    recomputed: ScoredCompletion,
    *,
    eos_token_ids: frozenset[int],
    contract: Contract | None = None,
    vocab_size: int | None = None,
) -> Measurements:
    """Compare ``artifact`` with the validator's teacher-forced ``recomputed`` pass (logits
    rows, or top-K evidence and the model's logits width ``vocab_size``) over the contract's
    prompt and the artifact's completion, by the contract's terms (:func:`check_contract`).
    ``contract`` None takes the artifact's own statement as the terms: only for measuring
    work the caller itself asked for (calibration, cost), never for judging others."""
    stated = () if contract is None else check_contract(artifact, contract)
    if contract is not None:  # judged by the terms asked for, whatever the artifact states
        artifact = replace(artifact, params=contract.params, seed=contract.seed)
    vocab_size = vocab_size if recomputed.logits is None else recomputed.logits.shape[1]
    assert vocab_size is not None, "measuring from top-K evidence needs the model's vocab_size"
    n = len(artifact.steps)
    covered = check_claim_covered(artifact, recomputed)
    form = check_evidence_form(artifact, vocab_size) if covered is None else None
    structural = stated + tuple(r for r in (check_length(artifact, eos_token_ids), covered, form)
                                if r is not None)
    if n == 0 or covered is not None or form is not None:  # nothing comparable to compare
        return Measurements(n, artifact.params.temperature, structural, (), math.inf, (), ())
    if recomputed.logits is None:  # floors judged, ceilings counted by rule 6
        return Measurements(n, artifact.params.temperature, structural, **top_k_measurements(
            artifact.steps, recomputed.steps, artifact.params, artifact.seed, vocab_size))
    logprobs = recomputed_logprobs(recomputed.logits)
    errors = logprob_errors(artifact, logprobs)
    shortfall = tuple(top_k_shortfall(artifact, logprobs).tolist())
    margins, cut = (tuple(x.tolist()) for x in sampling_margins(artifact, recomputed.logits))
    return Measurements(n, artifact.params.temperature, structural, tuple(errors.mean(dim=1).tolist()),
                        float(errors.max()), shortfall, margins, tuple(errors.max(dim=1).values.tolist()),
                        shortfall, margins, cut_margins=cut, cut_ceilings=cut)  # exact: ceilings are the floors


# ---------------------------------------------------------------------------
# Judging: the cheap half. Each rule returns None when it passes, or why it fails.


def check_distance(m: Measurements, thresholds: ModelThresholds) -> str | None:
    """Every claimed logprob within ``logprob_tolerance``; their mean within
    ``max_mean_distance`` (widened for short outputs, see ``mean_limit``)."""
    limit = thresholds.mean_limit(thresholds.max_mean_distance, m.n_tokens)
    if not m.max_error <= thresholds.logprob_tolerance:
        return (f"distance: a logprob is off by {m.max_error:.3g} nats "
                f"(tolerance {thresholds.logprob_tolerance:.3g})")
    if not m.mean_error <= limit:
        return f"distance: mean logprob error {m.mean_error:.3g} nats exceeds {limit:.3g}"
    return None


def check_top_k_set(m: Measurements, thresholds: ModelThresholds) -> str | None:
    """The claimed top-k set is the recomputed one, up to near-ties at the k-th place."""
    misses = [i for i, x in enumerate(m.top_k_shortfall) if x > thresholds.logprob_tolerance]
    if misses:
        return f"top-k: {len(misses)} positions list ids outside the recomputed top-k (first {misses[0]})"
    return None


def _cut(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    return values or (math.inf,) * n


def sampling_misses(m: Measurements, thresholds: ModelThresholds) -> list[int]:
    """Positions whose token is not the sampler's pick up to a near-tie (``sampler.is_near_tie``:
    at a CDF boundary, or just past the top-k/top-p cut where the noise picks it too)."""
    tie, cut = tie_tolerance(thresholds, m.temperature), cut_tolerance(thresholds, m.temperature)
    return [i for i, (x, c) in enumerate(zip(m.sampling_margins, _cut(m.cut_margins, len(m.sampling_margins)),
                                             strict=True)) if not is_near_tie(x, c, tie, cut)]


def check_sampling(m: Measurements, thresholds: ModelThresholds) -> str | None:
    """Each token is the seeded sampler's pick, up to near-ties noise could flip."""
    tolerance = tie_tolerance(thresholds, m.temperature)
    misses = sampling_misses(m, thresholds)
    if misses:
        return (f"sampling: {len(misses)} tokens are not the seeded sampler's choice (first at "
                f"position {misses[0]}, worst margin {max(m.sampling_margins[i] for i in misses):.3g} > "
                f"{tolerance:.3g}; at a top-k/top-p cut: {cut_tolerance(thresholds, m.temperature):.3g})")
    return None


def _undecidable(m: Measurements, thresholds: ModelThresholds) -> tuple[int, int]:
    """(positions where some rule fails at its ceiling, of which those only a token's distance
    from the top-k/top-p cut leaves open): undecidable once every floor passes."""
    single, tie = thresholds.logprob_tolerance, tie_tolerance(thresholds, m.temperature)
    cut = cut_tolerance(thresholds, m.temperature)
    n = len(m.sampling_ceilings)
    count = at_cut = 0
    for e, s, c, floor, ceiling in zip(m.error_ceilings, m.top_k_ceilings, m.sampling_ceilings,
                                       _cut(m.cut_margins, n), _cut(m.cut_ceilings, n), strict=True):
        open_at_cut = floor <= cut < ceiling
        if max(e, s) > single or (c > tie and ceiling > cut):
            count += 1
            at_cut += open_at_cut and max(e, s) <= single
    return count, at_cut


def undecidable_positions(m: Measurements, thresholds: ModelThresholds) -> int:
    """Positions where some rule fails at its ceiling: undecidable once every floor passes."""
    return _undecidable(m, thresholds)[0]


def check_undecidable(m: Measurements, thresholds: ModelThresholds) -> str | None:
    """Rule 6: no more undecidable positions than honest sampling leaves, beyond chance. A token
    just outside the validator's top-k/top-p cut is not counted: honest bf16 work leaves such
    positions at a rate ``honest_undecidable`` does not bound (every undecidable position,
    those included, is resolved by a whole-vocabulary pass all the same)."""
    total, at_cut = _undecidable(m, thresholds)
    count, mu = total - at_cut, m.honest_undecidable
    return (f"undecidable: {count} positions the top-K evidence cannot decide, more than honest sampling "
            f"leaves (expected at most {mu:.3g})") if too_many_undecidable(count, mu) else None


class Evidence(str, Enum):
    """What one verdict contributes to the epoch test."""

    FAILED = "failed"
    SUSPICIOUS = "suspicious"
    CLEAN = "clean"

    @property
    def observation(self) -> Observation:
        """The same outcome as the ledger's epoch test (``ledger.epoch_test``) counts it."""
        return Observation[self.name]


@dataclass(frozen=True)
class Verdict:
    """One validation: the decision, why, and the statistics the epoch test aggregates."""

    valid: bool
    reasons: tuple[str, ...]  # one line per failed rule; empty when valid
    evidence: Evidence
    n_tokens: int
    mean_distance: float  # nats; inf when the claim could not be compared
    max_distance: float  # nats; inf when the claim could not be compared
    top_k_misses: int  # positions
    sampling_mismatches: int  # positions
    near_ties: int  # positions accepted only as near-ties
    undecidable: int = 0  # positions the top-K evidence could not decide (0 once a rule failed)
    wide_ties: int = 0  # positions further from the sampler's choice than honest noise came (wide_tie_floor)
    wide_ties_open: bool = False  # clean on the top-K evidence, but its tail could make it suspicious


def judge(m: Measurements, thresholds: ModelThresholds) -> Verdict:
    """Apply every rule to ``m`` with the model's thresholds."""
    reasons = list(m.structural)
    if m.comparable:
        floors = [r for r in (check_distance(m, thresholds), check_top_k_set(m, thresholds),
                              check_sampling(m, thresholds)) if r is not None]
        undecidable = 0 if floors else undecidable_positions(m, thresholds)  # a proven failure decides
        reasons += floors or list(filter(None, [check_undecidable(m, thresholds)]))
    wide, possibly_wide = wide_ties(m, thresholds)
    limit = wide_tie_limit(m.n_tokens)
    if reasons:
        evidence = Evidence.FAILED
    elif (m.mean_error > thresholds.mean_limit(thresholds.suspicious_mean_distance, m.n_tokens)
          or wide >= limit):
        evidence = Evidence.SUSPICIOUS
    else:
        evidence = Evidence.CLEAN
    mismatches = len(sampling_misses(m, thresholds))
    return Verdict(
        valid=not reasons, reasons=tuple(reasons), evidence=evidence, n_tokens=m.n_tokens,
        mean_distance=m.mean_error, max_distance=m.max_error,
        top_k_misses=sum(x > thresholds.logprob_tolerance for x in m.top_k_shortfall),
        sampling_mismatches=mismatches,
        near_ties=sum(0.0 < x or c < math.inf for x, c in zip(
            m.sampling_margins, _cut(m.cut_margins, len(m.sampling_margins)), strict=True)) - mismatches,
        undecidable=undecidable if m.comparable else 0, wide_ties=wide,
        wide_ties_open=evidence is Evidence.CLEAN and wide < limit <= possibly_wide,
    )


def wide_ties(m: Measurements, thresholds: ModelThresholds) -> tuple[int, int]:
    """Positions whose claimed token lies further from the seeded sampler's choice than honest
    noise came in calibration (:func:`wide_tie_floor`), as (proven at the margins' floors,
    possible at their ceilings). Within the near-tie width they pass, but a wrong temperature
    or a written text leaves many, an honest executor hardly any, so enough of them make the
    output suspicious for the epoch test. Top-K evidence leaves the tail open, and a cheat
    must not stay clean on an undercount: while the ceilings could reach the limit and the
    floors do not, the verdict is open (``served_check`` then scores the whole vocabulary;
    with logits rows ceilings equal floors). Tokens past a top-k/top-p cut are the cut rule's
    (``is_near_tie``), as calibration measured them: not counted."""
    floor = wide_tie_floor(thresholds, m.temperature)
    ceilings = m.sampling_ceilings or m.sampling_margins
    kept = [c == math.inf for c in _cut(m.cut_margins, len(m.sampling_margins))]
    return (sum(floor < x < math.inf and k for x, k in zip(m.sampling_margins, kept, strict=True)),
            sum(floor < c < math.inf and k for c, k in zip(ceilings, kept, strict=True)))


def verify(
    artifact: InferenceArtifact,
    recomputed: ScoredCompletion,
    thresholds: ModelThresholds,
    *,
    contract: Contract,
    eos_token_ids: frozenset[int],
    vocab_size: int | None = None,
) -> Verdict:
    """Decide whether ``artifact`` is honest work on ``contract``: :func:`measure`, then
    :func:`judge`."""
    return judge(measure(artifact, recomputed, eos_token_ids=eos_token_ids, contract=contract,
                         vocab_size=vocab_size), thresholds)


def rejected(reason: str) -> Verdict:
    """The verdict on evidence that fails before anything can be compared (it does not
    decode, breaks the contract, or cannot be run through the model): failed, for ``reason``."""
    return Verdict(valid=False, reasons=(reason,), evidence=Evidence.FAILED, n_tokens=0,
                   mean_distance=math.inf, max_distance=math.inf, top_k_misses=0,
                   sampling_mismatches=0, near_ties=0)
