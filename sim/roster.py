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

import hashlib
import random
from dataclasses import dataclass
from enum import StrEnum

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.devnet import epoch0_seed_commitment
from gonka_p2p.ledger.distance_test import DistanceTest
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.model_pins import ModelPin
from gonka_p2p.ledger.rules import PPM

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
    # The detection matrix's other cheats (benchmarks/detection_matrix.py names each row):
    FP16 = "fp16"  # subtle: half precision instead of the pinned dtype
    FP8 = "fp8"  # subtle: fake-quantized e4m3 weights (a bf16 row of the matrix)
    FABRICATED = "fabricated"  # gross: made-up logprobs
    TRUNCATED = "truncated"  # gross: the completion cut short
    ALTERED = "altered"  # gross: tokens changed after generation
    FEWER_TOKENS = "fewer-tokens"  # gross: stops before the length the request allowed
    WRONG_TEMPERATURE = "wrong-temperature"  # gross: samples at another temperature
    STATED_TEMPERATURE = "stated-temperature"  # gross: states another temperature than the request's
    STATED_TOP_K = "stated-top-k"  # gross: states another top-k
    STATED_TOP_P = "stated-top-p"  # gross: states another top-p
    STEERING = "steering"  # gross: a system prompt of its own slipped in
    LAZY = "lazy"  # a validator that skips its duties and votes
    COLLUDING = "colluding"  # a validator that rubber-stamps its partner executor
    SILENT = "silent"  # an executor that goes silent on some of its requests
    FRAMING = "framing"  # a validator that fails honest work (alone or as a coalition)
    SYBIL = "sybil"  # one owner's weight split over many identities that cheat and pass each other
    SELF_DEALING = "self-dealing"  # one owner's client, TA and executor: pays itself to mint rewards
    POC_OVERCLAIM = "poc-overclaim"  # claims k x the nonces it computed (sim.poc)
    POC_RENTER = "poc-renter"  # rents hardware for the regular proof-of-compute window only (sim.poc)

    @property
    def needs_poc(self) -> bool:
        """It cheats proof of compute: a network without it has nothing for it to cheat."""
        return self in (Strategy.POC_OVERCLAIM, Strategy.POC_RENTER)

    @property
    def validates_dishonestly(self) -> bool:
        """Its checks and votes are not the evidence's verdict (the report names what it did)."""
        return self in (Strategy.LAZY, Strategy.COLLUDING, Strategy.FRAMING, Strategy.SYBIL)

    @property
    def cheats_as_executor(self) -> bool:
        """Its outputs are not the pinned model's (the verdict table has a row for it)."""
        return self in EXECUTOR_CHEATS or self is Strategy.SYBIL

    @property
    def gross(self) -> bool:
        return self in EXECUTOR_CHEATS and self not in SUBTLE_CHEATS


# The matrix's cheats the default mix leaves to their own scenario (``matrix-cheats``).
MATRIX_ONLY_CHEATS: tuple[Strategy, ...] = (
    Strategy.FP16, Strategy.FP8, Strategy.FABRICATED, Strategy.TRUNCATED, Strategy.ALTERED,
    Strategy.FEWER_TOKENS, Strategy.WRONG_TEMPERATURE, Strategy.STATED_TEMPERATURE, Strategy.STATED_TOP_K,
    Strategy.STATED_TOP_P, Strategy.STEERING)
# What an executor can run instead of the pinned model: every cheat row of the detection matrix.
EXECUTOR_CHEATS: tuple[Strategy, ...] = (
    Strategy.INT4, Strategy.PREFILL, Strategy.SMALL_MODEL, Strategy.INT8, Strategy.BF16, *MATRIX_ONLY_CHEATS)
# Those whose outputs mostly pass a check: the epoch test, not one check, catches them.
SUBTLE_CHEATS = frozenset({Strategy.INT8, Strategy.BF16, Strategy.FP16, Strategy.FP8})

# One of each strategy that one identity plays alone (owners of several identities and framers:
# their own scenarios).
DEFAULT_MIX: dict[Strategy, int] = {s: 1 for s in Strategy if not s.needs_poc and s not in (
    Strategy.HONEST, Strategy.SYBIL, Strategy.FRAMING, Strategy.SELF_DEALING, *MATRIX_ONLY_CHEATS)}


@dataclass(frozen=True)
class Peer:
    index: int
    key: Keypair
    weight: int
    strategy: Strategy
    online: tuple[bool, ...]  # per epoch
    capacity: int = 0  # proof of compute: nonces it computes per block (sim.poc)
    joins: int = 0  # the epoch whose proof-of-compute round registers it (0: in genesis)

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    def serves(self, epoch: int) -> bool:
        """Online and registered: a joiner serves from the epoch after the round that registers it."""
        return self.online[epoch] and (not self.joins or epoch > self.joins)

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
    own_client: dict[str, Keypair]  # self-dealing TA identity -> its owner's client key
    own_executor: dict[str, str]  # self-dealing TA identity -> its owner's executor identity
    spammer: Keypair | None  # a client that floods the network with the cheapest requests

    def by_id(self) -> dict[str, Peer]:
        return {p.peer_id: p for p in self.peers}


def per_owner(strategy: Strategy, sybil_identities: int) -> int:
    """Identities one owner of ``strategy`` runs: a sybil ``sybil_identities``, a self-dealer two
    (the TA its client sends to, and the executor it hopes the draw gives the work to)."""
    return {Strategy.SYBIL: sybil_identities, Strategy.SELF_DEALING: 2}.get(strategy, 1)


