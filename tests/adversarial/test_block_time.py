"""Attack class: a proposer choosing the block time. Time feeds request freshness, and
whatever is derived from a block's hash (its bytes hold the time) could be ground by a
proposer free to pick it. Now a block carries the commit of the block before it, and its time
must be that commit's BFT time (the power-weighted median of the precommit times): every
honest replica rejects any other, so the proposer chooses no time, and validators below 1/3
of the power cannot move the median outside the honest clocks."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from helpers import FAST, running_replicas

from gonka_p2p.actors.replica import Replica
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.block import decode_block
from gonka_p2p.ledger.commit_checks import bft_time_ms
from gonka_p2p.ledger.consensus_types import CommitCertificate, Validator, ValidatorSet, Vote, VoteType
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.store import LedgerStore

CHAIN = "gonka-block-time"
KEYS = [Keypair.from_seed(f"block-time-{i}".encode()) for i in range(4)]
GENESIS = Genesis(chain_id=CHAIN, params=Params(price_per_token={"m": 1}, epoch_length_blocks=1000),
                  participants=tuple(GenesisParticipant(k.public_key, 10, models=("m",)) for k in KEYS))
SKEW_MS = 5_000  # well inside the 30 s a proposer's clock could lead before


def commit(times: dict[str, int]) -> CommitCertificate:
    return CommitCertificate(1, 0, b"h" * 32, tuple(Vote(VoteType.PRECOMMIT, 1, 0, b"h" * 32, a, t, b"")
                                                    for a, t in times.items()))


def test_bft_time_is_the_weighted_median_of_the_precommit_times_and_never_goes_back() -> None:
    validators = ValidatorSet([Validator("a", b"", 1), Validator("b", b"", 1), Validator("c", b"", 2)])
    assert bft_time_ms(0, commit({"a": 100, "b": 300, "c": 200}), validators) == 200  # c holds half
    assert bft_time_ms(0, commit({"a": 100, "b": 300}), validators) == 300  # more than half needs both
    assert bft_time_ms(500, commit({"a": 100, "b": 300, "c": 200}), validators) == 501


def test_validators_below_a_third_cannot_move_bft_time_outside_the_honest_clocks() -> None:
    validators = ValidatorSet([Validator(a, b"", 10) for a in "abcd"] + [Validator("z", b"", 19)])
    honest = {"a": 1_000, "b": 1_010, "c": 1_020, "d": 1_030}
    for lie in (0, 10**15):
        for dropped in ("a", "b", "c", "d"):  # any quorum the proposer may include (> 2/3 of 59)
            quorum = {a: t for a, t in honest.items() if a != dropped} | {"z": lie}
            assert 1_000 <= bft_time_ms(0, commit(quorum), validators) <= 1_030


def skew_time(replica: Replica) -> None:
    """``replica`` proposes the honest block, but with its time moved ``SKEW_MS`` ahead."""
    honest_build = replica._proposals.build

    def build(height: int) -> bytes:
        block = decode_block(honest_build(height))
        return replace(block, time_ms=block.time_ms + SKEW_MS).encode()

    replica._proposals.build = build  # type: ignore[method-assign]


async def test_a_proposal_with_a_time_of_the_proposers_choosing_is_rejected(tmp_path: Path) -> None:
    def skew_the_last(i: int, replica: Replica) -> None:
        if i == 3:
            skew_time(replica)

    async with running_replicas(KEYS, GENESIS, [tmp_path / f"r{i}" for i in range(len(KEYS))], FAST,
                                skew_the_last) as (replicas, tasks):
        await asyncio.gather(*(r.wait_for_height(12, 20.0) for r in replicas[:3]))
        assert not any(t.done() for t in tasks)
        store = await LedgerStore.open(tmp_path / "r0" / "ledger.sqlite", GENESIS)
        try:
            for height, raw, _ in await store.blocks(2, 100):
                block = decode_block(raw)
                assert block.proposer != KEYS[3].peer_id, f"height {height} took the skewed proposer's time"
                before = await store.validators(height - 1)
                previous = decode_block((await store.blocks(height - 1, 1))[0][1])
                assert before is not None
                assert block.time_ms == bft_time_ms(previous.time_ms, block.last_certificate(), before)
        finally:
            await store.close()
        assert sum(r.metrics.rounds for r in replicas[:3]) > 0  # its turns cost a round each
