"""The prover actor on a ledger driven block by block: it joins a round whose compute window
is open now, and leaves alone one it only sees open because it is replaying old blocks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from ledger_driver import LedgerDriver, poc_genesis

from gonka_p2p.actors.prover import CATCHING_UP_LAG_S, ProverActor
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.poc import Phase, RoundKind
from gonka_p2p.ledger.poc_rounds import open_rounds
from gonka_p2p.ledger.state import LedgerState

KEYS = {name: Keypair.from_seed(f"prover-actor-{name}".encode()) for name in ("A", "B")}

pytestmark = pytest.mark.slow  # the tiny model computes the nonces


class Unsent:
    """A follower that sends nothing: the test reads what the prover computes, not its txs."""

    def follow(self, build: Callable[[int], bytes], what: str, done: Callable[[bool], object]) -> None:
        pass


def in_compute_window() -> LedgerState:
    """A two-participant ledger at the first block of epoch 1's regular compute window."""
    driver = LedgerDriver(LedgerState.from_genesis(poc_genesis("prover-actor", KEYS, {"A": 10, "B": 10},
                                                               poc_compute_blocks=8)), KEYS, "A")
    while not any(r.phase is Phase.COMPUTE and r.kind is RoundKind.REGULAR and r.epoch == 1
                  for r in open_rounds(driver.state)):
        driver.block()
    return driver.state


@pytest.mark.parametrize(("block_age_s", "computes"), [(1, True), (CATCHING_UP_LAG_S + 1, False)])
async def test_the_prover_computes_only_in_windows_open_by_the_clock(engine: Engine, block_age_s: float,
                                                                     computes: bool) -> None:
    state = in_compute_window()
    prover = ProverActor(KEYS["A"], {"m": engine}, "prover-actor", Unsent(), lambda: [],
                         clock=lambda: state.time_ms / 1000 + block_age_s)
    prover.on_commit(state)
    async with asyncio.TaskGroup() as tasks:
        await prover.step(tasks)
        computing = dict(prover._computing)
        for compute in computing.values():
            compute.stop()
    assert [key[:2] for key in computing] == ([(1, RoundKind.REGULAR)] if computes else [])
