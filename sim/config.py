"""A simulation's knobs, each declared once: its scenario section, default, help and check.

A scenario file (:mod:`sim.scenario`) is a TOML document whose tables are the
sections below (``[network]``, ``[behaviour]``, ``[validation]``,
``[economics]``, ``[consensus]``, ``[poc]``) plus three free tables: ``[mix]`` (strategy -> peers playing
it), ``[economics.savings]`` (strategy -> share of compute its cheat saves)
and ``[params]`` (any genesis parameter, by name, checked by the ledger's own
genesis validation). The loader, the sweep's ``--param`` and the report all
read :class:`SimConfig`'s field metadata, so a knob added here is at once a
scenario field, a sweepable parameter and a line of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, get_type_hints

from gonka_p2p.ledger.genesis import Params
from sim.poc import poc_windows
from sim.roster import EXECUTOR_CHEATS, Strategy

Check = Callable[[Any], str | None]  # a value -> why it is wrong, or None


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def probability(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be a probability in [0, 1]"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _knob(default: Any, section: str, help: str, check: Check | None = None) -> Any:
    metadata = {"section": section, "help": help, "check": check}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# Share of an honest execution's compute that each cheat saves (what it gains by cheating).
DEFAULT_SAVINGS: MappingProxyType[str, float] = MappingProxyType({
    "int4": 0.5, "prefill": 0.7, "small-model": 0.6, "int8": 0.3, "bf16": 0.2, "sybil": 0.5,
    "self-dealing": 0.5,
    # the matrix's other cheats: half precision or fp8 saves like bf16 / int8; made-up or cut
    # answers save most of the compute; the stated / steered / temperature cheats save nothing
    "fp16": 0.2, "fp8": 0.3, "fabricated": 0.9, "truncated": 0.5, "fewer-tokens": 0.5})


@dataclass(frozen=True)
class SimConfig:
    seed: int
    # -- network --
    peers: int = _knob(50, "network", "participants (weights drawn in 5..20)", at_least(3))
    epochs: int = _knob(20, "network", "epochs simulated", at_least(1))
    requests: int = _knob(300, "network", "client requests per epoch", at_least(0))
    clients: int = _knob(100, "network", "client accounts sending them", at_least(1))
    epoch_blocks: int = _knob(100, "network", "blocks per epoch", at_least(1))
    latency: int = _knob(2, "network", "max blocks a message takes to reach a block", at_least(0))
    churn: float = _knob(0.05, "network", "chance an honest peer leaves at an epoch boundary", probability)
    signatures: str = _knob("real", "network", "secp256k1, or a keyed hash standing in for it (faster; "
                            "sim.signatures)", one_of("real", "keyed-hash"))
    # -- behaviour --
    cheat_from: int = _knob(1, "behaviour", "first epoch in which cheaters cheat", at_least(0))
    cheat_fraction: float = _knob(1.0, "behaviour", "q: share of its requests a cheater cheats on",
                                  probability)
    cheat_below_validation: float = _knob(
        1.0, "behaviour", "a cheater cheats only while the ledger's validation rate of its work is at "
        "most this (1: always; 0.1: once its reputation has brought the rate to 10 %)", probability)
    silent_rate: float = _knob(0.5, "behaviour", "share of its requests a silent executor drops",
                               probability)
    adversary_weight_share: float = _knob(
        0.0, "behaviour", "share of the total weight the non-honest peers hold together (0: their "
        "weights are drawn like everyone's)", lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)")
    sybil_identities: int = _knob(8, "behaviour", "identities each sybil owner splits its weight into",
                                  at_least(1))
    sybil_cheat: str = _knob("int4", "behaviour", "the cheat sybil identities run",
                             one_of(*map(str, EXECUTOR_CHEATS)))
    self_dealing_requests: int = _knob(
        100, "behaviour", "requests per epoch a self-dealing owner's client sends through its own TA",
        at_least(0))
    self_dealing_cheat: str = _knob(
        "int4", "behaviour", "what a self-dealer's executor runs for its own client ('honest': the real "
        "model, at full cost)", one_of("honest", *map(str, EXECUTOR_CHEATS)))
    spam_requests: int = _knob(
        0, "behaviour", "requests per epoch a spamming client sends (1 token each, to random TAs)",
        at_least(0))
    # -- validation --
    verdicts: str = _knob("matrix", "validation", "verdict rates: the measured detection matrix, or "
                          "the design targets", one_of("matrix", "design"))
    matrix: str = _knob("", "validation", "the detection matrix file, JSON as benchmarks/detection_matrix.py "
                        "writes it (empty: benchmarks/results/detection_matrix.json)")
    matrix_model: str = _knob("", "validation", "the matrix's model (empty: the one with most rows)")
    matrix_dtype: str = _knob("float32", "validation", "the pinned dtype whose matrix rows give the rates "
                              "(bfloat16: the bf16 rows, where int8 and fp8 are subtle)",
                              one_of("float32", "bfloat16"))
    distance_run: bool = _knob(True, "validation", "pin the matrix model's distance run in genesis where its "
                               "thresholds at matrix_dtype calibrate one (bfloat16), as gonka-p2p init does: "
                               "passing checks then report distances drawn from the matrix")
    independent_checks: bool = _knob(False, "validation", "each check and vote draws its own verdict "
                                     "(else one per inference, a deterministic re-run)")
    floor: float = _knob(0.0, "validation", "a flat validation floor m at every traffic (0: the "
                         "ledger's schedule, params.floor_*)", probability)
    # -- economics --
    compute_cost_per_token: float = _knob(
        0.5, "economics", "coins an honest execution of one token costs its executor (price: 1)",
        at_least(0.0))
    savings: dict[str, float] = _knob(dict(DEFAULT_SAVINGS), "economics.savings",
                                      "share of compute each cheat saves, by strategy")
    # -- consensus (sim.consensus_run) --
    validators: int = _knob(0, "consensus", "replicas running Tendermint for the chain, equal power "
                            "(0: no consensus simulated; every block commits, one a second)", at_least(0))
    byzantine_share: float = _knob(0.0, "consensus", "share of the replicas that are byzantine (rounded "
                                   "up: 1/4 of 7 is 2)", probability)
    byzantine: str = _knob("equivocate", "consensus", "what byzantine replicas do: sign conflicting "
                           "twins and propose invalid blocks, withhold their votes, or crash (send nothing)",
                           one_of("equivocate", "withhold", "crash"))
    partitions: int = _knob(0, "consensus", "partition windows that form and heal during the run, "
                            "each splitting the replicas into two halves", at_least(0))
    partition_ms: int = _knob(5_000, "consensus", "the longest a partition holds, ms", at_least(1))
    max_delay_ms: int = _knob(50, "consensus", "a consensus message's delay, at most (ms)", at_least(1))
    stall_ms: int = _knob(30_000, "consensus", "virtual time without a commit after which the chain is "
                          "reported stalled (ms)", at_least(1))
    real_signatures: bool = _knob(False, "consensus", "replicas sign and verify votes with secp256k1 "
                                  "(else the keyed hash of sim.consensus_sim: the same protocol, faster)")
    # -- proof of compute (sim.poc) --
    proof_of_compute: bool = _knob(False, "poc", "weights earned each epoch by proof of compute, with the "
                                   "ledger's windows scaled to the epoch (sim.poc.poc_windows)")
    capacity_min: int = _knob(5, "poc", "the least nonces per block a participant computes", at_least(1))
    capacity_max: int = _knob(20, "poc", "the most (capacities drawn uniformly in between)", at_least(1))
    capacity_noise: float = _knob(0.05, "poc", "a round's nonces vary by up to this share", probability)
    overclaim: float = _knob(2.0, "poc", "k: a poc-overclaim peer claims k x the nonces it computed",
                             at_least(1.0))
    rent_factor: float = _knob(4.0, "poc", "a poc-renter's regular window runs on this many times its own "
                               "hardware", at_least(1.0))
    joiners: int = _knob(0, "poc", "new keys that join by proof of compute at join_epoch", at_least(0))
    join_epoch: int = _knob(2, "poc", "the epoch whose round the joiners commit in", at_least(1))
    leavers: int = _knob(0, "poc", "honest genesis peers that stop proving and serving at leave_epoch",
                         at_least(0))
    leave_epoch: int = _knob(3, "poc", "the first epoch the leavers miss", at_least(1))
    # -- free tables --
    mix: dict[str, int] = _knob({}, "mix", "non-honest peers: strategy = count (the rest are honest)")
    params: dict[str, int] = _knob({}, "params", "genesis parameters overriding the ledger's defaults")

    def strategy_mix(self) -> dict[Strategy, int]:
        return {Strategy(name): count for name, count in self.mix.items()}

    def genesis_overrides(self) -> dict[str, int]:
        """The genesis parameters the run changes: proof of compute's (if on), then ``params``."""
        return {**(poc_windows(self.epoch_blocks, self.latency) if self.proof_of_compute else {}), **self.params}

    def describe(self) -> dict[str, object]:
        """Every knob as plain data (in the report and its digest)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def scalar_knobs() -> dict[str, Field[Any]]:
    """``section.name`` -> the field, for every scalar knob (what a sweep may vary)."""
    return {f"{f.metadata['section']}.{f.name}": f for f in fields(SimConfig)
            if "section" in f.metadata and f.default is not MISSING}


def table_knobs() -> dict[str, Field[Any]]:
    """Section -> the field, for the free tables (``mix``, ``economics.savings``, ``params``)."""
    return {f.metadata["section"]: f for f in fields(SimConfig)
            if "section" in f.metadata and f.default is MISSING}


def table_entry_kind(path: str) -> type | None:
    """The type of one entry of a free table -- ``params.NAME`` (a genesis parameter: int),
    ``mix.STRATEGY`` (int), ``economics.savings.STRATEGY`` (float) -- so that ``--set`` and a
    sweep's ``--param`` reach it as they reach a scalar knob; None for any other path."""
    section, _, name = path.rpartition(".")
    if section == "params":
        return int if get_type_hints(Params).get(name) == int else None
    if section == "mix":
        return int if name in set(map(str, Strategy)) else None
    if section == "economics.savings":
        return float if name in set(map(str, Strategy)) else None
    return None


def knob_kind(path: str) -> type | None:
    """The type of the values ``path`` takes -- a scalar knob, or one entry of a free table
    (:func:`table_entry_kind`) -- or None when ``--set`` and ``--param`` cannot reach it."""
    knob = scalar_knobs().get(path)
    return type(knob.default) if knob is not None else table_entry_kind(path)
