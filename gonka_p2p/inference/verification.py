"""The verification metric: is an executor's artifact what the committed model,
run honestly with the committed seed and parameters, would have produced?

Theory of operation. A validator holds an :class:`InferenceArtifact` (the
executor's claim: token ids, top-k raw logprobs, sampling parameters, seed)
and a :class:`ScoredCompletion` it computed itself: one teacher-forced pass of
the pinned model over prompt + claimed completion, with the raw logits rows.
:func:`verify` applies five rules, each a pure function below, and returns a
:class:`Verdict`: valid only if every rule passes.

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
   up to near-ties that numeric noise of ``logprob_tolerance`` could flip.
   This is what defeats the pre-fill attack (cheap model writes, real model
   scores): honest-looking logprobs are not enough, the tokens must be the
   ones the real distribution and the public noise select.

All thresholds live in :class:`ModelThresholds`, one record per model,
calibrated from measured honest noise on the pinned configuration (fp32 on
CPU, both engines) as about 3x its p99.9; ``thresholds.toml`` holds the values
and the calibration that chose them (``benchmarks/detection_matrix.py
--calibrate`` regenerates it).

Per executor per epoch, :func:`observe` folds verdicts into
:class:`EpochEvidence`, a sequential probability ratio test (Wald's SPRT,
restarted after each acceptance of "honest" so that an executor cannot build
credit early in an epoch and cheat afterwards). Each verdict is one of three
outcomes -- failed, suspicious (valid but its mean distance is above the
honest bulk), clean -- with calibrated probabilities under "honest" and
design probabilities under "cheating" (:class:`SprtParams`).
:func:`epoch_decision` says honest / cheating / undecided.

Pure: no I/O, clocks or randomness, except :func:`load_verification_params`,
which reads the thresholds file (a package resource by default).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from gonka_p2p.inference.artifacts import InferenceArtifact, response_hash
from gonka_p2p.inference.engine import ScoredCompletion
from gonka_p2p.inference.sampler import SamplingParams, check_token

# ---------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ModelThresholds:
    """Per-model verification thresholds. Units: nats (natural-log probability)."""

    logprob_tolerance: float  # nats: largest |claimed - recomputed| of any one logprob; near-tie width
    max_mean_distance: float  # nats: largest mean |claimed - recomputed| of a reference-length output
    suspicious_mean_distance: float  # nats: above it a valid output counts as suspicious in the SPRT
    reference_tokens: int  # tokens: the output length the two mean limits were calibrated at

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be positive, not {value!r}")
        if self.suspicious_mean_distance > self.max_mean_distance:
            raise ValueError("suspicious_mean_distance must not exceed max_mean_distance")

    def mean_limit(self, limit: float, n_tokens: int) -> float:
        """``limit`` (a mean-distance limit at ``reference_tokens``) for an ``n_tokens`` output.

        A mean over fewer values is noisier: the limit widens by the standard-error
        factor sqrt(reference / n), up to ``logprob_tolerance``, the bound every
        single value must meet anyway. So a short output is judged on its own,
        smaller evidence -- every value and every token still checked -- rather than
        diluted (Gonka divides by max(100, n)) or held to a limit made for long ones.
        """
        widened = limit * math.sqrt(max(1.0, self.reference_tokens / n_tokens))
        return max(limit, min(widened, self.logprob_tolerance))


@dataclass(frozen=True)
class SprtParams:
    """The epoch test. Rates are probabilities per validated inference, in [0, 1].

    ``honest_*`` describe an honest executor (calibrated: the measured rates
    are below these, so an honest executor drifts to "honest" at least as fast
    as designed). ``cheat_*`` describe the weakest cheat the test is designed
    to catch within an epoch. ``alpha`` and ``beta`` are the error rates of
    one Wald run: honest accused, cheat accepted.
    """

    honest_fail_rate: float = 0.005
    honest_suspicious_rate: float = 0.01
    cheat_fail_rate: float = 0.05
    cheat_suspicious_rate: float = 0.5
    alpha: float = 1e-4
    beta: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{f.name} must be a probability in (0, 1), not {value!r}")
        if (self.honest_fail_rate + self.honest_suspicious_rate >= 1.0
                or self.cheat_fail_rate + self.cheat_suspicious_rate >= 1.0):
            raise ValueError("failed + suspicious rates must leave room for clean verdicts")
        if (self.cheat_fail_rate <= self.honest_fail_rate
                or self.cheat_suspicious_rate <= self.honest_suspicious_rate):
            raise ValueError("a cheat must fail and look suspicious more often than an honest executor")


PARAM_UNITS: Mapping[str, str] = MappingProxyType({
    "logprob_tolerance": "nats; per single logprob, and the near-tie width of the sampling and top-k checks",
    "max_mean_distance": "nats; mean |claimed - recomputed| logprob over one output's positions and k+1 values",
    "suspicious_mean_distance": "nats; valid outputs above it count as suspicious in the epoch test",
    "reference_tokens": "tokens; output length the mean limits hold at (shorter outputs: wider, see mean_limit)",
    "honest_fail_rate": "probability per inference that an honest output fails (upper bound)",
    "honest_suspicious_rate": "probability per inference that an honest output is suspicious (upper bound)",
    "cheat_fail_rate": "probability per inference that the weakest targeted cheat fails",
    "cheat_suspicious_rate": "probability per inference that the weakest targeted cheat is suspicious",
    "alpha": "probability that one Wald run accuses an honest executor",
    "beta": "probability that one Wald run accepts a cheat as honest",
})


@dataclass(frozen=True)
class VerificationParams:
    """Everything the metric needs: thresholds per model and the epoch test."""

    models: Mapping[str, ModelThresholds]
    sprt: SprtParams = SprtParams()

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(sorted(self.models.items()))))

    def for_model(self, model: str) -> ModelThresholds:
        """The thresholds of ``model``; a model with none cannot be verified."""
        try:
            return self.models[model]
        except KeyError:
            raise KeyError(f"no verification thresholds for model {model!r}; "
                           f"calibrated models: {', '.join(self.models) or 'none'}") from None


def verification_params_from_obj(obj: Mapping[str, Any]) -> VerificationParams:
    """Build the record from a parsed thresholds table; ``calibration`` tables are the
    record of how values were chosen and are not read."""
    unknown = set(obj) - {"sprt", "models"}
    if unknown:
        raise ValueError(f"unknown top-level keys in thresholds: {sorted(unknown)}")
    models = {}
    for name, table in obj.get("models", {}).items():
        values = {k: v for k, v in table.items() if k != "calibration"}
        models[str(name)] = ModelThresholds(**values)
    sprt = SprtParams(**{k: float(v) for k, v in obj.get("sprt", {}).items()})
    return VerificationParams(models=models, sprt=sprt)


def load_verification_params(path: Path | None = None) -> VerificationParams:
    """Read ``path``, or the calibrated ``thresholds.toml`` shipped with this package."""
    if path is None:
        text = resources.files("gonka_p2p.inference").joinpath("thresholds.toml").read_text()
    else:
        text = Path(path).read_text()
    return verification_params_from_obj(tomllib.loads(text))


def tie_tolerance(thresholds: ModelThresholds, params: SamplingParams) -> float:
    """How far from the sampler's choice a claimed token may be, in ``check_token``'s unit.

    Noise of at most ``eps`` nats on every logprob can close a greedy gap of
    up to ``2 eps`` nats (one value up, the other down). At temperature T it
    scales every probability by at most ``exp(+-2 eps / T)``, so every CDF
    value, which is at most 1, moves by at most ``expm1(2 eps / T)``.
    """
    eps = thresholds.logprob_tolerance
    if params.greedy:
        return 2.0 * eps
    return math.expm1(2.0 * eps / params.temperature)


# ---------------------------------------------------------------------------
# Rules: each returns None when it passes, or the reason it fails, for people.


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


def check_response(artifact: InferenceArtifact, expected: bytes) -> str | None:
    """The artifact's tokens are the answer the executor signed and delivered."""
    if response_hash(artifact.completion_ids) != expected:
        return "response: the artifact's tokens are not the committed response"
    return None


