"""The genesis record: who exists, who holds what, and every ledger parameter.

Everything the state machine needs that is not derived from blocks lives
here, in one record, so that two replicas holding the same genesis file
compute the same states: the chain id, the genesis time, the participants
(public key, weight = voting power and executor-draw weight, addresses,
models), the initial balances and :class:`Params`, the parameters table.

Units are fixed and declared with every parameter (:class:`Params`): coin
amounts are integers in the smallest coin unit (no floats ever reach the
state), durations are counted in blocks except where they compare against a
client-signed wall-clock timestamp (``request_window_ms``, milliseconds).

The file is TOML (for people) or JSON (for tools), chosen by suffix; both
hold the same tree::

    chain_id = "gonka-local"
    genesis_time_ms = 0                       # ms since the Unix epoch

    [params]
    epoch_length_blocks = 100                 # blocks per epoch
    ...
    [params.price_per_token]                  # coin units per token, per model
    "smollm2-135m" = 1

    [[participants]]
    pubkey = "02ab..."                        # compressed secp256k1, hex
    weight = 10
    addrs = ["/ip4/127.0.0.1/tcp/9000"]
    models = ["smollm2-135m"]

    [allocations]                             # coin units, by peer id
    "16Uiu2HAm..." = 1000000

    [models."smollm2-135m"]                   # optional per model: what the name means
    digest = "5f0c..."                        # SHA-256 of its weight, tokenizer, config files
    dtype = "float32"                         # the precision every engine loads it in
    distance_test = {...}                     # optional: the epoch test's distance run

    [verification.sprt]                       # the verification metric's parameters:
    honest_fail_rate = 0.005                  # the tree of inference/thresholds.toml
    [verification.models."smollm2-135m"]
    logprob_tolerance = 0.0003033
    ...

The ``verification`` tree pins, per network, the thresholds every validator
judges by (per model, with the calibration that chose them) and the epoch
test's design rates. The state machine never reads it -- floats stay out of
state transitions; its own epoch test runs on the integer ``sprt_*``
parameters, which :func:`sprt_params_from_rates` derives from the same rates
when the file is written -- but it is part of :meth:`Genesis.hash`, so
validators holding different thresholds are on different networks.

The ``models`` table (:mod:`gonka_p2p.ledger.model_pins`) pins per model the
digest of its files and its dtype; a node whose files differ refuses to serve
or validate that model. The state machine reads only a pin's optional
``distance_test`` (integers: the epoch test's distance run,
:mod:`gonka_p2p.ledger.distance_test`); the table is part of
:meth:`Genesis.hash` when present, and a record without pins hashes exactly
as before the table existed.

:func:`load_genesis` is total: any problem in the file is a :class:`GenesisError`
that names the offending entry. :meth:`Genesis.hash` is the canonical
SHA-256 of the record; it is the ``prev_hash`` of block 1 and part of every
app hash, so replicas started from different genesis files can never agree.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack
import tomli_w
from coincurve import PublicKey

from gonka_p2p.identity import PUBKEY_BYTES, digest, peer_id_from_pubkey
from gonka_p2p.ledger.model_pins import ModelPin, check_pins, pins_from_obj, pins_toml
from gonka_p2p.ledger.poc import schedule_problem
from gonka_p2p.ledger.rules import MAX_EXECUTOR_ATTEMPTS, PPM, is_account_address
from gonka_p2p.wire.messages import MAX_CHAIN_ID

MAX_SUPPLY = 2**63 - 1  # every balance, escrow and fee fits a signed 64-bit wire int
MAX_MODEL_NAME = 128
MAX_ADDR_LEN = 256
MAX_ADDRS = 8
MAX_MODELS = 16
SEED_COMMITMENT_BYTES = 32
MAX_VERIFICATION_DEPTH = 5  # verification.models.<model>.<dtype>.calibration
MAX_VERIFICATION_BYTES = 65_536
_HASH_DOMAIN = b"gonka-p2p/genesis/v1\x00"


class GenesisError(Exception):
    """The genesis record is unusable; the message names what and where, for people."""


def _param(default: int, unit: str, *, positive: bool = False, maximum: int | None = None) -> Any:
    """One parameter's single declaration: its default, its unit (written beside it in every
    genesis TOML) and its bounds (checked by the loader), so the three cannot drift apart.
    Every parameter is a non-negative integer; ``positive`` excludes 0, ``maximum`` caps it."""
    return field(default=default, metadata={"unit": unit, "positive": positive, "maximum": maximum})


@dataclass(frozen=True)
class Params:
    """The parameters table. Every field is declared once, with its unit and bounds (:func:`_param`).

    Rates and probabilities are integers in parts per million (``PPM`` = 1.0);
    log-likelihood ratios are integers in micro-nats (1e-6 natural-log units),
    so that no float ever enters a state transition.
    """

    epoch_length_blocks: int = _param(
        100, "blocks per epoch (epoch e holds heights e*L+1 .. (e+1)*L)", positive=True)
    inference_deadline_blocks: int = _param(
        20, "blocks after its StartInference within which a Finish must commit", positive=True)
    request_window_ms: int = _param(
        600_000, "ms either side of the block time a client request's timestamp may lie")
    max_tx_bytes: int = _param(
        1_048_576, "bytes; larger transactions are rejected before decoding", positive=True)
    prompt_overhead_per_turn_tokens: int = _param(
        8, "tokens the chat template may add per turn (escrow bound)")
    prompt_overhead_fixed_tokens: int = _param(
        16, "tokens the chat template may add per request (escrow bound)")
    max_held_finishes: int = _param(
        65_536, "FinishInference txs held, network-wide, while their Start is not committed", positive=True)
    max_held_finishes_per_executor: int = _param(1_024, "of those, held for any one executor", positive=True)
    max_executor_attempts: int = _param(  # see tx_rules.process_start_inference
        3, "executor draws a TA may try per request: a StartInference's attempt is below this",
        positive=True, maximum=MAX_EXECUTOR_ATTEMPTS)
    evidence_max_age_blocks: int = _param(
        100, "blocks after an equivocation within which its SubmitEvidence is accepted (its epoch's "
        "validator weights must still be held)", positive=True)
    tx_fee: int = _param(
        1, "coin units burned per applied transaction of a paying kind (transactions.Payer); "
        "protocol-critical kinds are free")
    price_per_token: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}),
        metadata={"unit": "coin units per token (prompt and completion alike), per model; >= 1"})
    # -- verification: the validation-rate floor m(traffic), Gonka's schedule --
    floor_full_until_inferences: int = _param(
        100, "inferences in the previous epoch up to which the validation floor is 100%")
    floor_mid_inferences: int = _param(
        5_000, "inferences at which the floor has fallen linearly to floor_mid_ppm")
    floor_mid_ppm: int = _param(
        50_000, "ppm; the validation floor at floor_mid_inferences", positive=True, maximum=PPM)
    floor_low_inferences: int = _param(
        10_000, "inferences at and above which the floor is floor_low_ppm (linear before)")
    floor_low_ppm: int = _param(10_000, "ppm; the lowest validation floor", positive=True, maximum=PPM)
    validation_cap_ppm: int = _param(  # see rules.validation_ppm
        990_000, "ppm; the highest validation rate (at 100 % every validator checks everything)",
        positive=True, maximum=PPM)
    # -- verification: windows --
    validation_window_blocks: int = _param(
        30, "blocks after an epoch's end during which its inferences may still be validated", positive=True)
    dispute_voting_blocks: int = _param(
        10, "blocks per dispute round: the committee is drawn, then votes until the round's last block",
        positive=True)
    dispute_draw_delay_blocks: int = _param(
        1, "blocks after a round starts whose hash draws its committee (< dispute_voting_blocks)",
        positive=True)
    dispute_max_rounds: int = _param(  # see rules.py, "Verification economics" 4
        2, "committees drawn for a dispute whose rounds close undecided; then it is undecided",
        positive=True)
    dispute_committee_size: int = _param(  # P(Bin(255, 1/3) > 127.5) = 2.1e-8: tests/adversarial/test_framing
        255, "seats drawn by weight with replacement; convicting needs a strict majority of all of them",
        positive=True)
    max_weight_shift_ppm: int = _param(  # see disputes.weight_cuts, poc.declined_targets
        100_000, "ppm of the total weight that one settlement may take from sanctioned participants, "
        "and one proof-of-compute round from those whose proven compute fell",
        positive=True, maximum=PPM)
    # -- reputation, misses --
    reputation_growth_epochs: int = _param(
        30, "clean epochs that take reputation from 0 to 1 (+1/N each)", positive=True)
    miss_rate_limit_ppm: int = _param(
        100_000, "ppm; an executor whose expired share of its inferences in an epoch is above it "
        "drops to reputation 0", maximum=PPM)
    # -- rewards --
    epoch_reward: int = _param(
        1_000_000, "coin units minted at most per settled epoch (epoch 0 excepted); forfeits are not minted",
        maximum=MAX_SUPPLY)
    validator_share_ppm: int = _param(
        200_000, "ppm of the epoch reward split by validation work; the rest by executed tokens", maximum=PPM)
    # -- open membership: proof of compute (ledger/poc.py), voting power --
    poc_enabled: int = _param(
        0, "1: weights are earned each epoch by proof of compute (genesis weights bootstrap epoch 0); "
        "0: a closed network whose genesis weights never change but by sanctions", maximum=1)
    poc_start_offset_blocks: int = _param(
        10, "blocks into each epoch at which its proof-of-compute round opens", positive=True)
    poc_compute_blocks: int = _param(
        10, "blocks of the compute window: commitments (Merkle root, count) land within it", positive=True)
    poc_secret_blocks: int = _param(
        3, "blocks after the compute window for revealing the committed secrets that seed the samples",
        positive=True)
    poc_reveal_blocks: int = _param(
        5, "blocks after the secrets for opening the sampled nonces (leaves with Merkle proofs)", positive=True)
    poc_verdict_blocks: int = _param(
        10, "blocks after the openings for validators to recompute them and send verdicts", positive=True)
    poc_confirm_compute_blocks: int = _param(
        5, "blocks of the confirmation round's compute window, opened at a random height later in the epoch",
        positive=True)
    poc_confirm_min_ppm: int = _param(
        500_000, "ppm; a confirmation must show at least this share of the nonces per block that earned the "
        "epoch's weight, or the weight goes", maximum=PPM)
    poc_sample_size: int = _param(
        50, "nonces opened and recomputed per commitment: a k-fold overclaim escapes with (1/k)^this",
        positive=True, maximum=256)
    poc_max_nonces: int = _param(
        2**32, "nonces one commitment may claim", positive=True, maximum=2**40)
    poc_max_newcomers: int = _param(
        64, "commitments per round from keys with no account: registration with proof of compute", positive=True)
    poc_join_pow_bits: int = _param(
        20, "leading zero bits of a newcomer's join stamp (poc.join_stamp_ok): the CPU a Sybil pays per key",
        maximum=32)
    max_weight_growth_ppm: int = _param(
        400_000, "ppm of the total weight by which all participants' weights together may grow per round "
        "(< 1/2, so that no newcomer reaches 1/3 of the power in one round)", positive=True, maximum=PPM)
    voting_power_cap_ppm: int = _param(
        333_333, "ppm of the total voting power one participant may hold (with 4 or more participants)",
        positive=True, maximum=PPM)
    # -- the epoch test: two Wald SPRTs over checked inferences, log-likelihood ratios. --
    # Defaults: sprt_params_from_rates of the verification metric's design rates
    # (inference/thresholds.toml [sprt]): honest fail 0.005, cheat fail 0.1, honest far 0.01, cheat far 0.3.
    sprt_failed_hit_llr_micro: int = _param(  # ln(0.1 / 0.005)
        2_995_732, "micro-nats; failure test: log-likelihood ratio (cheat:honest) added per failed inference",
        positive=True)
    sprt_failed_miss_llr_micro: int = _param(  # ln((1 - 0.005) / (1 - 0.1))
        100_348, "micro-nats; failure test: subtracted per inference that did not fail", positive=True)
    sprt_far_hit_llr_micro: int = _param(  # ln(0.3 / 0.01)
        3_401_197, "micro-nats; distance test: added per failed or suspicious inference", positive=True)
    sprt_far_miss_llr_micro: int = _param(  # ln((1 - 0.01) / (1 - 0.3))
        346_625, "micro-nats; distance test: subtracted per clean inference", positive=True)
    sprt_cheating_bound_micro: int = _param(  # ln((1 - 0.01) / 1e-4)
        9_200_290, "micro-nats; a run reaching +this accuses the executor (final for the epoch)", positive=True)
    sprt_honest_bound_micro: int = _param(  # -ln(0.01 / (1 - 1e-4))
        4_605_070, "micro-nats; a run reaching -this accepts honest and restarts from 0", positive=True)

    def __post_init__(self) -> None:
        # Frozen means frozen: a caller's dict must not be able to change prices later.
        object.__setattr__(self, "price_per_token",
                           MappingProxyType(dict(sorted(self.price_per_token.items()))))

    @property
    def dispute_span_blocks(self) -> int:
        """Blocks from a dispute's opening to the end of its last possible round."""
        return self.dispute_max_rounds * self.dispute_voting_blocks

    @property
    def settlement_delay_blocks(self) -> int:
        """Blocks from an epoch's last block to its settlement: validations, then disputes."""
        return self.validation_window_blocks + self.dispute_span_blocks


