"""The detection matrix's statistics: how the ledger's epoch test, and the best aggregate of
the same evidence, turn measured per-inference verdicts and per-position distances into
accusations. No model runs here: everything is resampled from a row's records.

* :func:`accusation_rate` -- the ledger's test (``ledger.epoch_test``) on one epoch, from
  nothing carried: the share of epochs accused.
* :func:`carried_accusations` -- the same test carried across a chain of epochs, as the
  ledger runs it (with the distance run where the model has one): the share of epochs
  accused (honest rows) and, per chain, the epoch of the first accusation (cheats).
* :func:`distance_quantiles` -- the distribution of a row's passing outputs' mean distances,
  per evidence, as the committed matrix keeps it for the simulator (``sim/verdicts.py``).
* :func:`tokens_to_detect` -- the smallest number of checked tokens at which the mean
  per-position distance over them separates a cheat from the honest rows at the
  targets (cheat >= 99 %, honest <= 0.1 %): what the evidence can do at best, whole
  inferences resampled so the correlation between one output's positions is kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from gonka_p2p.inference.verification import Evidence
from gonka_p2p.inference.verification_params import VerificationParams
from gonka_p2p.ledger.distance_test import DistanceTest, inference_llr_micro
from gonka_p2p.ledger.epoch_test import NO_CARRY, Carry, EpochTest, run_epoch_test
from gonka_p2p.ledger.genesis import Params, sprt_params_from_rates
from gonka_p2p.ledger.transactions import to_nano

T = TypeVar("T")
CATCH_TARGET = 0.99  # share of cheating executors (epochs, chains) the aggregate must accuse
HONEST_TARGET = 0.001  # share of honest epochs it may accuse
DISTANCE_QUANTILES = 21  # points of a distance_quantiles table: minimum, every 5 %, maximum
TOKEN_GRID = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def wilson_upper(failures: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson score interval of a proportion."""
    if n == 0:
        return 1.0
    p = failures / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


def ledger_params(params: VerificationParams) -> Params:
    """The integer parameters a genesis derives from ``params``' design rates."""
    return Params(**sprt_params_from_rates(**dataclasses.asdict(params.sprt)))


class Checked(NamedTuple):
    """One checked inference as the ledger's epoch test sees it: its verdict's evidence and, where
    the model has a distance run, its step (``ledger.distance_test.inference_llr_micro``)."""

    evidence: Evidence
    distance_llr: int | None = None


def checked(record: dict, test: DistanceTest | None) -> Checked:
    """A judged matrix record (its verdict's fields merged in) as the ledger sees it: one passing
    check of weight 1 reporting its mean distance, or a failure the dispute upholds."""
    return Checked(Evidence(record["evidence"]), None if test is None else inference_llr_micro(
        test, record["n_tokens"], proven_invalid=not record["valid"],
        passes=[(1, to_nano(record["mean_distance"]))]))


def distance_quantiles(records: Sequence[dict]) -> dict[str, dict]:
    """Per evidence of the passing (valid) judged ``records``, "clean" and "suspicious": how many
    there are and the :data:`DISTANCE_QUANTILES` quantiles of their mean distance in nano-nats
    (the ledger's unit). The committed matrix keeps these, not the records (which stay out of
    git), so the simulator's checks report measured distances to the ledger's distance run."""
    tables = {}
    for evidence in (Evidence.CLEAN, Evidence.SUSPICIOUS):
        nano = [to_nano(r["mean_distance"]) for r in records if r["valid"] and r["evidence"] == evidence]
        if nano:
            points = np.quantile(np.array(nano, dtype=np.float64), np.linspace(0.0, 1.0, DISTANCE_QUANTILES))
            tables[evidence.value] = {"outputs": len(nano), "quantiles": [round(float(x)) for x in points]}
    return tables


def run_ledger_test(epoch: Sequence[Checked], carry: Carry, ledger: Params) -> EpochTest:
    return run_epoch_test([c.evidence.observation for c in epoch], carry, ledger,
                          [c.distance_llr for c in epoch if c.distance_llr is not None])


def accusation_rate(epochs: Iterable[Sequence[Checked]], params: VerificationParams) -> float:
    """Share of ``epochs`` (each one executor's validated verdicts) the ledger's epoch test
    accuses within the epoch, nothing carried in."""
    ledger = ledger_params(params)
    caught = [run_ledger_test(epoch, NO_CARRY, ledger).accused for epoch in epochs]
    return sum(caught) / len(caught)