def check_claim_covered(artifact: InferenceArtifact, recomputed: ScoredCompletion) -> str | None:
    """The validator's pass covers exactly the claimed ids; what was not compared never passes."""
    claimed = artifact.completion_ids
    ids = [s.token_id for s in recomputed.steps]
    if recomputed.logits is None:
        return "recomputation: no logits rows (score with with_logits=True)"
    if ids != claimed or recomputed.logits.shape[0] != len(claimed):
        return (f"recomputation: covers {len(ids)} tokens / {recomputed.logits.shape[0]} rows, "
                f"not the {len(claimed)} claimed tokens")
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
    """Raw logprobs as the engines compute their evidence (log_softmax in float32), held in
    float64. Computing them in float64 instead would count the float32 rounding of a
    50k-term logsumexp (up to ~1e-4 nats on peaked rows) as executor noise."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1).to(torch.float64)


def logprob_errors(artifact: InferenceArtifact, logprobs: torch.Tensor) -> torch.Tensor:
    """``[n, 1 + k]`` absolute differences between claimed and recomputed raw logprobs
    of the chosen token and of each claimed top-k id."""
    ids = torch.tensor([(s.token_id, *s.top_ids) for s in artifact.steps], dtype=torch.long)
    claimed = torch.tensor([(s.logprob, *s.top_logprobs) for s in artifact.steps],
                           dtype=torch.float64)
    return (claimed - logprobs.gather(1, ids)).abs()


def check_distance(errors: torch.Tensor, thresholds: ModelThresholds) -> str | None:
    """Every claimed logprob within ``logprob_tolerance``; their mean within
    ``max_mean_distance`` (widened for short outputs, see ``mean_limit``)."""
    worst = float(errors.max())
    mean = float(errors.mean())
    limit = thresholds.mean_limit(thresholds.max_mean_distance, errors.shape[0])
    if not worst <= thresholds.logprob_tolerance:
        position = int(errors.max(dim=1).values.argmax())
        return (f"distance: position {position} has a logprob off by {worst:.3g} nats "
                f"(tolerance {thresholds.logprob_tolerance:.3g})")
    if not mean <= limit:
        return f"distance: mean logprob error {mean:.3g} nats exceeds {limit:.3g}"
    return None


def top_k_shortfall(artifact: InferenceArtifact, logprobs: torch.Tensor) -> torch.Tensor:
    """``[n]`` nats by which the worst claimed top-k id at each position falls below the
    recomputed k-th logprob (0 when all are in the recomputed top-k). With k distinct
    ids claimed, a shortfall is the same as the two sets differing."""
    k = artifact.params.logprobs_k
    kth = logprobs.topk(k, dim=1).values[:, -1:]
    ids = torch.tensor([s.top_ids for s in artifact.steps], dtype=torch.long)
    return (kth - logprobs.gather(1, ids)).clamp_min(0.0).max(dim=1).values


def check_top_k_set(shortfall: torch.Tensor, tolerance: float) -> str | None:
    """The claimed top-k set is the recomputed one, up to near-ties at the k-th place."""
    misses = torch.nonzero(shortfall > tolerance).flatten()
    if len(misses):
        return (f"top-k: {len(misses)} positions list ids outside the recomputed top-k "
                f"(first {int(misses[0])})")
    return None


@dataclass(frozen=True)
class SamplingCheck:
    """Outcome of the sampling rule over one completion."""

    mismatches: tuple[int, ...]  # positions whose token is neither the pick nor a near-tie
    near_ties: int  # positions accepted only as near-ties
    worst_margin: float  # largest margin seen, in check_token's unit


def sampling_check(artifact: InferenceArtifact, logits: torch.Tensor, tolerance: float) -> SamplingCheck:
    """Run ``sampler.check_token`` at every position with the artifact's seed and params."""
    mismatches, near_ties, worst = [], 0, 0.0
    for position, step in enumerate(artifact.steps):
        result = check_token(logits[position], artifact.params, artifact.seed, position,
                             step.token_id, tolerance)
        worst = max(worst, result.margin)
        if not result.ok:
            mismatches.append(position)
        elif not result.exact:
            near_ties += 1
    return SamplingCheck(tuple(mismatches), near_ties, worst)


