"""Who takes part in a simulated network: keys, weights, strategies, churn, and the genesis.

Everything here is drawn from the run's seed before the first block, so a
roster is a pure function of (config, seed): peers' keys come from
``Keypair.from_seed`` of their names, and the online schedule (churn) is
fixed up front. Churn is modelled at epoch boundaries: a leaving peer
announces it (commits no seed for the epoch it will miss, still finishes
the duties of epochs it committed to); a returning peer is routed work at
once but, having committed no seed for that epoch, forfeits its first
epoch's reward -- the protocol's rule, visible in the results. Only honest
peers churn, so each strategy's measurements are about the strategy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.devnet import epoch0_seed_commitment
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params

CHAIN_ID = "gonka-sim"
MODEL = "sim-model"
GENESIS_TIME_MS = 1_700_000_000_000
CLIENT_BALANCE = 10**12


class Strategy(StrEnum):
    HONEST = "honest"
    INT4 = "int4"  # gross: quantized weights
    PREFILL = "prefill"  # gross: a cheap model writes, the real one is teacher-forced
    SMALL_MODEL = "small-model"  # gross: fewer layers
    INT8 = "int8"  # subtle
    BF16 = "bf16"  # subtle
    LAZY = "lazy"  # a validator that skips its duties and votes
    COLLUDING = "colluding"  # a validator that rubber-stamps its partner executor
    SILENT = "silent"  # an executor that goes silent on some of its requests

    @property
    def cheats_as_executor(self) -> bool:
        """Its outputs are not the pinned model's (the verdict table has a row for it)."""
        return self in (Strategy.INT4, Strategy.PREFILL, Strategy.SMALL_MODEL, Strategy.INT8,
                        Strategy.BF16)

    @property
    def gross(self) -> bool:
        return self in (Strategy.INT4, Strategy.PREFILL, Strategy.SMALL_MODEL)


DEFAULT_MIX: dict[Strategy, int] = {s: 1 for s in Strategy if s is not Strategy.HONEST}


@dataclass(frozen=True)
class Peer:
    index: int
    key: Keypair
    weight: int
    strategy: Strategy
    online: tuple[bool, ...]  # per epoch

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    @property
    def name(self) -> str:
        return f"p{self.index:02d}-{self.strategy}"

    @property
    def churns(self) -> bool:
        return not all(self.online)


@dataclass(frozen=True)
class Roster:
    peers: tuple[Peer, ...]
    clients: tuple[Keypair, ...]
    partner: dict[str, str]  # colluding validator -> the executor it rubber-stamps

    def by_id(self) -> dict[str, Peer]:
        return {p.peer_id: p for p in self.peers}


def build_roster(seed: int, peers: int, clients: int, epochs: int, mix: dict[Strategy, int],
                 churn: float) -> Roster:
    """``peers`` participants with weights in [5, 20], ``mix[s]`` of them playing s, the rest
    honest; each honest one leaves at an epoch boundary with probability ``churn`` and returns
    with probability 1/2 per epoch. A colluding validator's partner is the heaviest gross cheater
    (else any cheater): the case where rubber-stamping matters most."""
    rng = random.Random(f"roster/{seed}")
    strategies = [s for s, n in mix.items() for _ in range(n)]
    strategies += [Strategy.HONEST] * (peers - len(strategies))
    rng.shuffle(strategies)
    roster = []
    for i, strategy in enumerate(strategies):
        online = [True]
        for _ in range(1, epochs):
            stay = rng.random() >= churn if online[-1] else rng.random() < 0.5
            online.append(stay if strategy is Strategy.HONEST else True)
        roster.append(Peer(i, Keypair.from_seed(f"sim/{seed}/peer/{i}".encode()), rng.randint(5, 20),
                           strategy, tuple(online)))
    cheaters = sorted((not p.strategy.gross, -p.weight, p.index) for p in roster if p.strategy.cheats_as_executor)
    partner = {}
    if cheaters:
        target = roster[cheaters[0][2]].peer_id
        partner = {p.peer_id: target for p in roster if p.strategy is Strategy.COLLUDING}
    keys = tuple(Keypair.from_seed(f"sim/{seed}/client/{j}".encode()) for j in range(clients))
    return Roster(tuple(roster), keys, partner)


def build_genesis(roster: Roster, epoch_blocks: int) -> Genesis:
    """The network's genesis: the ledger's default parameters but for the epoch length (and
    one model at 1 coin per token); every client funded far beyond what it will spend; each
    peer online at the start committed to its epoch-0 validation seed, as ``init`` writes."""
    return Genesis(
        chain_id=CHAIN_ID, genesis_time_ms=GENESIS_TIME_MS,
        params=Params(price_per_token={MODEL: 1}, epoch_length_blocks=epoch_blocks),
        participants=tuple(GenesisParticipant(
            p.key.public_key, p.weight, models=(MODEL,),
            seed_commitment=epoch0_seed_commitment(p.key, CHAIN_ID) if p.online[0] else b"")
            for p in roster.peers),
        allocations={c.peer_id: CLIENT_BALANCE for c in roster.clients})