def carried_accusations(chains: Iterable[list[list[Checked]]],
                        params: VerificationParams) -> tuple[float, list[int | None]]:
    """The ledger's test over each chain of epochs, carrying as the ledger does: (share of all
    epochs accused, per chain the 1-based epoch of its first accusation or None)."""
    ledger = ledger_params(params)
    accused = epochs = 0
    first: list[int | None] = []
    for chain in chains:
        carry, when = NO_CARRY, None
        for number, epoch in enumerate(chain, start=1):
            test = run_ledger_test(epoch, carry, ledger)
            carry = test.carry
            accused += test.accused
            epochs += 1
            if test.accused and when is None:
                when = number
        first.append(when)
    return accused / max(1, epochs), first


def epochs_to_catch(first: Sequence[int | None]) -> int | None:
    """Epochs within which :data:`CATCH_TARGET` of the chains were accused (None: not within
    the chains' length)."""
    caught = sorted(f for f in first if f is not None)
    needed = math.ceil(CATCH_TARGET * len(first))
    return caught[needed - 1] if len(caught) >= needed else None


def resampled_epochs(outcomes: list[T], epoch_size: int, epochs: int, seed: int) -> list[list[T]]:
    """Epochs of ``epoch_size`` verdicts drawn with replacement from measured ones."""
    picks = np.random.default_rng(seed).integers(0, len(outcomes), size=(epochs, epoch_size))
    return [[outcomes[i] for i in epoch] for epoch in picks]


def synthetic_epochs(fail: float, suspicious: float, epoch_size: int, epochs: int,
                     seed: int) -> list[list[Checked]]:
    """Epochs whose verdicts fail / look suspicious independently at the given rates."""
    draws = np.random.default_rng(seed).random((epochs, epoch_size))
    return [[Checked(Evidence.FAILED if x < fail else Evidence.SUSPICIOUS if x < fail + suspicious
                     else Evidence.CLEAN) for x in epoch] for epoch in draws]


# Per-inference outcome rates (failed, suspicious) the epoch test is characterised at.
OPERATING_POINTS = (
    ("honest, design rates", 0.005, 0.01), ("suspicious 10%", 0.0, 0.1),
    ("suspicious 20%", 0.0, 0.2), ("suspicious 30%", 0.0, 0.3), ("suspicious 50%", 0.0, 0.5),
    ("failed 10%", 0.1, 0.0), ("failed 20%", 0.2, 0.0), ("failed 50%", 0.5, 0.0),
)
OPERATING_EPOCH_SIZES = (10, 20, 30, 50)


def operating_characteristic(params: VerificationParams, epochs: int) -> list[list[str]]:
    """Accused share of epochs for synthetic executors: how much per-inference evidence
    the epoch test needs, independent of any model."""
    return [[label, f"{100 * fail:g}%", f"{100 * suspicious:g}%"] + [
        f"{100 * accusation_rate(synthetic_epochs(fail, suspicious, size, epochs, seed=size), params):.2f}%"
        for size in OPERATING_EPOCH_SIZES] for label, fail, suspicious in OPERATING_POINTS]


def pooled_means(records: list[dict], tokens: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``samples`` draws of the mean per-position distance over at least ``tokens`` checked
    tokens: whole inferences drawn with replacement from ``records`` until they hold that
    many tokens (so one output's correlated positions stay together)."""
    sums = np.array([sum(r["position_errors"]) for r in records])
    counts = np.array([len(r["position_errors"]) for r in records])
    per_draw = math.ceil(2 * tokens / counts.mean()) + 4  # short of ``tokens`` ~never: then all of it
    picks = rng.integers(0, len(records), size=(samples, per_draw))
    total_sums, total_counts = np.cumsum(sums[picks], axis=1), np.cumsum(counts[picks], axis=1)
    reached = total_counts >= tokens
    enough = np.where(reached.any(axis=1), np.argmax(reached, axis=1), per_draw - 1)  # first enough prefix
    rows = np.arange(samples)
    return total_sums[rows, enough] / total_counts[rows, enough]


def tokens_to_detect(cheat: list[dict], honest: dict[str, list[dict]], samples: int,
                     seed: int) -> tuple[int | None, float]:
    """The smallest checked-token count of :data:`TOKEN_GRID` at which a threshold on the mean
    per-position distance accuses at most :data:`HONEST_TARGET` of every honest row's
    draws and at least :data:`CATCH_TARGET` of the cheat's; and that threshold (None, inf:
    not within the grid). Records without comparable positions (failed outright) are left
    out: they are caught by the per-inference rules."""
    rng = np.random.default_rng(seed)
    usable = [r for r in cheat if r["position_errors"]]
    honest_usable = [[r for r in rs if r["position_errors"]] for rs in honest.values()]
    for tokens in TOKEN_GRID:
        line = max(float(np.quantile(pooled_means(rs, tokens, samples, rng), 1.0 - HONEST_TARGET))
                   for rs in honest_usable)
        caught = float(np.mean(pooled_means(usable, tokens, samples, rng) > line))
        if caught >= CATCH_TARGET:
            return tokens, line
    return None, math.inf
