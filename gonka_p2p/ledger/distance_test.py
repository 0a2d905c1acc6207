"""The epoch test's third run: the aggregated distance of an executor's checked outputs.

Theory of operation. The flag run of the epoch test (``epoch_test.py``) counts
outputs a validator marked suspicious: a per-output line above the honest bulk.
A subtle cheat whose outputs sit only a little above honest noise (int8 weights
on a bf16 network with noisy honest executors) crosses that line almost never,
yet its mean distance over a few hundred checked tokens is plainly above the
honest one (``benchmarks/results/detection_matrix.md``, tokens to detect). This
run reads that evidence: each checked output adds a log-likelihood ratio from its
token count and mean distance, a Wald SPRT of "mean per-token distance = the
cheat's" against "= the honest one's" with Gaussian noise of a calibrated
per-token spread, summed into the same carried, restarted run as the other two.

The rule, per output of ``tokens`` checked positions (capped at ``max_tokens``,
the length the calibration measured) and mean distance ``d`` (nano-nats, the
weighted median of the reports of its passing checks that were duties)::

    llr = tokens * clamp(d - mid, -spread, +spread) * llr_per_token // spread

``mid`` is halfway between the honest and the cheating mean, ``llr_per_token``
the Gaussian ratio per token at ``d - mid = spread``. The clamp is what makes it
safe against the two things a Gaussian model gets wrong: a heavy-tailed honest
output (one near-tie flip) moves the run by at most ``tokens * llr_per_token``,
and so does a lying validator's report -- less than the flag run's one
suspicious verdict, so framing gains nothing new. A failed output counts as the
clamp's top; an output a dispute found valid counts nothing.

Per model, because noise is per model and dtype: the genesis pins a
:class:`DistanceTest` beside the model's digest (``model_pins.py``); a model
without one runs no distance test. Integers only; the floats that choose them
are used once, off-chain (:func:`distance_test_from_noise`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

NANO = 1_000_000_000  # nano-nats per nat
MICRO = 1_000_000  # micro-nats per nat
# Bounds a genesis may not exceed (any sane test is far below), so that every product stays a
# small integer and every field packs as a 64-bit msgpack int (the genesis hash).
MAX_PIN_NANO = 10**6 * NANO  # a million nats
MAX_LLR_PER_TOKEN_MICRO = 10 * MICRO
MAX_TOKENS = 2**20
_MAXIMA = {"mid_nano": MAX_PIN_NANO, "spread_nano": MAX_PIN_NANO,
           "llr_per_token_micro": MAX_LLR_PER_TOKEN_MICRO, "max_tokens": MAX_TOKENS}


@dataclass(frozen=True)
class DistanceTest:
    """One model's distance run: where honest and cheating means split, how far an output's
    mean counts, and what one token at that distance is worth."""

    mid_nano: int  # nano-nats; halfway between the honest and the cheating mean distance
    spread_nano: int  # nano-nats; an output's mean counts at most this far from mid
    llr_per_token_micro: int  # micro-nats per token at d - mid = spread
    max_tokens: int  # tokens of one output that count (the calibration's output length)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAXIMA[f.name]:
                raise ValueError(f"{f.name} must be an integer in 1..{_MAXIMA[f.name]}, not {value!r}")

    def to_obj(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_obj(cls, obj: Any) -> DistanceTest:
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, Mapping) or set(obj) != names:
            raise ValueError(f"distance_test must hold exactly {', '.join(sorted(names))}")
        return cls(**{name: obj[name] for name in names})


def output_llr_micro(test: DistanceTest, tokens: int, mean_distance_nano: int) -> int:
    """One passing output's step of the run (see the module docstring), in micro-nats."""
    assert tokens >= 0 and mean_distance_nano >= 0
    offset = min(max(mean_distance_nano - test.mid_nano, -test.spread_nano), test.spread_nano)
    return min(tokens, test.max_tokens) * offset * test.llr_per_token_micro // test.spread_nano


def failed_llr_micro(test: DistanceTest, tokens: int) -> int:
    """A failed output's step: the clamp's top, as far as a passing output can reach."""
    return output_llr_micro(test, tokens, test.mid_nano + test.spread_nano)


def inference_llr_micro(test: DistanceTest, tokens: int, *, proven_invalid: bool,
                        passes: Sequence[tuple[int, int]]) -> int | None:
    """One checked inference's step: the clamp's top if a dispute proved it invalid, else that of
    the weighted median of its passing checks' ``(weight, mean distance nano)``; None (no
    evidence) when nobody with weight passed it."""
    if proven_invalid:
        return failed_llr_micro(test, tokens)
    reports = [(weight, distance) for weight, distance in passes if weight > 0]
    return output_llr_micro(test, tokens, weighted_median(reports)) if reports else None


def weighted_median(reports: Sequence[tuple[int, int]]) -> int:
    """The lower weighted median of ``(weight, value)`` reports: a value that checkers holding
    a weighted majority put at or above it and at or below it, so validators holding less than
    half of an output's passing weight cannot move it past every honest report."""
    assert reports and all(w > 0 for w, _ in reports)
    total, running = sum(w for w, _ in reports), 0
    for weight, value in sorted(reports, key=lambda r: r[1]):
        running += weight
        if 2 * running >= total:
            return value
    raise AssertionError("unreachable: the weights sum to the total")


def distance_test_from_noise(*, honest_mean: float, cheat_mean: float, token_sd: float,
                             max_tokens: int) -> DistanceTest:
    """The integers of the run for honest and cheating mean distances per value (nats) and the
    honest per-token spread (the sd of one output's mean times the square root of its tokens,
    so that the correlation between an output's positions is counted). The clamp is the
    distance between the two means; the ratio at the clamp is Gaussian: delta^2 / sd^2."""
    assert 0 < honest_mean < cheat_mean and token_sd > 0
    delta = cheat_mean - honest_mean
    return DistanceTest(mid_nano=round((honest_mean + cheat_mean) / 2 * NANO), spread_nano=max(1, round(delta * NANO)),
                        llr_per_token_micro=max(1, round(delta * delta / token_sd**2 * MICRO)), max_tokens=max_tokens)