# Name -> declaration, in table order: what the loader accepts, the writer annotates and
# _validate bounds.
PARAM_FIELDS: Mapping[str, Field[Any]] = MappingProxyType({f.name: f for f in fields(Params)})


def sprt_params_from_rates(*, honest_fail_rate: float, honest_suspicious_rate: float,
                           cheat_fail_rate: float, cheat_suspicious_rate: float,
                           alpha: float, beta: float) -> dict[str, int]:
    """The integer parameters of the two Wald tests with these rates (the verification
    metric's ``SprtParams``; "suspicious" rates count failed-or-suspicious outputs), for a
    genesis file. Floats are used here, off-chain, once: the ledger only ever adds the
    integers this returns."""
    def micro(x: float) -> int:
        return round(x * 1_000_000)

    return {
        "sprt_failed_hit_llr_micro": micro(math.log(cheat_fail_rate / honest_fail_rate)),
        "sprt_failed_miss_llr_micro": micro(math.log((1.0 - honest_fail_rate) / (1.0 - cheat_fail_rate))),
        "sprt_far_hit_llr_micro": micro(math.log(cheat_suspicious_rate / honest_suspicious_rate)),
        "sprt_far_miss_llr_micro": micro(math.log((1.0 - honest_suspicious_rate)
                                                  / (1.0 - cheat_suspicious_rate))),
        "sprt_cheating_bound_micro": micro(math.log((1.0 - beta) / alpha)),
        "sprt_honest_bound_micro": micro(-math.log(beta / (1.0 - alpha))),
    }


