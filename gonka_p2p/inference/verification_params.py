"""The verification metric's parameters: thresholds per model and pinned dtype, the epoch
test's design rates, the file that records them, and the tolerances derived from them.

Apart from the metric (``verification``), which judges by them: a network pins them in its
genesis and the calibration tooling writes them, neither of which needs the metric's tensors.
Pure but for :func:`load_verification_params` (and :func:`thresholds_table`), which read the file.
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DTYPES

# ---------------------------------------------------------------------------
# Parameters


def _unit(unit: str, default: Any = MISSING) -> Any:
    """A threshold's declaration with its unit (written beside it in ``thresholds.toml``)."""
    return field(default=default, metadata={"unit": unit})


OPTIONAL_NOISE = ("cut_noise", "tie_noise", "greedy_noise")  # widths calibrated at bf16 only
DISTANCE_RUN = ("honest_distance", "distance_noise", "distance_tokens")  # the ledger's distance run: all or none


@dataclass(frozen=True)
class ModelThresholds:
    """Per-model verification thresholds, each positive and finite. Units: nats (natural-log probability)."""

    logprob_tolerance: float = _unit(
        "nats; per single logprob, and the near-tie width of the sampling and top-k checks")
    max_mean_distance: float = _unit(
        "nats; mean |claimed - recomputed| logprob over one output's positions and k+1 values")
    suspicious_mean_distance: float = _unit(
        "nats; valid outputs above it count as suspicious in the epoch test")
    reference_tokens: int = _unit(
        "tokens; output length the mean limits hold at (shorter outputs: wider, see mean_limit)")
    cut_noise: float | None = _unit(  # None: logprob_tolerance (float32, where that is tight)
        "nats; logprob noise that may carry a token across a top-k/top-p cut (its near-tie width)", None)
    tie_noise: float | None = _unit(  # None: logprob_tolerance (float32, where that is tight)
        "nats; logprob noise that may move a sampled token's CDF boundary (its near-tie width)", None)
    greedy_noise: float | None = _unit(  # None: logprob_tolerance (float32, where that is tight)
        "nats; logprob noise that may swap the top two tokens (half the greedy near-tie width)", None)
    # The ledger's distance run (ledger/distance_test.py); None: the network runs none for the model.
    honest_distance: float | None = _unit(
        "nats; the worst honest configuration's mean distance per value (the distance run's honest mean)", None)
    distance_noise: float | None = _unit(
        "nats; the honest mean distance's spread per token: sd of one output's mean x sqrt(its tokens)", None)
    distance_tokens: int | None = _unit(
        "tokens; the longest output that spread was measured on (a longer one counts as this long)", None)

    @property
    def cut_noise_nats(self) -> float:
        return self.logprob_tolerance if self.cut_noise is None else self.cut_noise

    @property
    def tie_noise_nats(self) -> float:
        return self.logprob_tolerance if self.tie_noise is None else self.tie_noise

    @property
    def greedy_noise_nats(self) -> float:
        return self.logprob_tolerance if self.greedy_noise is None else self.greedy_noise

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in OPTIONAL_NOISE + DISTANCE_RUN:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{f.name} must be positive, not {value!r}")
        if self.suspicious_mean_distance > self.max_mean_distance:
            raise ValueError("suspicious_mean_distance must not exceed max_mean_distance")
        if len({getattr(self, name) is None for name in DISTANCE_RUN}) > 1:
            raise ValueError(f"{', '.join(DISTANCE_RUN)} go together (the distance run needs all)")

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
    """The design rates of the ledger's epoch test (two Bernoulli SPRTs), each a probability
    in (0, 1) per validated inference.

    The failure test watches "failed" verdicts, the distance test "failed or
    suspicious" ones (a failed output is at least as far from the model as a
    suspicious one). ``honest_*`` are upper bounds above the rates measured for
    honest executors; ``cheat_*`` describe the weakest cheat each test is
    designed to catch within an epoch. ``alpha`` and ``beta`` are the error
    rates of one Wald run: honest accused, cheat cleared.
    """

    honest_fail_rate: float = _unit("probability per inference that an honest output fails (upper bound)", 0.005)
    cheat_fail_rate: float = _unit("probability per inference that the weakest targeted cheat fails", 0.1)
    honest_suspicious_rate: float = _unit(
        "probability per inference that an honest output fails or is suspicious (upper bound)", 0.01)
    cheat_suspicious_rate: float = _unit(
        "probability per inference that the weakest targeted cheat fails or is suspicious", 0.3)
    alpha: float = _unit("probability that one Wald run accuses an honest executor", 1e-4)
    beta: float = _unit("probability that one Wald run accepts a cheat as honest", 0.01)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{f.name} must be a probability in (0, 1), not {value!r}")
        if (self.cheat_fail_rate <= self.honest_fail_rate
                or self.cheat_suspicious_rate <= self.honest_suspicious_rate):
            raise ValueError("a cheat must fail and look suspicious more often than an honest executor")


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


