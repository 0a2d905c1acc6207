"""Proof of compute in the simulator (sim.poc): the real ledger rules judge simulated provers.

An overclaimer is caught in nearly every round (1 - (1/k)^sample size), a joiner holds
weight from the epoch after its first round, a leaver loses it by bounded steps, a
renter loses the weight its confirmation round does not confirm, weight follows compute,
no one's voting power passes the cap, and a seed replays byte for byte.

Runs are small (8-10 peers, 50-block epochs, few requests) so the file stays fast; a
failing case names its seed in the config it prints.
"""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console

from gonka_p2p.ledger.rules import PPM
from sim.command import list_scenarios
from sim.config import SimConfig
from sim.metrics import Report
from sim.roster import Peer, Strategy
from sim.scenario import load
from sim.world import Simulation, simulate

SMALL = dict(peers=8, epochs=5, requests=20, epoch_blocks=50, churn=0.0, proof_of_compute=True)


def small(seed: int, **overrides: object) -> SimConfig:
    return SimConfig(seed=seed, **{**SMALL, **overrides})  # type: ignore[arg-type]


def weights(simulation: Simulation, peer: Peer) -> list[int]:
    """``peer``'s ledger weight at each simulated epoch's start."""
    assert simulation.poc is not None
    return simulation.poc.weights[peer.peer_id]


def playing(simulation: Simulation, role: str) -> list[Peer]:
    assert simulation.poc is not None
    return [p for p in simulation.roster.peers if simulation.poc.roles[p.peer_id] == role]


@pytest.fixture(scope="module")
def churn() -> tuple[Simulation, Report]:
    """One joiner at epoch 1, one leaver at epoch 2, an overclaimer and a renter."""
    return simulate(small(5, joiners=1, join_epoch=1, leavers=1, leave_epoch=2,
                          mix={"poc-overclaim": 1, "poc-renter": 1}))


def test_overclaimer_k2_is_caught_in_99_percent_of_rounds() -> None:
    caught: list[bool] = []  # per overclaiming commitment: did a majority fail it?
    for seed in range(1, 5):
        simulation, report = simulate(small(seed, requests=0, mix={"poc-overclaim": 2}, overclaim=2.0))
        assert simulation.poc is not None
        caught += [c for _, c in simulation.poc.overclaims]
        assert report.network["poc: honest commitments failed"] == 0, simulation.config
        assert report.rejected_txs == {}, simulation.config
        for cheat in playing(simulation, "poc-overclaim"):
            assert weights(simulation, cheat)[1:] == [0] * (simulation.config.epochs - 1), simulation.config
    assert len(caught) >= 8 and sum(caught) >= 0.99 * len(caught)


def test_a_joiner_gains_weight_the_epoch_after_its_first_round(churn) -> None:
    simulation, _ = churn
    (joiner,) = playing(simulation, "joiner")
    w = weights(simulation, joiner)
    assert w[:2] == [0, 0] and all(w[2:])
    compute = joiner.capacity * simulation.params.poc_compute_blocks
    assert abs(w[2] - compute) <= 0.1 * compute  # its proven nonces, within the per-round noise
    assert simulation.chain.state.participant(joiner.peer_id) is not None


def test_a_leaver_loses_its_weight_from_the_next_round_by_the_bounded_step(churn) -> None:
    """It leaves at epoch 2, so the round of epoch 2 (which sets epoch 3's weights) is its first
    missed; it holds less than the shift bound of the total here, so that one round takes it all."""
    simulation, _ = churn
    (leaver,) = playing(simulation, "leaver")
    w = weights(simulation, leaver)
    total = sum(ws[2] for ws in simulation.poc.weights.values())  # type: ignore[union-attr]
    assert w[2] * PPM <= total * simulation.params.max_weight_shift_ppm, (w, total)
    assert all(w[:3]) and w[3:] == [0, 0]


def test_a_renter_keeps_only_the_weight_its_own_hardware_confirms(churn) -> None:
    """Renting rent_factor x its hardware for the regular window: each epoch's confirmation shows
    its own rate, so its weight is what its own hardware proves (within the per-round noise),
    never the rented claim, and it forfeits every such epoch's reward."""
    simulation, report = churn
    (renter,) = playing(simulation, "poc-renter")
    own = renter.capacity * simulation.params.poc_compute_blocks
    w = weights(simulation, renter)
    held = [e for e in range(1, len(w)) if w[e]]
    assert held and all(w[e] <= 1.1 * own for e in held)
    assert all(renter.name in report.poc["unconfirmed"][str(e - 1)] for e in held)  # type: ignore[index]


def test_weight_follows_compute_and_voting_power_stays_under_the_cap(churn) -> None:
    simulation, report = churn
    assert float(report.network["poc: fair max |weight share / compute share - 1|"]) <= 0.15
    cap = simulation.params.voting_power_cap_ppm / PPM
    assert max(report.poc["max voting power share"]) <= cap  # type: ignore[arg-type]
    assert report.rejected_txs == {}


def test_same_seed_replays_byte_for_byte(churn) -> None:
    simulation, report = churn
    _, again = simulate(simulation.config)
    assert again.to_json() == report.to_json() and again.digest == report.digest
    _, other = simulate(small(6, joiners=1, join_epoch=1, leavers=1, leave_epoch=2,
                              mix={"poc-overclaim": 1, "poc-renter": 1}))
    assert other.digest != report.digest


def test_the_poc_churn_scenario_is_ready_and_listed() -> None:
    config = load("poc-churn").config(1)
    assert config.proof_of_compute and config.joiners and config.leavers
    assert config.strategy_mix()[Strategy.POC_OVERCLAIM] == 1
    out = StringIO()
    list_scenarios(Console(file=out, width=200))
    assert "poc-churn" in out.getvalue()


def test_a_joiner_validates_and_is_paid_in_the_epoch_after_its_first_round(churn) -> None:
    simulation, _ = churn
    (joiner,) = playing(simulation, "joiner")
    row = next(s.participant(joiner.peer_id) for s in simulation.metrics.summaries if s.epoch == 2)
    assert row is not None and row.weight > 0 and row.committed and row.checks and not row.forfeit
    assert row.executor_reward > 0 and row.validator_reward > 0