@dataclass(frozen=True)
class GenesisParticipant:
    """A participant known from the start. ``weight`` is its voting power and draw weight.

    ``seed_commitment``: its validation seed commitment for epoch 0 (``rules.seed_commitment``),
    empty for none. Seeds for an epoch are committed during the epoch before it, which
    epoch 0 does not have; without commitments in genesis nothing served in epoch 0 could
    be checked, and a cheater would be paid for it."""

    pubkey: bytes
    weight: int
    addrs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    seed_commitment: bytes = b""

    @property
    def peer_id(self) -> str:
        return peer_id_from_pubkey(self.pubkey)


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    params: Params
    participants: tuple[GenesisParticipant, ...] = ()
    allocations: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    genesis_time_ms: int = 0
    # The verification metric's parameters (see the module docstring); empty: the
    # validators' own calibrated defaults.
    verification: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Model name -> the digest and dtype it pins (model_pins.py); empty: nothing pinned.
    models: Mapping[str, ModelPin] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "participants", tuple(self.participants))
        object.__setattr__(self, "allocations",
                           MappingProxyType(dict(sorted(self.allocations.items()))))
        object.__setattr__(self, "models", MappingProxyType(dict(sorted(self.models.items()))))
        object.__setattr__(self, "verification", _frozen_tree(self.verification, "verification", 1))
        _validate(self)

    @property
    def supply(self) -> int:
        """Coins in existence at height 0: the sum of all allocations."""
        return sum(self.allocations.values())

    def weights(self) -> dict[str, int]:
        """Peer id -> weight, for the executor draw and the validator set."""
        return {p.peer_id: p.weight for p in self.participants}

    def to_obj(self) -> dict[str, Any]:
        """The canonical tree (sorted maps, hex keys) that both file formats hold; ``models``
        only when something is pinned, so a record without pins keeps its hash."""
        pins = {"models": {m: pin.to_obj() for m, pin in self.models.items()}} if self.models else {}
        return {
            "chain_id": self.chain_id,
            "genesis_time_ms": self.genesis_time_ms,
            "params": {f.name: (dict(self.params.price_per_token) if f.name == "price_per_token"
                                else getattr(self.params, f.name)) for f in PARAM_FIELDS.values()},
            "participants": [{"pubkey": p.pubkey.hex(), "weight": p.weight,
                              "addrs": list(p.addrs), "models": list(p.models),
                              "seed_commitment": p.seed_commitment.hex()}
                             for p in self.participants],
            "allocations": dict(self.allocations),
            "verification": _plain_tree(self.verification),
            **pins,
        }

    def hash(self) -> bytes:
        """SHA-256 of the canonical msgpack of :meth:`to_obj`: the identity of this network."""
        return digest(_HASH_DOMAIN + msgpack.packb(self.to_obj(), use_bin_type=True))