def check_sampling(result: SamplingCheck, tolerance: float) -> str | None:
    if result.mismatches:
        return (f"sampling: {len(result.mismatches)} tokens are not the seeded sampler's choice "
                f"(first at position {result.mismatches[0]}, worst margin "
                f"{result.worst_margin:.3g} > {tolerance:.3g})")
    return None


# ---------------------------------------------------------------------------
# The verdict


class Evidence(str, Enum):
    """What one verdict contributes to the epoch test."""

    FAILED = "failed"
    SUSPICIOUS = "suspicious"
    CLEAN = "clean"


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
    near_ties: int  # positions accepted as near-ties


def verify(
    artifact: InferenceArtifact,
    recomputed: ScoredCompletion,
    thresholds: ModelThresholds,
    *,
    eos_token_ids: frozenset[int],
    expected_response: bytes | None = None,
) -> Verdict:
    """Decide whether ``artifact`` is honest work, given the validator's teacher-forced
    ``recomputed`` pass (with logits) of the same model over the artifact's prompt and
    completion. ``expected_response`` is the committed response hash, when known."""
    n = len(artifact.steps)
    covered = check_claim_covered(artifact, recomputed)
    reasons = [r for r in (
        check_length(artifact, eos_token_ids),
        check_response(artifact, expected_response) if expected_response is not None else None,
        covered,
    ) if r is not None]
    if covered is not None or n == 0:
        return _uncompared(reasons, n)  # nothing (comparable) to compare
    logits = recomputed.logits
    form = check_evidence_form(artifact, vocab_size=logits.shape[1])
    if form is not None:
        return _uncompared([*reasons, form], n)

    logprobs = recomputed_logprobs(logits)
    errors = logprob_errors(artifact, logprobs)
    shortfall = top_k_shortfall(artifact, logprobs)
    tolerance = tie_tolerance(thresholds, artifact.params)
    sampled = sampling_check(artifact, logits, tolerance)
    reasons += [r for r in (
        check_distance(errors, thresholds),
        check_top_k_set(shortfall, thresholds.logprob_tolerance),
        check_sampling(sampled, tolerance),
    ) if r is not None]
    mean = float(errors.mean())
    if reasons:
        evidence = Evidence.FAILED
    elif mean > thresholds.mean_limit(thresholds.suspicious_mean_distance, n):
        evidence = Evidence.SUSPICIOUS
    else:
        evidence = Evidence.CLEAN
    return Verdict(
        valid=not reasons, reasons=tuple(reasons), evidence=evidence, n_tokens=n,
        mean_distance=mean, max_distance=float(errors.max()),
        top_k_misses=int((shortfall > thresholds.logprob_tolerance).sum()),
        sampling_mismatches=len(sampled.mismatches), near_ties=sampled.near_ties,
    )


