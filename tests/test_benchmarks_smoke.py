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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.libp2p
def test_serving_bench_quick_prints_and_writes_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving_bench.py"), "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gonka-p2p serving benchmark" in result.stdout
    assert "tok/s per req" in result.stdout
    report = json.loads((tmp_path / "serving_bench_quick.json").read_text())
    paths = {row["path"] for row in report["serving"]}
    assert {"bare", "network"} <= paths
    assert "gateway" in paths or report["gateway_note"]
    assert {(row["kind"], row["mode"]) for row in report["net"]} >= {("gossip", "saturated"),
                                                                    ("tokens", "paced mix")}
    assert (tmp_path / "serving_bench_quick.md").read_text().startswith("# gonka-p2p serving")


def test_validation_cost_tiny_prints_and_writes_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "validation_cost.py"), "--models", "tiny-llama",
         "--n", "1", "--max-tokens", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "val/gen batched" in result.stdout
    table = (tmp_path / "validation_cost.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-llama")]
    assert {tuple(line.split(" | ")[1:3]) for line in rows} == {
        (executor, mode) for executor in ("torch", "vllm-batch") for mode in ("greedy", "sampled")}