def genesis_from_obj(obj: Any) -> Genesis:
    """Build a :class:`Genesis` from a parsed TOML/JSON tree, or raise :class:`GenesisError`."""
    if not isinstance(obj, dict):
        raise GenesisError("genesis must be a table")
    _only(obj, {"chain_id", "genesis_time_ms", "params", "participants", "allocations", "verification",
                "models"}, "genesis")
    raw_params = obj.get("params", {})
    if not isinstance(raw_params, dict):
        raise GenesisError("[params] must be a table")
    _only(raw_params, set(PARAM_FIELDS), "[params]")
    prices = raw_params.get("price_per_token", {})
    if not isinstance(prices, dict):
        raise GenesisError("[params.price_per_token] must be a table of model = price")
    values = {k: _int(v, f"params.{k}") for k, v in raw_params.items() if k != "price_per_token"}
    params = Params(**values, price_per_token={str(m): _int(p, f"price of {m!r}")
                                               for m, p in prices.items()})
    participants = []
    raw_parts = obj.get("participants", [])
    if not isinstance(raw_parts, list):
        raise GenesisError("participants must be an array of tables")
    for i, p in enumerate(raw_parts):
        where = f"participants[{i}]"
        if not isinstance(p, dict):
            raise GenesisError(f"{where} must be a table")
        _only(p, {"pubkey", "weight", "addrs", "models", "seed_commitment"}, where)
        participants.append(GenesisParticipant(
            pubkey=_hex(p.get("pubkey"), f"{where}.pubkey"), weight=_int(p.get("weight"), f"{where}.weight"),
            addrs=tuple(_str_list(p.get("addrs", []), f"{where}.addrs")),
            models=tuple(_str_list(p.get("models", []), f"{where}.models")),
            seed_commitment=_hex(p.get("seed_commitment", ""), f"{where}.seed_commitment")))
    allocations = obj.get("allocations", {})
    if not isinstance(allocations, dict):
        raise GenesisError("[allocations] must be a table of peer id = amount")
    try:
        models = pins_from_obj(obj.get("models", {}))
    except ValueError as e:
        raise GenesisError(str(e)) from None
    return Genesis(
        chain_id=_str(obj.get("chain_id"), "chain_id"),
        genesis_time_ms=_int(obj.get("genesis_time_ms", 0), "genesis_time_ms"),
        params=params, participants=tuple(participants),
        allocations={str(a): _int(v, f"allocation of {a}") for a, v in allocations.items()},
        verification=obj.get("verification", {}), models=models)