def _uncompared(reasons: list[str], n: int) -> Verdict:
    return Verdict(valid=False, reasons=tuple(reasons), evidence=Evidence.FAILED, n_tokens=n,
                   mean_distance=math.inf, max_distance=math.inf, top_k_misses=0,
                   sampling_mismatches=0, near_ties=0)


# ---------------------------------------------------------------------------
# Per executor per epoch: a restarted Wald SPRT over verdict outcomes


class EpochDecision(str, Enum):
    HONEST = "honest"  # at least one run accepted "honest", none accused
    CHEATING = "cheating"  # a run crossed the upper boundary
    UNDECIDED = "undecided"  # too little evidence either way (no accusation)


@dataclass(frozen=True)
class EpochEvidence:
    """The state of one executor's test within one epoch. Start from ``EpochEvidence()``."""

    llr: float = 0.0  # log-likelihood ratio (cheating : honest) of the current run
    accepted_honest: int = 0  # runs that ended accepting "honest"
    accused: bool = False  # a run ended accepting "cheating"; final for the epoch
    observed: int = 0
    failed: int = 0
    suspicious: int = 0


def sprt_bounds(sprt: SprtParams) -> tuple[float, float]:
    """Wald's boundaries (lower, upper) on the log-likelihood ratio."""
    return (math.log(sprt.beta / (1.0 - sprt.alpha)),
            math.log((1.0 - sprt.beta) / sprt.alpha))


def outcome_llr(evidence: Evidence, sprt: SprtParams) -> float:
    """log P(outcome | cheating) / P(outcome | honest) for one verdict."""
    if evidence is Evidence.FAILED:
        return math.log(sprt.cheat_fail_rate / sprt.honest_fail_rate)
    if evidence is Evidence.SUSPICIOUS:
        return math.log(sprt.cheat_suspicious_rate / sprt.honest_suspicious_rate)
    return math.log((1.0 - sprt.cheat_fail_rate - sprt.cheat_suspicious_rate)
                    / (1.0 - sprt.honest_fail_rate - sprt.honest_suspicious_rate))


def observe(state: EpochEvidence, evidence: Evidence, sprt: SprtParams) -> EpochEvidence:
    """Fold one verdict's outcome into the epoch test.

    A run that accepts "honest" restarts from zero instead of stopping, so an
    executor that behaves early in the epoch and cheats later is still tested
    on the later evidence. The price: each restart is another chance of a
    false accusation, so an epoch's false-accusation rate is at most about
    ``alpha`` times the number of runs (one run takes about
    ``lower / outcome_llr(CLEAN)`` clean verdicts).
    """
    counts = replace(state, observed=state.observed + 1,
                     failed=state.failed + (evidence is Evidence.FAILED),
                     suspicious=state.suspicious + (evidence is Evidence.SUSPICIOUS))
    if state.accused:
        return counts
    lower, upper = sprt_bounds(sprt)
    llr = state.llr + outcome_llr(evidence, sprt)
    if llr >= upper:
        return replace(counts, llr=llr, accused=True)
    if llr <= lower:
        return replace(counts, llr=0.0, accepted_honest=state.accepted_honest + 1)
    return replace(counts, llr=llr)


def epoch_decision(state: EpochEvidence) -> EpochDecision:
    if state.accused:
        return EpochDecision.CHEATING
    if state.accepted_honest > 0:
        return EpochDecision.HONEST
    return EpochDecision.UNDECIDED


def judge_epoch(outcomes: list[Evidence], sprt: SprtParams) -> EpochDecision:
    """The epoch decision for one executor's validated inferences, in validation order."""
    state = EpochEvidence()
    for outcome in outcomes:
        state = observe(state, outcome, sprt)
    return epoch_decision(state)