def verification_params_from_obj(obj: Mapping[str, Any],
                                 dtypes: Mapping[str, str] = MappingProxyType({})) -> VerificationParams:
    """The record of a parsed thresholds table, each model at the dtype ``dtypes`` pins (noise,
    so every threshold, depends on it): a model's table holds its DEFAULT_DTYPE values, a
    sub-table per other dtype that dtype's (``[models."m".bfloat16]``); a model pinned at an
    uncalibrated dtype is a ValueError. ``calibration`` tables are not read."""
    if unknown := set(obj) - {"sprt", "models"}:
        raise ValueError(f"unknown top-level keys in thresholds: {sorted(unknown)}")
    models = {}
    for name, table in obj.get("models", {}).items():
        dtype = dtypes.get(name, DEFAULT_DTYPE)
        where = f"models.{name}" + ("" if dtype == DEFAULT_DTYPE else f".{dtype}")
        chosen = table if dtype == DEFAULT_DTYPE else table.get(dtype, {})
        values = {k: v for k, v in chosen.items() if k not in ("calibration", *DTYPES)}
        models[str(name)] = ModelThresholds(**_known(ModelThresholds, values, where))
    sprt = SprtParams(**_known(SprtParams, {k: float(v) for k, v in obj.get("sprt", {}).items()}, "sprt"))
    return VerificationParams(models=models, sprt=sprt)