def load_genesis(path: Path) -> Genesis:
    """Read a genesis file: ``.json`` as JSON, anything else as TOML."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GenesisError(f"genesis file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenesisError(f"cannot read genesis file {path}: {e}") from None
    try:
        obj = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise GenesisError(f"genesis file {path} does not parse: {e}") from None
    return genesis_from_obj(obj)


def save_genesis(genesis: Genesis, path: Path) -> None:
    """Write ``genesis`` as JSON (``.json``) or as TOML with the units as comments."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(genesis.to_obj(), indent=2) + "\n")
    else:
        path.write_text(genesis_to_toml(genesis))


def genesis_to_toml(genesis: Genesis) -> str:
    """TOML for :class:`Genesis`. Strings are JSON-quoted: a JSON string is a TOML basic string."""
    obj = genesis.to_obj()
    q = json.dumps
    lines = [f"chain_id = {q(obj['chain_id'])}",
             f"genesis_time_ms = {obj['genesis_time_ms']}  # ms since the Unix epoch", "", "[params]"]
    for name, value in obj["params"].items():
        if name != "price_per_token":
            lines.append(f"{name} = {value}  # {PARAM_FIELDS[name].metadata['unit']}")
    lines += ["", f"[params.price_per_token]  # {PARAM_FIELDS['price_per_token'].metadata['unit']}"]
    lines += [f"{q(model)} = {price}" for model, price in obj["params"]["price_per_token"].items()]
    for p in obj["participants"]:
        lines += ["", "[[participants]]", f"pubkey = {q(p['pubkey'])}",
                  f"weight = {p['weight']}  # voting power and executor-draw weight",
                  f"addrs = {q(p['addrs'])}", f"models = {q(p['models'])}",
                  f"seed_commitment = {q(p['seed_commitment'])}  # epoch 0's validation seed, committed"]
    lines += ["", "[allocations]  # initial balances, coin units, by peer id"]
    lines += [f"{q(account)} = {amount}" for account, amount in obj["allocations"].items()]
    if obj["verification"]:
        lines += ["", "# Verification thresholds per model and the epoch test's rates (validators judge by",
                  "# these; see gonka_p2p/inference/verification.py).",
                  tomli_w.dumps({"verification": obj["verification"]})]
    if genesis.models:
        lines += ["", *pins_toml(genesis.models)]
    return "\n".join(lines) + "\n"


