"""The benchmarks run end to end in their quick forms, so they cannot rot unnoticed.

The serving benchmark starts real node processes, a bare vLLM engine and
netbench's hosts: about two minutes on two busy cores; the validation-cost one
a torch and a vLLM executor on the tiny model: under a minute. The numbers are
not checked (a shared CI machine cannot promise any), only that every part ran
and was reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.verdicts import Outcome, load_matrix

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<script>`` run with ``args`` on one thread with wide tables; it must exit 0."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.libp2p
def test_serving_bench_quick_prints_and_writes_its_table(tmp_path: Path) -> None:
    result = bench("serving_bench.py", "--quick", "--model", "tiny-llama", "--out", tmp_path)
    assert "gonka-p2p serving benchmark" in result.stdout
    assert "tok/s per req" in result.stdout
    report = json.loads((tmp_path / "serving_bench_quick.json").read_text())
    paths = {row["path"] for row in report["serving"]}
    assert {"bare", "network"} <= paths
    assert "gateway" in paths or report["gateway_note"]
    assert {(row["kind"], row["mode"]) for row in report["net"]} >= {("gossip", "saturated"),
                                                                    ("tokens", "paced mix")}
    markdown = (tmp_path / "serving_bench_quick.md").read_text()
    assert markdown.startswith("# gonka-p2p serving")
    network = next(line for line in markdown.splitlines() if line.startswith("| serving | network |"))
    assert "ms TTFT (rounds " in network and "tok/s (rounds " in network, network  # each round's spread


@pytest.mark.libp2p
def test_frame_cost_compares_our_stream_credit_with_py_libp2ps() -> None:
    """Window updates are counted, not timed: py-libp2p's own yamux answers nearly every frame
    read with one, ours once per half window (none for 200 small frames)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frame_cost.py"),
                             "--frames", "200", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert int(rows["ours"][3]) == 0  # window updates per 1000 frames
    assert int(rows["upstream"][3]) >= 500
    assert "load average" in result.stdout


def test_validation_cost_tiny_prints_and_writes_its_table(tmp_path: Path) -> None:
    result = bench("validation_cost.py", "--models", "tiny-llama", "--n", "1", "--max-tokens", "8", "--out", tmp_path)
    assert "val/gen batched" in result.stdout
    table = (tmp_path / "validation_cost.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-llama")]
    assert {tuple(line.split(" | ")[1:3]) for line in rows} == {
        (executor, mode) for executor in ("torch", "vllm-batch") for mode in ("greedy", "sampled")}


def test_score_cost_tiny_prints_every_k_for_both_answer_lengths(tmp_path: Path) -> None:
    bench("score_cost.py", "--model", "tiny-llama", "--max-tokens", "8", "--short", "4", "--repeats", "1",
          "--out", tmp_path)
    table = (tmp_path / "score_cost.md").read_text()
    assert "load average" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| tiny-llama")]
    assert {row[3] for row in rows} == {"1", "1024", "8192", "49152"} and len(rows) == 8


def test_validation_bench_tiny_judges_every_row_as_the_reference_does(tmp_path: Path) -> None:
    bench("validation_bench.py", "--models", "tiny-llama", "--n", "1", "--max-tokens", "8", "--out", tmp_path)
    table = (tmp_path / "validation_bench.md").read_text()
    assert "load average" in table and "second passes heaviest first (expected)" in table
    verdicts = [line.split(" | ") for line in table.splitlines() if line.startswith("| tiny-llama") and
                line.count("|") == 10]
    assert {row[1] for row in verdicts} == {"honest-vllm", "prefill", "int8", "int4", "small-model",
                                            "wrong-temperature", "fabricated", "altered"}
    assert len(verdicts) == 8 * 3 and all(row[6] == "0" for row in verdicts)  # none disagrees


def test_sampler_bench_quick_prints_both_tables() -> None:
    result = bench("sampler_bench.py", "--quick")
    assert "old per-request ms" in result.stdout and "seeded (sample_batch)" in result.stdout


def test_sampler_profile_compares_a_variant_and_finds_the_same_tokens() -> None:
    """The profile's candidate mechanism, with the sampler itself as the candidate."""
    sampler = ROOT / "gonka_p2p" / "inference" / "sampler.py"
    result = bench("sampler_profile.py", "--model", "tiny-llama", "--batch", "4", "--vocabs", "3000", "--repeats", "1",
                   "--variant", sampler)
    assert "variant sampler: tokens equal" in result.stdout
    assert result.stdout.count("| sampler | 3000 |") == 4 and result.stdout.count("| current | 3000 |") == 4


