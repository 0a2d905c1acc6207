"""The simulator's answers to "is a cheater caught within its epoch?" and "what share of the
network's compute does validation take?": the measures that benchmarks/sim_overhead.py and the
cheat-q10 sweep (benchmarks/results/detection_q10.md) read.

One small run of the ready cheat-q10 scenario: reputations saturate after one clean epoch, so
epoch 2 is checked at the floor alone; the cheater cheats on every request there at a 50 % floor,
so that P(missed) = 0.5^30: the run must catch it in that epoch.
"""

from __future__ import annotations

from sim.metrics import Report
from sim.scenario import load
from sim.sweep import metrics_of
from sim.world import Simulation


def small_run() -> tuple[Simulation, Report]:
    config = load("cheat-q10").config(3, {"network.requests": 300, "behaviour.cheat_fraction": 1.0,
                                          "validation.floor": 0.5})
    simulation = Simulation(config)
    return simulation, simulation.run()


def test_a_cheater_caught_in_the_epoch_it_first_cheats_counts_as_caught_within_it() -> None:
    _, report = small_run()
    [cheater] = [row for row in report.strategies if row.strategy == "int4"]
    assert (cheater.offenders, cheater.caught_within_epoch, cheater.epochs_to_catch) == (1, 1, 0)
    assert metrics_of(report)["caught within its epoch: int4"] == 1.0


def test_validation_share_is_checked_tokens_over_all_compute_and_falls_to_the_floor() -> None:
    simulation, report = small_run()
    shares = report.per_epoch["validation compute share"]
    metrics = simulation.metrics
    for epoch, share in enumerate(shares):
        checked = metrics.validation_compute[epoch]
        assert share == checked / (checked + metrics.inference_compute[epoch])
    assert report.per_epoch["p_validate honest"] == [0.99, 0.99, 0.5]
    assert shares[2] < shares[0] / 2  # newcomers are checked about 4 times, trusted peers 0.7 times
    assert report.network["validation compute share, last epoch"] == shares[2]
