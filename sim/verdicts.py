"""What a validator's check says about an executor's work, without running a model.

The simulator skips the model: the verdict of a check is drawn from a
per-strategy distribution over three outcomes -- failed, valid but
suspicious, clean -- which is exactly what the ledger's epoch test reads
(``rules.inference_observation``). The rates come from the measured
detection matrix (``benchmarks/results/detection_matrix.json``): a row's
``rejected`` is the per-inference failure rate and its ``suspicious`` the
share of valid-but-suspicious verdicts, each pooled over the row's sampling
modes for one model. The fp32 rows measure no suspicious share (at fp32 every
cheat fails outright), so there that share comes from the built-in
:data:`DESIGN_RATES` table, which also supplies both rates for any strategy
the matrix lacks (or all of them: ``--verdicts design``, the targets of
DESIGN.md section 4, whose honest 0.5 % false-failure rate makes false
accusations happen at all).

Modelling assumption, stated because results depend on it: a check is a
deterministic re-run over the executor's committed evidence, so the verdict
is drawn once per inference (a property of the output) and every diligent
checker and dispute voter reports the same one -- so an honest output that
fails is failed by its dispute committee too. ``--independent-checks``
draws every check and vote afresh instead (honest failures as noise between
machines, which a committee overturns). A colluding validator reports
"clean" for its partner whatever the evidence.

Distances. Where the pinned dtype's thresholds calibrate a distance run
(``ledger/distance_test.py``; bf16), the ledger also reads each passing
check's mean distance. The matrix keeps, per row and sampling mode, the
quantiles of its passing outputs' mean distances per outcome
(``distance_quantiles_nano``), and a drawn clean or suspicious verdict reports
a distance drawn from its strategy's (a matrix row in proportion to its
outputs, then between that row's quantiles). A strategy the matrix measured no
distances for reports the honest ones: the simulator credits the distance run
with nothing that was not measured. The matrix's outputs are at most 32 tokens
long, the length the shipped runs count an output as at most; a simulated
output shorter than that (the simulator's are 16-128 tokens) reports a
32-token output's distance, whose spread is narrower than a real short
output's -- a stated approximation, small beside the clamp of each step.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gonka_p2p.inference.verification_params import thresholds_table
from gonka_p2p.ledger.devnet import distance_tests
from gonka_p2p.ledger.distance_test import DistanceTest
from gonka_p2p.ledger.transactions import MAX_DISTANCE_NANO, FailureFlag, VerdictStats

DEFAULT_MATRIX = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "detection_matrix.json"
DEFAULT_VAL_OVER_GEN = 0.4  # validation prefill / generation compute, when the matrix has no timing


class Outcome(StrEnum):
    CLEAN = "clean"
    SUSPICIOUS = "suspicious"
    FAILED = "failed"


@dataclass(frozen=True)
class DistanceSample:
    """Mean distances (nano-nats) measured on one strategy's passing outputs of one outcome:
    per matrix row, how many outputs it had and their quantiles, minimum to maximum."""

    tables: tuple[tuple[int, tuple[int, ...]], ...]

    def draw(self, rng: random.Random) -> int:
        """One output's distance: a row in proportion to its outputs, then a uniform point of
        its distribution, linear between quantiles."""
        x = rng.random() * sum(outputs for outputs, _ in self.tables)
        for outputs, quantiles in self.tables:
            if x < outputs:
                break
            x -= outputs
        at = rng.random() * (len(quantiles) - 1)
        i = min(int(at), len(quantiles) - 2)
        return round(quantiles[i] + (quantiles[i + 1] - quantiles[i]) * (at - i))


NO_DISTANCES: MappingProxyType[Outcome, DistanceSample] = MappingProxyType({})


@dataclass(frozen=True)
class Rates:
    """Per-inference outcome rates of one executor strategy; the rest is clean."""

    failed: float
    suspicious: float  # of all inferences (a failed one is never suspicious)
    flag: FailureFlag  # the metric rule a failure of this strategy trips
    source: str  # "matrix" or "design": where ``failed`` came from (``suspicious`` too, where measured)
    distances: MappingProxyType[Outcome, DistanceSample] = field(default_factory=lambda: NO_DISTANCES)  # per pass

    def draw(self, rng: random.Random) -> Outcome:
        x = rng.random()
        if x < self.failed:
            return Outcome.FAILED
        return Outcome.SUSPICIOUS if x < self.failed + self.suspicious else Outcome.CLEAN

    def draw_distance(self, outcome: Outcome, rng: random.Random) -> int | None:
        """A passing check's reported mean distance (None: a failure, or nothing measured)."""
        sample = self.distances.get(outcome) if outcome is not Outcome.FAILED else None
        return None if sample is None else sample.draw(rng)