def _validate(g: Genesis) -> None:
    p = g.params
    if not (isinstance(g.chain_id, str) and 0 < len(g.chain_id) <= MAX_CHAIN_ID):
        raise GenesisError(f"chain_id must be a string of 1 to {MAX_CHAIN_ID} characters")
    for name, declared in PARAM_FIELDS.items():
        if name == "price_per_token":
            continue
        value, bounds = getattr(p, name), declared.metadata
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GenesisError(f"params.{name} must be a non-negative integer")
        if bounds["positive"] and value == 0:
            raise GenesisError(f"params.{name} must be positive")
        if bounds["maximum"] is not None and value > bounds["maximum"]:
            raise GenesisError(f"params.{name} must be at most {bounds['maximum']} ({bounds['unit']})")
    if not p.floor_full_until_inferences < p.floor_mid_inferences < p.floor_low_inferences:
        raise GenesisError("params: the floor schedule needs floor_full_until_inferences < "
                           "floor_mid_inferences < floor_low_inferences")
    if p.floor_low_ppm > p.floor_mid_ppm:
        raise GenesisError("params.floor_low_ppm must not exceed floor_mid_ppm (the floor only falls)")
    if (problem := schedule_problem(p)) is not None:
        raise GenesisError(f"params: {problem}")
    if p.settlement_delay_blocks > p.epoch_length_blocks:
        raise GenesisError("params: validation_window_blocks + dispute_max_rounds * dispute_voting_blocks "
                           "must not exceed epoch_length_blocks (an epoch settles before the next one ends)")
    if p.dispute_draw_delay_blocks >= p.dispute_voting_blocks:
        raise GenesisError("params.dispute_draw_delay_blocks must be below dispute_voting_blocks (a round "
                           "draws its committee, then leaves it blocks to vote in)")
    if not p.price_per_token:
        raise GenesisError("params.price_per_token must price at least one model")
    for model, price in p.price_per_token.items():
        if not 0 < len(model) <= MAX_MODEL_NAME:
            raise GenesisError(f"model name {model!r} must have 1 to {MAX_MODEL_NAME} characters")
        if not isinstance(price, int) or isinstance(price, bool) or price < 1:
            # A free model would let anyone open unbounded escrow-free inferences.
            raise GenesisError(f"price of {model!r} must be an integer >= 1 coin unit per token")
    seen: set[bytes] = set()
    for i, part in enumerate(g.participants):
        where = f"participants[{i}]"
        if len(part.pubkey) != PUBKEY_BYTES:
            raise GenesisError(f"{where}.pubkey must be a {PUBKEY_BYTES}-byte compressed key")
        try:
            PublicKey(part.pubkey)
        except Exception:  # noqa: BLE001 - coincurve raises several types for bad points
            raise GenesisError(f"{where}.pubkey is not a secp256k1 point") from None
        if part.pubkey in seen:
            raise GenesisError(f"{where} repeats a public key")
        seen.add(part.pubkey)
        if not isinstance(part.weight, int) or isinstance(part.weight, bool) or part.weight < 0:
            raise GenesisError(f"{where}.weight must be a non-negative integer")
        if len(part.addrs) > MAX_ADDRS or any(len(a) > MAX_ADDR_LEN for a in part.addrs):
            raise GenesisError(f"{where}.addrs: at most {MAX_ADDRS} of <= {MAX_ADDR_LEN} chars")
        if len(part.models) > MAX_MODELS:
            raise GenesisError(f"{where}.models: at most {MAX_MODELS}")
        if len(part.seed_commitment) not in (0, SEED_COMMITMENT_BYTES):
            raise GenesisError(f"{where}.seed_commitment must be {SEED_COMMITMENT_BYTES} bytes (or empty)")
        for model in part.models:
            if model not in p.price_per_token:
                raise GenesisError(f"{where} serves {model!r}, which has no price")
    for account, amount in g.allocations.items():
        if not is_account_address(account):
            raise GenesisError(f"allocation to {account!r}: not a secp256k1 peer id")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
            raise GenesisError(f"allocation to {account}: amount must be a non-negative integer")
    if g.supply > MAX_SUPPLY:
        raise GenesisError(f"total allocation {g.supply} exceeds {MAX_SUPPLY}")
    try:
        check_pins(g.models, p.price_per_token)
    except ValueError as e:
        raise GenesisError(str(e)) from None


