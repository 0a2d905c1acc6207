"""The researchers' simulator (sim.network_sim): replay from a seed, and the ledger's economics
at 30 peers -- honest networks pay by weight and accuse nobody, cheaters are caught within
their epoch and their clients refunded, lazy validators forfeit, coins are conserved.

Every run is small (30 peers, a few epochs of 50 blocks) so the file stays fast; a failing
case names its seed in the config it prints.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from statistics import correlation

import pytest

from gonka_p2p.ledger.state import check_invariants
from sim.network_sim import build_parser, config_from_args, main
from sim.roster import DEFAULT_MIX, Strategy
from sim.verdicts import design_table, load_matrix
from sim.world import SimConfig, Simulation, simulate

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(peers=30, epochs=3, requests=60, epoch_blocks=50)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small(seed: int, **overrides: object) -> SimConfig:
    fields = {**SMALL, "mix": dict(DEFAULT_MIX), "verdicts": load_matrix(), **overrides}
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
    assert report.rejected_txs == {}, "an honest simulated actor had a transaction rejected"


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
            assert row.weight_after == 0 and row.reputation_after == 0
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
        assert row.forfeited > 0 or summary.epoch == 0  # the bootstrap epoch mints nothing


def test_coins_are_conserved_at_every_block(mixed) -> None:
    simulation, report = mixed
    state = simulation.chain.state
    check_invariants(state)
    assert simulation.chain.conservation_checks == simulation.last_height == state.height
    assert report.network["coins: balances + escrow + fees"] == (
        report.network["coins: genesis supply"] + report.network["coins: minted"])
    assert report.network["coins: minted"] > 0


def test_false_accusations_are_overturned_and_cost_the_honest_executor_nothing() -> None:
    """Design rates (honest checks fail 0.5 %), each check drawn on its own: honest executors are
    accused, committees overturn the accusations, and nobody is convicted."""
    simulation, report = simulate(small(14, mix={}, churn=0.0, verdicts=design_table(), requests=120,
                                        independent_checks=True))
    assert report.network["honest accused (disputes)"] == report.network["disputes"] > 0
    assert report.network["disputes invalid"] == report.network["honest convicted"] == 0
    rows = [row for s in simulation.metrics.summaries for row in s.participants]
    assert any(row.overturned for row in rows) and not any(row.caught for row in rows)


def test_readme_command_writes_tables_and_pngs(tmp_path: Path) -> None:
    """The README's command, run as written, with small flags appended (argparse keeps the last)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Researchers' simulator"):]
    line = next(ln for ln in section.splitlines() if "python -m sim.network_sim" in ln)
    command = shlex.split(line[line.index("python -m sim.network_sim"):].strip().strip("`"))
    out = tmp_path / "run"
    small_flags = ["--peers", "30", "--epochs", "2", "--requests", "40", "--epoch-blocks", "50",
                   "--out", str(out), "--quiet"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, *command[1:], *small_flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "detect" in result.stdout and "checks per inference" in result.stdout
    for name in ("rewards.png", "detection.png", "validation.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    digest = json.loads((out / "report.json").read_text())["digest"]
    assert digest in result.stdout
    # Another process, another string-hash salt: the same run.
    _, here = simulate(config_from_args(build_parser().parse_args([*command[3:], *small_flags])))
    assert here.digest == digest


@pytest.mark.parametrize("argv, message", [
    (["--peers", "2"], "--peers must be at least 3"),
    (["--mix", "int5=1"], "unknown strategy 'int5'"),
    (["--epoch-blocks", "20"], "--epoch-blocks must be at least"),
    (["--latency", "50"], "--latency must be in"),
    (["--matrix", "/nonexistent.json"], "--verdicts design"),
])
def test_bad_input_is_refused_with_a_reason(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert message in capsys.readouterr().out