# DESIGN.md section 4's targets: honest <= 0.5 % rejected; gross cheats >= 99 % rejected per
# inference; subtle cheats mostly pass but look suspicious, caught by the epoch test.
DESIGN_RATES: MappingProxyType[str, Rates] = MappingProxyType({
    "honest": Rates(0.005, 0.01, FailureFlag.DISTANCE, "design"),
    "int4": Rates(0.99, 0.01, FailureFlag.DISTANCE, "design"),
    "prefill": Rates(0.99, 0.0, FailureFlag.SAMPLING, "design"),
    "small-model": Rates(0.995, 0.005, FailureFlag.TOP_K, "design"),
    "int8": Rates(0.02, 0.4, FailureFlag.DISTANCE, "design"),
    "bf16": Rates(0.02, 0.3, FailureFlag.DISTANCE, "design"),
    "fp16": Rates(0.02, 0.3, FailureFlag.DISTANCE, "design"),
    "fp8": Rates(0.02, 0.4, FailureFlag.DISTANCE, "design"),
    "fabricated": Rates(0.99, 0.0, FailureFlag.DISTANCE, "design"),
    "truncated": Rates(0.99, 0.0, FailureFlag.LENGTH, "design"),
    "altered": Rates(0.99, 0.0, FailureFlag.SAMPLING, "design"),
    "fewer-tokens": Rates(0.99, 0.0, FailureFlag.LENGTH, "design"),
    "wrong-temperature": Rates(0.99, 0.0, FailureFlag.SAMPLING, "design"),
    "stated-temperature": Rates(0.99, 0.0, FailureFlag.OTHER, "design"),
    "stated-top-k": Rates(0.99, 0.0, FailureFlag.OTHER, "design"),
    "stated-top-p": Rates(0.99, 0.0, FailureFlag.OTHER, "design"),
    "steering": Rates(0.99, 0.0, FailureFlag.OTHER, "design"),
})


@dataclass(frozen=True)
class VerdictTable:
    """Outcome rates per executor strategy, and the cost of a check relative to generating."""

    rates: MappingProxyType[str, Rates]
    val_over_gen: float
    model: str  # the matrix model the rates were measured on ("" for the design table)

    def outcome(self, strategy: str, rng: random.Random) -> Outcome:
        return self.rates[strategy].draw(rng)


def design_table() -> VerdictTable:
    return VerdictTable(DESIGN_RATES, DEFAULT_VAL_OVER_GEN, "")


def table_for(source: str, model: str = "", dtype: str = "float32", path: str = "") -> VerdictTable:
    """The verdict table a scenario names: ``"design"``, or ``"matrix"`` (``path``: "" for the
    committed matrix; ``model``: "" for its model with most rows; ``dtype``: the pinned dtype
    whose rows count)."""
    if source == "design":
        return design_table()
    return load_matrix(Path(path) if path else DEFAULT_MATRIX, model or None, dtype)


def load_matrix(path: Path = DEFAULT_MATRIX, model: str | None = None, dtype: str = "float32") -> VerdictTable:
    """Failure rates measured per strategy for ``model`` (default: the model with most rows) at
    the pinned ``dtype``, and suspicious shares where every row of the strategy measured one
    (else from :data:`DESIGN_RATES`); a strategy the matrix has no row for there keeps its
    design rates (the table says which: ``source``). Raises ValueError on a file of another
    shape, or one without ``model`` at ``dtype``."""
    doc: Any = json.loads(Path(path).read_text())
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: no 'rows' list: not a detection matrix")
    models = sorted({str(r.get("model")) for r in rows})
    if model is None:
        model = max(models, key=lambda m: sum(r.get("model") == m for r in rows))
    if model not in models:
        raise ValueError(f"{path} has no rows for model {model!r} (it has {', '.join(models)})")
    # strategy -> [inferences, rejected, val seconds, gen seconds, suspicious, inferences with a suspicious share]
    pooled: dict[str, list[float]] = {}
    measured: dict[str, dict[Outcome, list[tuple[int, tuple[int, ...]]]]] = {}  # strategy -> distance tables
    for row in rows:
        if row.get("model") != model or row.get("dtype", "float32") != dtype:
            continue
        strategy = "honest" if row.get("class") == "honest" else str(row.get("row"))
        n = float(row["n"])
        acc = pooled.setdefault(strategy, [0.0] * 6)
        acc[0] += n
        acc[1] += n * float(row["rejected"])
        acc[2] += n * float(row.get("val_s", 0.0))
        acc[3] += n * float(row.get("gen_s", 0.0))
        if isinstance(suspicious := row.get("suspicious"), (int, float)):
            acc[4] += n * float(suspicious)
            acc[5] += n
        for outcome, table in _distance_tables(row, path).items():
            measured.setdefault(strategy, {}).setdefault(outcome, []).append(table)
    if "honest" not in pooled:
        raise ValueError(f"{path} has no {dtype} rows for model {model!r}")
    honest_distances = _samples(measured.get("honest", {}), {})
    rates = dict(DESIGN_RATES)
    for strategy, design in DESIGN_RATES.items():
        if strategy in pooled:
            n, rejected, _, _, suspicious, shares = pooled[strategy]
            failed = rejected / n
            share = suspicious / n if shares == n else design.suspicious
            rates[strategy] = Rates(failed, min(share, 1.0 - failed), design.flag, "matrix",
                                    _samples(measured.get(strategy, {}), honest_distances))
        elif honest_distances:
            rates[strategy] = dataclasses.replace(design, distances=honest_distances)
    honest = pooled.get("honest")
    ratio = honest[2] / honest[3] if honest and honest[3] > 0 else DEFAULT_VAL_OVER_GEN
    return VerdictTable(MappingProxyType(rates), ratio, model)