def _frozen_tree(tree: Any, where: str, depth: int) -> Mapping[str, Any]:
    """A read-only, key-sorted copy of a verification table: tables of numbers, strings and
    lists of them, at most ``MAX_VERIFICATION_DEPTH`` deep. Anything else is a GenesisError."""
    if not isinstance(tree, Mapping):
        raise GenesisError(f"{where} must be a table")
    if depth > MAX_VERIFICATION_DEPTH:
        raise GenesisError(f"{where}: tables nest at most {MAX_VERIFICATION_DEPTH} deep")
    out: dict[str, Any] = {}
    for key, value in sorted(tree.items(), key=lambda kv: str(kv[0])):
        if not isinstance(key, str):
            raise GenesisError(f"{where}: keys must be strings, not {key!r}")
        inner = f"{where}.{key}"
        if isinstance(value, Mapping):
            out[key] = _frozen_tree(value, inner, depth + 1)
        elif isinstance(value, list | tuple):
            if not all(_is_scalar(v) for v in value):
                raise GenesisError(f"{inner}: lists hold numbers or strings only")
            out[key] = tuple(value)
        elif _is_scalar(value):
            if isinstance(value, float) and not math.isfinite(value):
                raise GenesisError(f"{inner} must be finite, not {value!r}")
            out[key] = value
        else:
            raise GenesisError(f"{inner}: {type(value).__name__} is not a number, string or table")
    if depth == 1 and len(msgpack.packb(_plain_tree(out), use_bin_type=True)) > MAX_VERIFICATION_BYTES:
        raise GenesisError(f"{where} is larger than {MAX_VERIFICATION_BYTES} bytes")
    return MappingProxyType(out)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def _plain_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The verification tree as plain dicts and lists (for msgpack, JSON and TOML)."""
    return {k: _plain_tree(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v
            for k, v in tree.items()}


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise GenesisError(f"{where}: unknown keys {', '.join(sorted(map(str, extra)))}")


def _hex(value: Any, where: str) -> bytes:
    try:
        return bytes.fromhex(_str(value, where))
    except ValueError:
        raise GenesisError(f"{where} is not hex") from None


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise GenesisError(f"{where} must be an integer, not {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise GenesisError(f"{where} must be a string")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GenesisError(f"{where} must be an array of strings")
    return value