def test_device_rows_generates_batched_honest_artifacts_that_the_validator_accepts(tmp_path: Path) -> None:
    """Both halves on the CPU: padded batches of the honest executor pass the CPU validator."""
    rows = tmp_path / "rows.json"
    script = str(ROOT / "benchmarks" / "device_rows.py")
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    generated = subprocess.run(
        [sys.executable, script, "--generate", str(rows), "--model", "tiny-llama", "--dtype", "float32",
         "--batch", "1", "3", "--n", "3", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert generated.returncode == 0, generated.stderr[-4000:]
    judged = subprocess.run([sys.executable, script, "--judge", str(rows), "--epochs", "20",
                             "--results", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert judged.returncode == 0, judged.stderr[-4000:]
    table = (tmp_path / "device_rows_float32.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| tiny-llama")]
    assert {line.split(" | ")[2] for line in lines} == {"honest-cpu-float32-b1", "honest-cpu-float32-b3"}
    assert all("| 0.0% |" in line and "| met " in line for line in lines), table


def test_detection_matrix_tiny_rejects_cheats_keeps_other_models_rows_and_reuses_its_records(
        tmp_path: Path) -> None:
    kept = {"model": "other-model", "mode": "greedy", "row": "honest-torch", "class": "honest", "n": 7,
            "mean_tokens": 1.0, "short_outputs": 0, "rejected": 0.0, "rejected_upper95": 0.3,
            "mean_distance": 0.0, "epoch_detection": 0.0, "val_s": 0.1, "gen_s": 1.0, "val_over_gen": 0.1,
            "reasons": {}, "target_met": True}
    (tmp_path / "detection_matrix.json").write_text(json.dumps({"meta": {}, "rows": [kept]}))

    def run() -> subprocess.CompletedProcess[str]:
        return bench("detection_matrix.py", "--models", "tiny-llama", "--n", "2", "--max-tokens", "16", "--rows",
                     "honest-torch", "int4", "prefill", "truncated", "--epochs", "50", "--results", tmp_path,
                     "--modes", "greedy", "sampled", "plain")

    run()
    rows = json.loads((tmp_path / "detection_matrix.json").read_text())["rows"]
    assert kept in rows  # another model's rows survive a run of this one
    mine = {(r["row"], r["mode"]): r for r in rows if r["model"] == "tiny-llama"}
    assert set(mine) == {(row, mode) for row in ("honest-torch", "int4", "prefill", "truncated")
                         for mode in ("greedy", "sampled", "plain")}
    assert all(r["rejected"] == 0.0 for (row, _), r in mine.items() if row == "honest-torch")
    assert all(r["rejected"] == 1.0 for (row, _), r in mine.items() if row in ("int4", "truncated"))
    assert mine["prefill", "plain"]["rejected"] == 1.0  # no cut at T = 1: the near-tie width alone
    assert "| tiny-llama | greedy | prefill |" in (tmp_path / "detection_matrix.md").read_text()
    records = {p.name: p.read_text() for p in (tmp_path / "rows").iterdir()}
    assert len(records) == 4
    run()  # every inference is cached: nothing is generated again (timings included)
    assert {p.name: p.read_text() for p in (tmp_path / "rows").iterdir()} == records
    assert json.loads((tmp_path / "detection_matrix.json").read_text())["rows"] == rows


def test_distance_run_rates_reads_a_bf16_matrix_records_and_prints_each_run_apart(tmp_path: Path) -> None:
    bench("detection_matrix.py", "--dtype", "bfloat16", "--models", "tiny-llama", "--n", "2", "--max-tokens", "16",
          "--rows", "honest-torch", "int4", "--epochs", "20", "--results", tmp_path)
    result = bench("distance_run_rates.py", "--models", "tiny-llama", "--rows", "honest-torch", "int4",
                   "--chains", "3", "--chain", "2", "--results", tmp_path)
    lines = [line for line in result.stdout.splitlines() if "tiny-llama" in line]
    assert len(lines) == 4, result.stdout  # two rows x two modes
    assert all("100.000%" in line for line in lines if "int4" in line), result.stdout
    assert all(line.count("0.000%") == 3 for line in lines if "honest-torch" in line), result.stdout
    # the matrix keeps each row's passing distances in the shape the simulator reads
    table = load_matrix(tmp_path / "detection_matrix.json", "tiny-llama", "bfloat16")
    assert table.rates["honest"].distances[Outcome.CLEAN].tables[0][0] >= 1


def test_poc_bench_quick_tiny_prints_cost_fairness_and_cheat_tables() -> None:
    result = bench("poc_bench.py", "--quick", "--model", "tiny-llama", "--engine", "torch")
    for title in ("PoC cost", "Fairness", "Overclaiming", "small model", "summary"):
        assert title in result.stdout
    assert "fabricated leaves failing 100%" in result.stdout


def test_sim_overhead_quick_prints_both_tables_with_a_row_per_case(tmp_path: Path) -> None:
    out = tmp_path / "sim_overhead.md"
    result = bench("sim_overhead.py", "--quick", "--out", out)
    assert "load average" in result.stdout
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")
            and not line.startswith("| requests") and not line.startswith("| floor |")]
    assert [r[0] for r in rows] == ["| 20", "| 50", "| 100", "| schedule (default)", "| flat 5%"]
    assert all(len(r) == 10 and r[6].startswith("**") and r[6].endswith("%**") for r in rows)
    assert rows[-1][1] == "5.0%"  # the flat floor is the floor the ledger used


def test_sim_scale_runs_small_sizes_projects_a_size_past_its_budget_and_plots_the_curve(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_scale.py"), "--sizes", "10,30,100000",
                             "--budget-s", "30", "--signatures", "keyed-hash", "--plot", str(tmp_path / "scale.png")],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert "load average" in lines[0]
    measured = [line for line in lines if line.split()[:1] in (["10"], ["30"])]
    assert len(measured) == 2 and all("projected" not in line for line in measured)
    assert any(line.split()[0] == "100,000" and "projected, not run" in line for line in lines)
    assert (tmp_path / "scale.png").read_bytes().startswith(b"\x89PNG")