def _distance_tables(row: dict, path: Path) -> dict[Outcome, tuple[int, tuple[int, ...]]]:
    """A matrix row's ``distance_quantiles_nano`` as (outputs, quantiles) per passing outcome;
    a table of another shape is a ValueError (a hand-edited file), not a wrong draw."""
    tables = {}
    given = row.get("distance_quantiles_nano", {})
    for outcome in (Outcome.CLEAN, Outcome.SUSPICIOUS):
        entry = given.get(outcome.value) if isinstance(given, dict) else given
        if entry is None:
            continue
        outputs, quantiles = (entry.get("outputs"), entry.get("quantiles")) if isinstance(entry, dict) else (0, [])
        if not (isinstance(outputs, int) and outputs > 0 and isinstance(quantiles, list) and len(quantiles) >= 2
                and all(isinstance(q, int) and 0 <= q <= MAX_DISTANCE_NANO for q in quantiles)
                and quantiles == sorted(quantiles)):
            raise ValueError(f"{path}: row {row.get('row')!r} ({row.get('mode')}) has a malformed "
                             f"{outcome.value} distance table")
        tables[outcome] = (outputs, tuple(quantiles))
    return tables


def _samples(tables: dict[Outcome, list[tuple[int, tuple[int, ...]]]],
             fallback: Mapping[Outcome, DistanceSample]) -> MappingProxyType[Outcome, DistanceSample]:
    """One strategy's distance samples per passing outcome; an outcome it measured none of
    reports ``fallback``'s (the honest strategy's), or failing that its clean one."""
    own = {outcome: DistanceSample(tuple(t)) for outcome, t in tables.items()}
    merged = {o: own.get(o) or fallback.get(o) or own.get(Outcome.CLEAN) or fallback.get(Outcome.CLEAN)
              for o in (Outcome.CLEAN, Outcome.SUSPICIOUS)}
    return MappingProxyType({o: sample for o, sample in merged.items() if sample is not None})


def pinned_distance_test(table: VerdictTable, dtype: str) -> DistanceTest | None:
    """The distance run a network pinned at ``dtype`` runs for ``table``'s model, as
    ``gonka-p2p init`` pins it from the package's thresholds; None where they calibrate none
    there, or where the table measured no honest distances for the checks to report."""
    if not table.model or not table.rates["honest"].distances:
        return None
    return distance_tests(thresholds_table(), {table.model: dtype}).get(table.model)


def verdict_stats_for(outcome: Outcome, flag: FailureFlag, n_tokens: int,
                      mean_distance_nano: int | None = None) -> VerdictStats:
    """The ledger's encoding of a drawn outcome. The ledger reads ``valid``, ``suspicious``,
    the flags and, where the model's pin has a distance run, a pass's ``mean_distance_nano``:
    a drawn one, or (None) a nominal one, as what a failure reports is never read."""
    if outcome is Outcome.FAILED:
        return VerdictStats(valid=False, suspicious=False, failure_flags=int(flag), n_tokens=n_tokens,
                            mean_distance_nano=100_000_000, max_distance_nano=1_000_000_000,
                            top_k_misses=n_tokens // 2, sampling_mismatches=0)
    suspicious = outcome is Outcome.SUSPICIOUS
    mean = (25_000 if suspicious else 1_000) if mean_distance_nano is None else mean_distance_nano
    return VerdictStats(valid=True, suspicious=suspicious, failure_flags=0, n_tokens=n_tokens,
                        mean_distance_nano=mean, max_distance_nano=max(mean, 200_000 if suspicious else 10_000),
                        top_k_misses=0, sampling_mismatches=0)