def identities(mix: dict[Strategy, int], sybil_identities: int) -> list[Strategy]:
    """One strategy per identity."""
    return [s for s, n in mix.items() for _ in range(n * per_owner(s, sybil_identities))]


def build_roster(seed: int, peers: int, clients: int, epochs: int, mix: dict[Strategy, int],
                 churn: float, adversary_share: float = 0.0, sybil_identities: int = 1,
                 spam: bool = False) -> Roster:
    """``peers`` participants with weights in [5, 20], ``mix[s]`` of them playing s (a sybil
    owner as ``sybil_identities`` identities splitting one drawn weight), the rest honest; each
    honest one leaves at an epoch boundary with probability ``churn`` and returns with
    probability 1/2 per epoch. With ``adversary_share`` > 0 the non-honest owners hold that
    share of the total weight, evenly; a self-dealing owner's identities pair up in index order
    (TA, executor), its client a key of its own. A colluding validator's partner is the heaviest gross
    cheater (else any cheater): the case where rubber-stamping matters most."""
    rng = random.Random(f"roster/{seed}")
    strategies = identities(mix, sybil_identities)
    strategies += [Strategy.HONEST] * (peers - len(strategies))
    rng.shuffle(strategies)
    weights = [rng.randint(5, 20) for _ in strategies]
    schedules = []
    for strategy in strategies:
        online = [True]
        for _ in range(1, epochs):
            stay = rng.random() >= churn if online[-1] else rng.random() < 0.5
            online.append(stay if strategy is Strategy.HONEST else True)
        schedules.append(tuple(online))
    owners = sum(mix.values())
    if adversary_share > 0 and owners:
        honest = sum(w for w, s in zip(weights, strategies, strict=True) if s is Strategy.HONEST)
        owner_weight = max(1, round(adversary_share / (1 - adversary_share) * honest / owners))
        weights = [w if s is Strategy.HONEST else owner_weight for w, s in zip(weights, strategies, strict=True)]
    weights = [max(1, w // per_owner(s, sybil_identities)) for w, s in zip(weights, strategies, strict=True)]
    roster = [Peer(i, Keypair.from_seed(f"sim/{seed}/peer/{i}".encode()), weights[i], strategy, schedules[i])
              for i, strategy in enumerate(strategies)]
    cheaters = sorted((not p.strategy.gross, -p.weight, p.index) for p in roster
                      if p.strategy.cheats_as_executor and p.strategy is not Strategy.SYBIL)
    partner = {}
    if cheaters:
        target = roster[cheaters[0][2]].peer_id
        partner = {p.peer_id: target for p in roster if p.strategy is Strategy.COLLUDING}
    keys = tuple(Keypair.from_seed(f"sim/{seed}/client/{j}".encode()) for j in range(clients))
    dealers = [p for p in roster if p.strategy is Strategy.SELF_DEALING]
    tas, executors = dealers[0::2], dealers[1::2]
    own_client = {ta.peer_id: Keypair.from_seed(f"sim/{seed}/own-client/{ta.index}".encode()) for ta in tas}
    own_executor = {ta.peer_id: ex.peer_id for ta, ex in zip(tas, executors, strict=True)}
    spammer = Keypair.from_seed(f"sim/{seed}/spammer".encode()) if spam else None
    return Roster(tuple(roster), keys, partner, own_client, own_executor, spammer)


def build_genesis(roster: Roster, params: Params, dtype: str = "float32",
                  distance_test: DistanceTest | None = None) -> Genesis:
    """The network's genesis: ``params`` (see :func:`sim_params`); every client funded far
    beyond what it will spend; each peer online at the start committed to its epoch-0
    validation seed, as ``init`` writes; joiners are not in it. With a ``distance_test`` the
    model is pinned at ``dtype`` with that run (its digest stands in for files the simulator
    has none of); without one it is not pinned, as before pins existed."""
    pins = {} if distance_test is None else {MODEL: ModelPin(
        digest=hashlib.sha256(MODEL.encode()).hexdigest(), dtype=dtype, distance_test=distance_test)}
    return Genesis(
        chain_id=CHAIN_ID, genesis_time_ms=GENESIS_TIME_MS, params=params, models=pins,
        participants=tuple(GenesisParticipant(
            p.key.public_key, p.weight, models=(MODEL,),
            seed_commitment=epoch0_seed_commitment(p.key, CHAIN_ID) if p.online[0] else b"")
            for p in roster.peers if not p.joins),
        allocations={c.peer_id: CLIENT_BALANCE for c in (*roster.clients, *roster.own_client.values(),
                                                         *([roster.spammer] if roster.spammer else []))})


def sim_params(epoch_blocks: int, floor: float, overrides: dict[str, int]) -> Params:
    """The ledger's default parameters, one model at 1 coin per token, the epoch length, a flat
    validation floor if ``floor`` > 0 (the schedule's three points all at it), then
    ``overrides`` by name. Unknown names raise TypeError; the ledger's bounds are checked when
    the genesis is built (GenesisError)."""
    flat: dict[str, int] = {}
    if floor > 0:
        ppm = max(1, round(floor * PPM))
        flat = {"floor_full_until_inferences": 0, "floor_mid_inferences": 1, "floor_low_inferences": 2,
                "floor_mid_ppm": ppm, "floor_low_ppm": ppm}
    return Params(**{"price_per_token": {MODEL: 1}, "epoch_length_blocks": epoch_blocks, **flat, **overrides})