def _known(record: type, values: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """``values`` if they are all fields of ``record`` and none is missing, else a ValueError
    that names them (instead of a TypeError from the constructor)."""
    names = {f.name for f in fields(record)}
    defaults = {f.name for f in fields(record) if f.default is not MISSING}
    if unknown := set(values) - names:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if missing := names - defaults - set(values):
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    return values


def thresholds_table(path: Path | None = None) -> dict[str, Any]:
    """The parsed thresholds file: ``path``, or the calibrated ``thresholds.toml`` shipped
    with this package (what ``gonka-p2p init`` pins in a new network's genesis)."""
    return tomllib.loads(resources.files("gonka_p2p.inference").joinpath("thresholds.toml").read_text()
                         if path is None else Path(path).read_text())


def load_verification_params(path: Path | None = None,
                             dtypes: Mapping[str, str] = MappingProxyType({})) -> VerificationParams:
    """:func:`verification_params_from_obj` of :func:`thresholds_table`."""
    return verification_params_from_obj(thresholds_table(path), dtypes)


def cut_tolerance(thresholds: ModelThresholds, temperature: float) -> float:
    """How far outside the top-k/top-p cut a claimed token may lie, in ``sampler``'s cut unit
    (the relative change of the weights that would keep it): noise of ``cut_noise`` nats on
    every logprob moves any ratio of weights, or of sums of weights, by at most
    ``exp(2 cut_noise / T)``; saturated at 1 as :func:`tie_tolerance` is. Greedy has no cut."""
    return 0.0 if temperature == 0.0 else _moved_by(thresholds.cut_noise_nats, temperature)


def tie_tolerance(thresholds: ModelThresholds, temperature: float) -> float:
    """How far from the sampler's choice a claimed token may be, in ``check_token``'s unit.

    Noise of at most ``eps`` nats on every logprob can close a greedy gap of
    up to ``2 eps`` nats (one value up, the other down): greedy takes
    ``greedy_noise``. At temperature T noise of ``eps`` scales every
    probability by at most ``exp(+-2 eps / T)``, so every CDF value, which is at
    most 1, moves by at most ``expm1(2 eps / T)``; and by at most 1 in any case,
    where the bound saturates (at a temperature far below ``eps`` the exponent
    would overflow: a client may ask for T = 1e-300). Sampled requests take
    ``tie_noise``: at bf16 the single-logprob tolerance is set by the noise of
    tail logprobs (2.25 nats on SmolLM2), which moves no CDF boundary by much,
    and it would saturate the bound -- every token a near-tie, the pre-fill
    attack passing every plain T = 1 request. Greedy, likewise: that tolerance let a
    pre-filled token within 4.5 nats of SmolLM2's top pass, where honest bf16 noise
    closed at most 0.375.
    """
    return _tie_width(thresholds, temperature, 1.0)


def _tie_width(thresholds: ModelThresholds, temperature: float, share: float) -> float:
    """The near-tie width for noise of ``share`` x the calibrated noise (greedy: ``greedy_noise``
    on each of two logprobs; sampled: ``tie_noise``, see :func:`tie_tolerance`)."""
    if temperature == 0.0:
        return 2.0 * thresholds.greedy_noise_nats * share
    return _moved_by(thresholds.tie_noise_nats * share, temperature)


def _moved_by(noise: float, temperature: float) -> float:
    """``expm1(2 noise / T)``, the most noise of ``noise`` nats on every logprob moves a share
    of the weights at temperature T, saturated at 1 (see :func:`tie_tolerance`)."""
    exponent = 2.0 * noise / temperature
    return 1.0 if exponent >= math.log(2.0) else math.expm1(exponent)


# ---------------------------------------------------------------------------
# Wide near-ties: what a cheat that stays inside the width leaves behind

CALIBRATION_MARGIN = 3.0  # every threshold is this many times the honest noise its calibration measured
# The weakest cheat the ledger's distance run is designed for: its mean distance this share above the
# honest one (measured int8 at bf16: 17-34 % above the worst honest row; detection_matrix.md). 0.2 made
# the run's steps large enough that honest SmolLM2 vLLM outputs' heavy tail was accused in 0.065 % of
# carried epochs; at 0.15 none of 20,000 per row (benchmarks/results/detection_distance_run.md).
CHEAT_DISTANCE_EXCESS = 0.15
HONEST_WIDE_TIE_RATE = 1e-3  # per position, an upper bound (measured at bf16: 5 in 87,747)
WIDE_TIE_TAIL = 0.005  # chance an honest output is suspicious for its wide ties (half honest_suspicious_rate)


def wide_tie_floor(thresholds: ModelThresholds, temperature: float) -> float:
    """The widest near-tie honest noise made in calibration, in ``check_token``'s unit: the
    near-tie width (:func:`tie_tolerance`) without its calibration margin.

    A claim past it but inside the width passes -- noise the calibration did not see might
    still have made it -- yet counts as a *wide tie*. The width must hold every honest
    executor's worst position, which leaves a cheat room: a wrong temperature (0.7 for 1.0 on
    SmolLM2 at bf16) moves a tenth of its tokens by more than honest noise ever did, and
    less than the width. One output's count of wide ties is the evidence (:func:`wide_tie_limit`).
    """
    return _tie_width(thresholds, temperature, 1.0 / CALIBRATION_MARGIN)


@functools.cache
def wide_tie_limit(n_tokens: int) -> int:
    """The fewest wide ties that make an ``n_tokens`` output suspicious: the smallest k with
    P(Binomial(n_tokens, HONEST_WIDE_TIE_RATE) >= k) <= WIDE_TIE_TAIL, so an honest output
    crosses it at most that often at any length (2 at 32 tokens, 5 at 1,000). Summed in log
    space: at a length where (1 - rate)^n underflows the terms must still grow."""
    log_ratio = math.log(HONEST_WIDE_TIE_RATE) - math.log1p(-HONEST_WIDE_TIE_RATE)
    log_pmf = n_tokens * math.log1p(-HONEST_WIDE_TIE_RATE)  # P(X = 0)
    tail, k = 1.0 - math.exp(log_pmf), 1  # P(X >= 1)
    while tail > WIDE_TIE_TAIL:
        log_pmf += math.log((n_tokens - k + 1) / k) + log_ratio  # P(X = k)
        tail -= math.exp(log_pmf)
        k += 1
    return k
