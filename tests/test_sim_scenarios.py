"""The researchers' simulator as researchers use it: scenario files, ``gonka-p2p sim`` and its
replay, the behaviours (a share q of cheating, cheating once trusted, framing validators,
sybils), the economics of cheating, sweeps, and every command of the README's simulator
section and of ``examples/research_*.sh``.

Runs are small (12-30 peers, a few epochs) so the file stays fast; the commands the README and
the examples print are run as written, with small ``--set`` overrides appended.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gonka_p2p.ledger.genesis import Params
from sim.command import main
from sim.config import SimConfig
from sim.economics import Bet, break_even, catch_probability, gini
from sim.roster import MATRIX_ONLY_CHEATS, Strategy
from sim.scenario import SCENARIOS, ScenarioError, load, parse_override
from sim.sweep import parse_range
from sim.verdicts import DESIGN_RATES, table_for
from sim.world import simulate

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--set", "network.peers=12", "--set", "network.epochs=4", "--set", "network.requests=60",
         "--set", "network.epoch_blocks=50", "--set", "behaviour.cheat_from=1", "--quiet"]
SMALL_SWEEP = [*SMALL, "--seeds", "2", "--workers", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345"}  # another salt than ours


def gonka(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``gonka-p2p ARGS`` in another process, from the clone's root."""
    return subprocess.run([sys.executable, "-m", "gonka_p2p.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)


def commands(text: str) -> list[list[str]]:
    """Every ``gonka-p2p ...`` command line in a README section or a script."""
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("gonka-p2p ")]


def with_out(argv: list[str], out: Path) -> list[str]:
    """``argv`` with its --out replaced by ``out`` (argparse would keep the last one anyway)."""
    return [*argv, *(SMALL_SWEEP if argv[0] == "sweep" else SMALL), "--out", str(out)]


# ---------------------------------------------------------------------------- scenario files


def test_ready_scenarios_load_and_cover_the_brief() -> None:
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"honest", "int4", "prefill", "small-model", "int8", "bf16", "colluding", "churn-heavy",
            "framing", "framing-coalition", "sybil-swarm", "q10-cheater", "reputation-gated",
            "self-dealing", "spam", "matrix-cheats", "int8-bf16", "partition", "byzantine-minority",
            "poc-churn"} <= names
    for name in sorted(names):
        scenario = load(name)
        assert scenario.sha256 == hashlib.sha256((SCENARIOS / f"{name}.toml").read_bytes()).hexdigest()


def test_a_bad_scenario_names_every_bad_field(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[network]\nbogus = 1\n[nonsense]\nx = 1\n")
    with pytest.raises(ScenarioError) as e:
        load(str(unknown))
    assert "network.bogus: unknown field" in str(e.value) and "nonsense.x: unknown field" in str(e.value)

    bad = tmp_path / "bad.toml"
    bad.write_text('[network]\npeers = 2\nchurn = "lots"\n[behaviour]\ncheat_fraction = 1.5\n'
                   '[validation]\nverdicts = "guess"\n')
    with pytest.raises(ScenarioError) as e:
        load(str(bad))
    lines = str(e.value).splitlines()
    assert lines == ["network.peers: must be at least 3", "network.churn: must be float, not 'lots'",
                     "behaviour.cheat_fraction: must be a probability in [0, 1]",
                     "validation.verdicts: must be one of matrix, design"]

    tables = tmp_path / "tables.toml"
    tables.write_text("[mix]\nint5 = 1\n[params]\nepoch_reward = -3\n")
    with pytest.raises(ScenarioError, match="mix.int5: unknown"):
        load(str(tables))
    ledger = tmp_path / "ledger.toml"
    ledger.write_text("[params]\ndispute_committee_size = 0\n")
    with pytest.raises(ScenarioError, match="params.dispute_committee_size must be positive"):
        load(str(ledger))


def test_the_command_refuses_bad_input_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["no-such-scenario", "--out", str(tmp_path)]) == 2
    assert "no such scenario file (ready ones: all-strategies" in capsys.readouterr().out
    assert main(["honest", "--set", "network.peers=2", "--out", str(tmp_path), "--quiet"]) == 2
    assert "network.peers: must be at least 3" in capsys.readouterr().out
    assert main(["sweep", "honest", "--param", "network.nothing=1:2:2"]) == 2
    assert "expected SECTION.NAME=LOW:HIGH:STEPS" in capsys.readouterr().out


