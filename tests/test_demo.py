"""README line 1's main job: the demo, as a process, with the real model on vLLM."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.libp2p]


def test_demo_serves_requests_from_two_executors() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "gonka_p2p.cli", "demo", "--requests", "3", "--max-tokens", "16"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "distinct executors" in result.stdout
    assert result.stdout.count("request ") >= 3
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("cheat, model", [("int4", "tiny-llama")])
def test_demo_with_a_cheater_shows_it_caught_and_its_clients_refunded(cheat: str, model: str) -> None:
    """README's `gonka-p2p demo --cheater ...`: quantized weights on the tiny model. (The pre-fill
    attack on SmolLM2 runs the same path for 3 more minutes of CI; tests/test_cheater_caught.py
    catches it, and every other cheat, on the in-memory network.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "gonka_p2p.cli", "demo", "--cheater", cheat, "--model", model,
         "--max-tokens", "16"],
        capture_output=True, text=True, timeout=1200, env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "CAUGHT" in result.stdout
    verdict = result.stdout[result.stdout.index(f"verification: one executor cheats ({cheat})"):]
    assert "yes" in verdict and "forfeited" in verdict
    assert "Traceback" not in result.stderr
