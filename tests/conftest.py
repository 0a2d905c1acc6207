"""Test-wide settings and fixtures. Thread counts are pinned before torch is imported: the
machines are shared and oversubscribed BLAS threads make torch ~10x slower."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gonka_p2p.inference.engine import Engine

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The tiny model on the torch engine, loaded once per module that asks for it. Imported
    here, not at the top: torch must not load before the thread counts above are set."""
    from helpers import MODEL

    from gonka_p2p.inference.factory import load_engine

    return load_engine("torch", MODEL)

# Fuzzing budget: CI runs hypothesis' default (100 examples per property); a longer hunt is
# `pytest tests/adversarial --hypothesis-profile=fuzz` (the adversarial fuzz tests state no
# example count of their own, so the profile decides).
from hypothesis import settings  # noqa: E402 -- after the thread pins above

settings.register_profile("fuzz", max_examples=20_000, deadline=None)

# The files that take minutes, started first: the tests run two files at a time (pyproject's
# `-n 2 --dist loadfile`), and a long file started last would run alone at the end of CI.
LONGEST_FIRST = ("test_join_process.py", "test_testnet.py", "test_demo.py", "test_sim_consensus.py",
                 "test_benchmarks_smoke.py", "test_cli.py", "test_sim_scenarios.py", "test_ledger_process.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