def test_same_scenario_and_seed_replay_byte_for_byte_in_another_process(tmp_path: Path) -> None:
    argv = ["q10-cheater", "--seed", "5", *SMALL]
    result = gonka(["sim", *argv, "--out", str(tmp_path / "there")])
    assert result.returncode == 0, result.stderr
    assert main([*argv, "--out", str(tmp_path / "here")]) == 0
    there, here = tmp_path / "there", tmp_path / "here"
    report = json.loads((there / "report.json").read_text())
    assert report["config"]["scenario sha256"] == load("q10-cheater").sha256
    assert report["config"]["seed"] == 5 and report["digest"] in result.stdout
    for name in ("report.json", "profit.png", "catch.png", "rewards.png", "detection.png"):
        assert (there / name).read_bytes() == (here / name).read_bytes(), name
    assert (there / "profit.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["q10-cheater", "--seed", "6", *SMALL, "--out", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "other" / "report.json").read_text())["digest"] != report["digest"]


# ---------------------------------------------------------------------------- behaviours


def run(seed: int, **fields: object):
    base = dict(peers=20, epochs=4, requests=100, epoch_blocks=50, churn=0.0)
    return simulate(SimConfig(seed=seed, **{**base, **fields}))  # type: ignore[arg-type]


def row(report, strategy: Strategy):
    return next(r for r in report.strategies if r.strategy == str(strategy))


def test_every_cheat_of_the_detection_matrix_is_an_executor_strategy_and_the_gross_ones_are_caught() -> None:
    matrix = json.loads((ROOT / "benchmarks" / "results" / "detection_matrix.json").read_text())
    cheats = {r["row"] for r in matrix["rows"] if r["class"] != "honest"}
    assert cheats <= {str(s) for s in Strategy if s.cheats_as_executor}
    mix = {str(s): 1 for s in MATRIX_ONLY_CHEATS}
    _, report = run(23, mix=mix, cheat_from=0, peers=30, requests=300)
    for strategy in MATRIX_ONLY_CHEATS:
        if strategy.gross:
            assert row(report, strategy).sanctioned_epochs >= 1, strategy


def test_a_network_pinning_bf16_takes_the_matrix_bf16_rows() -> None:
    fp32, bf16 = (table_for("matrix", "smollm2-135m", dtype) for dtype in ("float32", "bfloat16"))
    assert fp32.rates["int8"].failed == 1.0 and bf16.rates["int8"].failed < 0.5
    # bf16 rows measure how many valid outputs are suspicious; fp32 rows do not (design share)
    assert bf16.rates["int8"].suspicious > 0.5 and fp32.rates["int8"].suspicious == 0.0
    assert bf16.rates["honest"].suspicious < DESIGN_RATES["honest"].suspicious
    # a cast to fp16 is a cheat only against a pinned fp32: the bf16 rows have none
    assert bf16.rates["fp16"].source == "design" and fp32.rates["fp16"].source == "matrix"
    with pytest.raises(ValueError, match="no float16 rows"):
        table_for("matrix", "smollm2-135m", "float16")


def test_a_cheater_cheats_on_a_share_q_of_its_requests() -> None:
    _, never = run(21, mix={"int4": 1}, cheat_fraction=0.0)
    assert row(never, Strategy.INT4).cheated_share == 0 and row(never, Strategy.INT4).active_epochs == 0
    _, some = run(21, mix={"int4": 1}, cheat_fraction=0.3, cheat_from=0, requests=300)
    assert 0.15 < row(some, Strategy.INT4).cheated_share < 0.45


def test_a_reputation_gated_cheater_waits_until_it_is_rarely_checked() -> None:
    """Reputation grows by 1/2 per clean settled epoch: the validation rate falls from 99 % to the
    5 % floor, under the cheater's 20 % threshold, and only then does it cheat."""
    simulation, report = run(22, mix={"int4": 1}, cheat_from=0, cheat_below_validation=0.2, floor=0.05,
                             params={"reputation_growth_epochs": 2}, epochs=6)
    cheater = next(p for p in simulation.roster.peers if p.strategy is Strategy.INT4)
    first = simulation.metrics.first_offence[cheater.peer_id][1]
    rate = report.per_epoch["p_validate int4"]  # at each epoch's start (settlements land there)
    assert rate[0] > 0.9 and rate[first] <= 0.2 and all(r > 0.2 for r in rate[:first - 1])
    assert row(report, Strategy.INT4).cheated_share > 0


def test_a_framing_validator_is_overturned_and_forfeits() -> None:
    simulation, report = run(23, mix={"framing": 1})
    framer = next(p for p in simulation.roster.peers if p.strategy is Strategy.FRAMING)
    forfeits = [r.forfeit for s in simulation.metrics.summaries if (r := s.participant(framer.peer_id))
                and r.overturned]
    assert forfeits and all("overturned" in f for f in forfeits)
    assert report.network["honest accused (disputes)"] > 0 and report.network["honest convicted"] == 0
    assert row(report, Strategy.FRAMING).profit < 0.5


def test_a_framing_coalition_of_30_percent_convicts_nobody() -> None:
    simulation, report = run(24, mix={"framing": 3}, adversary_weight_share=0.3)
    weights = {p.strategy: 0 for p in simulation.roster.peers}
    for p in simulation.roster.peers:
        weights[p.strategy] += p.weight
    assert 0.27 < weights[Strategy.FRAMING] / sum(weights.values()) < 0.33
    assert report.network["honest accused (disputes)"] > 0 and report.network["honest convicted"] == 0
    assert row(report, Strategy.FRAMING).sanctioned_epochs > 0


def test_sybils_split_one_weight_and_are_caught_cheating() -> None:
    simulation, report = run(25, mix={"sybil": 1}, sybil_identities=4, peers=24)
    sybils = [p for p in simulation.roster.peers if p.strategy is Strategy.SYBIL]
    assert len(sybils) == 4 and sum(p.weight for p in sybils) <= 20
    assert row(report, Strategy.SYBIL).sanctioned_epochs > 0 and row(report, Strategy.SYBIL).profit < 1


def test_a_self_dealer_routes_to_itself_only_where_the_ledger_draw_allows_and_is_caught_fabricating() -> None:
    """Its TA takes its own executor at any of the allowed draws: more often than its weight share,
    never always, every Start accepted; the fabricated answers get it caught and unpaid."""
    simulation, report = run(27, mix={"self-dealing": 1}, self_dealing_requests=150, self_dealing_cheat="honest")
    executor = simulation.peers[next(iter(simulation.roster.own_executor.values()))]
    share = executor.weight / sum(simulation.chain.state.weights().values())
    assert share < report.network["self-dealt share of own requests"] < 1
    assert report.network["self-dealt share of own requests"] <= 1 - (1 - share) ** 3 + 0.1
    assert not any("start_inference" in kind for kind in report.rejected_txs)
    _, fabricating = run(27, mix={"self-dealing": 1}, self_dealing_requests=150, self_dealing_cheat="int4")
    dealer = row(fabricating, Strategy.SELF_DEALING)
    assert dealer.sanctioned_epochs > 0 and dealer.profit < row(report, Strategy.SELF_DEALING).profit


def test_spam_is_served_and_paid_for_by_the_spammer() -> None:
    _, quiet = run(28, epochs=3)
    _, report = run(28, epochs=3, spam_requests=200)
    assert report.network["inferences settled"] >= quiet.network["inferences settled"] + 0.9 * 3 * 200
    assert report.network["coins: the spammer spent"] > 3 * 200  # a fee and one token each, at least
    assert report.network["honest convicted"] == 0 and row(report, Strategy.HONEST).profit == pytest.approx(1.0)


# ---------------------------------------------------------------------------- economics


def test_profit_against_honest_peers() -> None:
    """Honest stable peers are the unit; a caught gross cheater loses its epochs' pay."""
    _, report = run(26, mix={"int4": 1})
    assert row(report, Strategy.HONEST).profit == pytest.approx(1.0)
    assert row(report, Strategy.INT4).profit < 0.5 and row(report, Strategy.INT4).catch_blocks
    assert report.profit_curves["honest"][-1] == pytest.approx(1.0)
    assert 0 <= report.network["fair: Gini of reward per weight"] < 0.3
    assert 0 < report.network["validation compute share"] < 1


def test_break_even_is_the_bet_it_states() -> None:
    """P = 1 - (1 - p d)^(q N) with the ledger's p(r, m); pays iff P I < q s C."""
    params = Params(price_per_token={"m": 1})
    bet = Bet(income=1000.0, compute=800.0, inferences=20.0, detect=1.0, saving=0.5)
    assert catch_probability(bet, 0.1, 1.0, 0.05, params) == pytest.approx(1 - (1 - 0.05) ** 2)
    assert catch_probability(bet, 0.1, 0.0, 0.05, params) == pytest.approx(1 - (1 - 0.99) ** 2)
    rows = break_even(bet, params)
    for r in rows:
        assert r["pays"] == (r["P(caught)"] * bet.income < r["q"] * bet.saving * bet.compute)
    trusted = {(r["q"], r["floor"]): r for r in rows if r["reputation"] == 1.0}
    assert trusted[(0.1, 0.01)]["pays"] and not trusted[(0.1, 0.2)]["pays"]
    assert trusted[(0.1, 0.01)]["P(caught)"] < trusted[(0.1, 0.05)]["P(caught)"] < trusted[(0.1, 0.2)]["P(caught)"]


def test_gini() -> None:
    assert gini([3.0, 3.0, 3.0]) == 0.0
    assert gini([0.0, 0.0, 0.0, 8.0]) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- sweeps


def test_set_and_param_reach_one_entry_of_a_table() -> None:
    """A genesis parameter, a strategy's count or its savings: set on top of the scenario's table,
    its other entries kept; an unknown entry is refused like an unknown knob."""
    scenario = load("q10-cheater")
    config = scenario.config(1, {"params.reputation_growth_epochs": 3, "mix.int4": 2,
                                 "economics.savings.int4": 0.4})
    assert config.params == {"reputation_growth_epochs": 3, "epoch_reward": 10000}
    assert config.mix == {"int4": 2} and config.savings["int4"] == 0.4 and config.savings["prefill"] == 0.7
    assert parse_range("params.reputation_growth_epochs=1:4:2") == ("params.reputation_growth_epochs", [1, 4])
    for bad in ("params.nonsense=3", "mix.nobody=1"):
        with pytest.raises(ScenarioError):
            parse_override(bad)


def test_parse_range() -> None:
    assert parse_range("validation.floor=0.01:0.2:3") == ("validation.floor", [0.01, 0.105, 0.2])
    assert parse_range("network.peers=10:12:5") == ("network.peers", [10, 11, 12])
    assert parse_range("behaviour.cheat_fraction=0.1,0.5") == ("behaviour.cheat_fraction", [0.1, 0.5])
    for bad in ("validation.floor=0.1:0.2", "validation.verdicts=a:b:2", "nothing=1:2:3"):
        with pytest.raises(ScenarioError):
            parse_range(bad)


def test_sweep_writes_a_table_and_a_plot_per_metric(tmp_path: Path) -> None:
    result = gonka(["sim", "sweep", "q10-cheater", "--param", "validation.floor=0.01:0.2:2", *SMALL_SWEEP,
                    "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["values"] == [0.01, 0.2] and summary["scenario sha256"] == load("q10-cheater").sha256
    profit = summary["metrics"]["profit vs honest: int4"]
    assert [r["n"] for r in profit] == [2, 2] and all(r["ci95"] >= 0 for r in profit)
    assert (tmp_path / "profit-vs-honest-int4.png").read_bytes()[:8] == PNG_MAGIC
    assert len(list(tmp_path.glob("*.png"))) == len(summary["metrics"])
    assert "profit vs honest: int4" in result.stdout and "+-" in result.stdout


# ---------------------------------------------------------------------------- README and examples


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Researchers' simulator")
    return readme[start:readme.index("\n## ", start + 1)]


def test_readme_shows_a_ready_scenario_file_verbatim() -> None:
    assert (SCENARIOS / "q10-cheater.toml").read_text() in readme_section()
    for image in ("examples/plots/floor-q10-profit.png", "examples/plots/int8-bf16-blocks-to-catch.png",
                  "examples/plots/framing-honest-convicted.png", "examples/plots/byzantine-commit-latency.png"):
        assert image in readme_section() and (ROOT / image).read_bytes()[:8] == PNG_MAGIC


def test_readme_commands_run(tmp_path: Path) -> None:
    found = commands(readme_section())
    assert [c[:2] for c in found] == [["sim", "list"], ["sim", "q10-cheater"], ["sim", "sweep"],
                                      ["sim", "safety"]]
    for i, command in enumerate(found):
        if command[1] == "list":
            argv = command[1:]
        elif command[1] == "safety":
            argv = [*command[1:], "--seeds", "4", "--workers", "2"]
        else:
            argv = with_out(command[1:], tmp_path / str(i))
        result = gonka(["sim", *argv])
        assert result.returncode == 0, f"{shlex.join(command)}: {result.stderr}"
    assert (tmp_path / "1" / "report.json").exists() and (tmp_path / "2" / "sweep.json").exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("research_*.sh")))
def test_example_research_question_runs(script: str, tmp_path: Path) -> None:
    """The example's one command, with small networks and 2 seeds: the plot it tells the reader to
    open exists."""
    text = (ROOT / "examples" / script).read_text()
    [command] = commands(text)
    result = gonka(["sim", *with_out(command[1:], tmp_path)])
    assert result.returncode == 0, result.stderr
    plots = [Path(name).name for name in re.findall(r"[\w./-]+\.png", text)]
    assert plots and all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC for name in plots), plots
