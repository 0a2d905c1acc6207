"""The researchers' simulator's loop (sim.world): replay from a seed, and the ledger's economics
at 30 peers -- honest networks pay by weight and accuse nobody, cheaters are caught within
their epoch and their clients refunded, lazy validators forfeit, coins are conserved.
Scenario files, the command, behaviours and sweeps: tests/test_sim_scenarios.py.

Every run is small (30 peers, a few epochs of 50 blocks) so the file stays fast; a failing
case names its seed in the config it prints.
"""

from __future__ import annotations

from statistics import correlation

import pytest

from gonka_p2p.ledger.state import check_invariants
from sim.config import SimConfig
from sim.roster import DEFAULT_MIX, Strategy
from sim.world import Simulation, simulate

SMALL = dict(peers=30, epochs=3, requests=60, epoch_blocks=50)
# What an honest simulated actor may see refused, as a live one would: a dispute vote landing
# after the committee's majority decided it, a draw made before a block changed the weights
# (or sanctioned the executor),
# a transaction whose sequence three re-signings could not place.
RACES = ("tx_dispute_vote/voting_closed", "tx_start_inference/executor_not_drawn",
         "tx_start_inference/executor_not_eligible", "/bad_sequence")


def small(seed: int, **overrides: object) -> SimConfig:
    fields = {**SMALL, "mix": {str(s): n for s, n in DEFAULT_MIX.items()}, **overrides}
    return SimConfig(seed=seed, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def mixed() -> tuple[Simulation, object]:
    return simulate(small(11))


@pytest.fixture(scope="module")
def honest() -> tuple[Simulation, object]:
    return simulate(small(12, mix={}, churn=0.0, epochs=4, requests=200))


def rows_of(simulation: Simulation, strategy: Strategy):
    """(peer, epoch summary row) for every settled epoch of every peer playing ``strategy``."""
    for peer in simulation.roster.peers:
        if peer.strategy is strategy:
            for summary in simulation.metrics.summaries:
                row = summary.participant(peer.peer_id)
                if row is not None:
                    yield peer, summary, row


def test_same_seed_replays_bit_for_bit_and_another_seed_differs(mixed) -> None:
    simulation, report = mixed
    _, again = simulate(small(11))
    assert again.digest == report.digest
    assert again.app_hash == report.app_hash == simulation.chain.state.app_hash().hex()
    _, other = simulate(small(13))
    assert other.digest != report.digest and other.app_hash != report.app_hash


def test_many_peers_all_take_part(mixed) -> None:
    simulation, report = mixed
    assert len(simulation.roster.peers) >= 30
    executors = {row.peer for s in simulation.metrics.summaries for row in s.participants if row.inferences}
    assert len(executors) >= 20
    assert report.network["inferences settled"] >= 150
    unexpected = {k: n for k, n in report.rejected_txs.items() if not any(r in k for r in RACES)}
    assert unexpected == {}, "an honest simulated actor had a transaction rejected"


def test_honest_network_accuses_nobody_and_rewards_track_weight(honest) -> None:
    simulation, report = honest
    assert report.network["disputes"] == 0
    assert report.network["honest accused (disputes)"] == report.network["honest convicted"] == 0
    assert all(not row.caught and not row.forfeit
               for s in simulation.metrics.summaries if s.epoch > 0 for row in s.participants)
    rewards = {p.peer_id: 0 for p in simulation.roster.peers}
    for summary in simulation.metrics.summaries:
        for row in summary.participants:
            rewards[row.peer] += row.executor_reward + row.validator_reward
    weights = [p.weight for p in simulation.roster.peers]
    assert correlation(weights, [rewards[p.peer_id] for p in simulation.roster.peers]) > 0.6
    # Proportional, not more: reward ~ weight^k with k near 1 (counting weight twice gave 1.6).
    assert 0.7 < report.network["fair: k in reward ~ weight^k"] < 1.3
    assert report.network["fair: Gini of reward per weight"] < 0.2


def test_gross_cheater_is_caught_within_its_epoch_forfeits_and_its_clients_are_refunded(mixed) -> None:
    simulation, report = mixed
    checked = 0
    for strategy in (Strategy.INT4, Strategy.PREFILL, Strategy.SMALL_MODEL):
        for peer, summary, row in rows_of(simulation, strategy):
            if summary.epoch < simulation.config.cheat_from or not row.inferences:
                continue
            checked += 1
            assert row.caught, f"{peer.name} cheated in epoch {summary.epoch} and was not caught"
            assert "caught" in row.forfeit and row.executor_reward == row.validator_reward == 0
            assert row.fees_paid == 0 and row.fees_refunded > 0
            assert row.reputation_after == 0  # its weight falls at settlement, 10 % of the total at most:
            assert row.weight_after == 0 or row.weight_after < row.weight
    assert checked, "no gross cheater executed anything: pick another seed"
    for summary in simulation.metrics.summaries:
        assert sum(amount for _, amount in summary.refunds) == summary.fees_refunded
    for row in report.strategies:
        if row.strategy in ("int4", "prefill", "small-model") and row.active_epochs:
            assert row.detection == 1.0 and row.epochs_to_catch == 0


def test_lazy_validator_forfeits(mixed) -> None:
    simulation, _ = mixed
    with_duties = [(s, row) for _, s, row in rows_of(simulation, Strategy.LAZY) if row.duties]
    assert with_duties
    for summary, row in with_duties:
        assert row.done == 0 and "skipped_duties" in row.forfeit
        assert row.executor_reward == row.validator_reward == 0
        # The bootstrap epoch mints nothing; a lazy peer drawn to execute nothing had nothing to lose.
        assert row.forfeited > 0 or summary.epoch == 0 or row.inferences == 0


def test_coins_are_conserved_at_every_block(mixed) -> None:
    simulation, report = mixed
    state = simulation.chain.state
    check_invariants(state)
    assert simulation.chain.conservation_checks == simulation.last_height == state.height
    assert report.network["coins: balances + escrow + fees"] == (
        report.network["coins: genesis supply"] + report.network["coins: minted"]
        - report.network["coins: burned"])
    assert report.network["coins: minted"] > 0


def test_false_accusations_are_overturned_and_cost_the_honest_executor_nothing() -> None:
    """Design rates (honest checks fail 0.5 %), each check drawn on its own: honest executors are
    accused, committees overturn the accusations, and nobody is convicted."""
    simulation, report = simulate(small(14, mix={}, churn=0.0, verdicts="design", requests=120,
                                        independent_checks=True))
    assert report.network["honest accused (disputes)"] == report.network["disputes"] > 0
    assert report.network["disputes invalid"] == report.network["honest convicted"] == 0
    rows = [row for s in simulation.metrics.summaries for row in s.participants]
    assert any(row.overturned for row in rows) and not any(row.caught for row in rows)


def test_keyed_hash_signatures_change_no_economics_and_are_restored() -> None:
    """The faster stand-in for secp256k1 (sim.signatures) leaves the traffic and its settlement
    as they were, and is gone after the run. Only the envelopes' bytes differ, so the block
    hashes: the app hash, and the duty ring's points (ledger/duties.py hashes each from its
    settling block), so which validators checked what -- the same rule on other draws."""
    from gonka_p2p.identity import Keypair
    from gonka_p2p.wire import envelope

    sign, verify = Keypair.sign, envelope.verify_signature
    _, real = simulate(small(12, mix={}, churn=0.0))
    _, keyed = simulate(small(12, mix={}, churn=0.0, signatures="keyed-hash"))
    traffic = ("inferences settled", "expired (refunded)", "requests refused (no executor)", "disputes",
               "honest convicted", "coins: burned", "coins: blocks checked")
    assert [keyed.network[k] for k in traffic] == [real.network[k] for k in traffic]
    assert keyed.strategies == real.strategies
    assert abs(keyed.network["checks per inference"] - real.network["checks per inference"]) < 0.2
    assert keyed.app_hash != real.app_hash
    assert (Keypair.sign, envelope.verify_signature) == (sign, verify)
