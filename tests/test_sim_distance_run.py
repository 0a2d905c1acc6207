"""The simulator drives the ledger's distance run (``ledger/distance_test.py``) where the pinned
dtype calibrates one: its genesis pins the run as ``gonka-p2p init`` does, and a passing check
reports a mean distance drawn from what the detection matrix measured for that strategy. So a
subtle cheat that only the distance run sees (the tiny model's int8 at bf16: no output of it
fails or looks suspicious) is caught in the simulator as on a real ledger, and is not without
the run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gonka_p2p.inference.verification_params import thresholds_table
from gonka_p2p.ledger.devnet import distance_tests
from sim.config import SimConfig
from sim.verdicts import DistanceSample, Outcome, load_matrix, pinned_distance_test, table_for
from sim.world import simulate

MATRIX = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "detection_matrix.json"


def test_a_bf16_table_carries_measured_distances_and_pins_the_shipped_run() -> None:
    bf16 = table_for("matrix", "tiny-llama", "bfloat16")
    honest, int8 = bf16.rates["honest"].distances, bf16.rates["int8"].distances
    assert Outcome.CLEAN in honest and Outcome.CLEAN in int8
    # the int8 cheat's distances sit above the honest ones: the evidence the run adds up
    assert _median(int8[Outcome.CLEAN]) > 1.1 * _median(honest[Outcome.CLEAN])
    assert pinned_distance_test(bf16, "bfloat16") == distance_tests(
        thresholds_table(), {"tiny-llama": "bfloat16"})["tiny-llama"]
    # fp32 rows keep no distances (the ledger runs no distance test there); the design table has none
    assert pinned_distance_test(table_for("matrix", "tiny-llama", "float32"), "float32") is None
    assert pinned_distance_test(table_for("design"), "bfloat16") is None


def test_a_strategy_the_matrix_did_not_measure_reports_honest_distances() -> None:
    """fp16 is no row at bf16: the run is credited with nothing that was not measured."""
    bf16 = table_for("matrix", "smollm2-135m", "bfloat16")
    assert bf16.rates["fp16"].source == "design"
    assert bf16.rates["fp16"].distances[Outcome.CLEAN] == bf16.rates["honest"].distances[Outcome.CLEAN]


def test_distance_draws_follow_the_quantiles_in_proportion_to_each_rows_outputs() -> None:
    low = tuple(range(0, 2100, 100))  # 21 quantiles, uniform on [0, 2000]
    high = tuple(range(10_000, 12_100, 100))
    sample = DistanceSample(((300, low), (100, high)))
    rng = random.Random(5)
    draws = [sample.draw(rng) for _ in range(40_000)]
    assert all(0 <= d <= 2000 or 10_000 <= d <= 12_000 for d in draws)
    assert abs(sum(d >= 10_000 for d in draws) / len(draws) - 0.25) < 0.01
    lows = [d for d in draws if d <= 2000]
    for quantile in (500, 1000, 1500):
        assert abs(sum(d < quantile for d in lows) / len(lows) - quantile / 2000) < 0.015
    assert sample.draw(random.Random(9)) == sample.draw(random.Random(9))  # replays from its seed


def test_a_failed_check_reports_no_drawn_distance() -> None:
    rates = table_for("matrix", "tiny-llama", "bfloat16").rates["honest"]
    assert rates.draw_distance(Outcome.FAILED, random.Random(1)) is None
    assert rates.draw_distance(Outcome.CLEAN, random.Random(1)) is not None


@pytest.mark.parametrize("table", [
    {"outputs": 0, "quantiles": [1, 2]},
    {"outputs": 5, "quantiles": [3]},
    {"outputs": 5, "quantiles": [3, 2]},
    {"outputs": 5, "quantiles": [-1, 2]},
    {"outputs": 5, "quantiles": [1.5, 2]},
    {"outputs": 5, "quantiles": [1, 10**16]},  # past the ledger's cap on a distance
    [1, 2],
])
def test_a_malformed_distance_table_is_refused_by_name(tmp_path: Path, table: object) -> None:
    doc = json.loads(MATRIX.read_text())
    target = next(r for r in doc["rows"] if "distance_quantiles_nano" in r)
    target["distance_quantiles_nano"]["clean"] = table
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"row '{target['row']}' .* malformed clean distance table"):
        load_matrix(path, target["model"], target["dtype"])


@pytest.mark.parametrize("seed", [1, 2])
def test_a_cheat_only_the_distance_run_sees_is_caught_in_the_simulator_and_not_without_it(seed: int) -> None:
    """The tiny model's int8 at bf16: 0 % of its outputs fail or look suspicious (the matrix),
    so only the distance run over its reported distances can catch it."""
    reports = {}
    for distance_run in (True, False):
        simulation, reports[distance_run] = simulate(SimConfig(
            seed=seed, peers=12, epochs=8, requests=150, epoch_blocks=50, churn=0.0, mix={"int8": 1},
            cheat_from=0, matrix_dtype="bfloat16", matrix_model="tiny-llama", distance_run=distance_run))
        assert bool(simulation.genesis.models) is distance_run
    rows = {run: {r.strategy: r for r in report.strategies} for run, report in reports.items()}
    assert rows[True]["int8"].sanctioned_epochs >= 1 and rows[False]["int8"].sanctioned_epochs == 0
    assert rows[True]["honest"].sanctioned_epochs == rows[False]["honest"].sanctioned_epochs == 0


def _median(sample: DistanceSample) -> float:
    """The pooled sample's median, from 4,001 seeded draws."""
    rng = random.Random(0)
    return sorted(sample.draw(rng) for _ in range(4001))[2000]
