"""A local development network: keys and a genesis, for ``gonka-p2p init`` and the demo.

:func:`init_local_network` writes, into one directory, a key per node and
per client (0600, refusing to overwrite any) and ``genesis.toml`` in which
every node is a participant of equal weight serving the given models and
every client holds a starting balance. Everything else in the genesis is
the default parameters table, with a shorter epoch than production so that
settlement shows up within minutes. The genesis time is the time of
writing: the ledger judges a client request's timestamp against the last
block's time, so requests sent before the first block are fresh too. Given
the verification metric's parameters (the tree of the package's calibrated
``thresholds.toml``), the genesis pins them for the served models and
derives the ledger's integer epoch-test parameters from the same rates.
Each node's epoch-0 validation seed commitment goes into genesis too, so the
bootstrap epoch's inferences are checked like any other's. Every model is
pinned (``[models]``): the digest of the files this machine holds for it
(built or hashed here, so writing a network takes the model's hashing time
once) and the dtype asked for, float32 by default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gonka_p2p.identity import Keypair
from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES
from gonka_p2p.ledger.distance_test import DistanceTest, distance_test_from_noise
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params, save_genesis, sprt_params_from_rates
from gonka_p2p.ledger.model_pins import ModelPin
from gonka_p2p.ledger.rules import seed_commitment
from gonka_p2p.ledger.transactions import derive_validation_seed

if TYPE_CHECKING:
    from gonka_p2p.inference.verification_params import ModelThresholds

DEVNET_CHAIN_ID = "gonka-devnet"
DEVNET_WEIGHT = 10
DEVNET_CLIENT_BALANCE = 1_000_000
DEVNET_EPOCH_BLOCKS = 100
DEFAULT_MODELS = (DEFAULT_MODEL,)


class DevnetError(Exception):
    """The local network cannot be written as asked; the message is for people."""


@dataclass(frozen=True)
class LocalNetwork:
    genesis_path: Path
    genesis: Genesis
    node_keys: list[Path]
    client_keys: list[Path]


def epoch0_seed_commitment(key: Keypair, chain_id: str) -> bytes:
    """What a node's validator commits to for epoch 0 -- written into genesis, since epoch 0
    has no epoch before it in which to commit (the validator derives the same seed)."""
    return seed_commitment(0, key.peer_id, derive_validation_seed(key.secret, chain_id, 0))


def devnet_genesis(participant_pubkeys: list[bytes], clients: list[str],
                   models: tuple[str, ...] = DEFAULT_MODELS, client_balance: int = DEVNET_CLIENT_BALANCE,
                   epoch_length_blocks: int = DEVNET_EPOCH_BLOCKS, chain_id: str = DEVNET_CHAIN_ID,
                   genesis_time_ms: int = 0, verification: Mapping[str, Any] | None = None,
                   seed_commitments: list[bytes] | None = None, pins: Mapping[str, ModelPin] | None = None,
                   **params: int) -> Genesis:
    """Equal weights for every participant, ``client_balance`` for every client, each model at 1
    per token; ``params`` overrides other entries of the parameters table. ``verification``:
    the metric's parameters (thresholds per model, ``sprt`` rates), kept for ``models``.
    ``pins``: the models table (none: nothing pinned)."""
    pinned: dict[str, Any] = {}
    if verification:
        pinned = {**verification, "models": {m: t for m, t in verification.get("models", {}).items()
                                             if m in models}}
        if "sprt" in verification:
            params = {**sprt_params_from_rates(**verification["sprt"]), **params}
    return Genesis(
        chain_id=chain_id,
        genesis_time_ms=genesis_time_ms,
        params=Params(price_per_token={m: 1 for m in models}, epoch_length_blocks=epoch_length_blocks,
                      **params),
        participants=tuple(GenesisParticipant(pubkey=pk, weight=DEVNET_WEIGHT, models=models,
                                              seed_commitment=commitment)
                           for pk, commitment in zip(participant_pubkeys,
                                                     seed_commitments or [b""] * len(participant_pubkeys),
                                                     strict=True)),
        allocations={c: client_balance for c in clients},
        verification=pinned,
        models=pins or {},
    )


def pin_models(models: tuple[str, ...], dtype: str,
               verification: Mapping[str, Any] | None = None) -> dict[str, ModelPin]:
    """Each model's pin, under the name it is served as (a directory's own name), from the files
    this machine holds for it (building a known model if missing); with the distance run that
    ``verification``'s thresholds calibrate for it at ``dtype``, where they do."""
    from gonka_p2p.inference.model_identity import model_digest  # imports torch: only when writing
    from gonka_p2p.inference.models import resolve_model, served_name

    if dtype not in DTYPES:
        raise DevnetError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    names = {m: served_name(m) for m in models}
    tests = distance_tests(verification or {}, {name: dtype for name in names.values()})
    return {name: ModelPin(digest=model_digest(resolve_model(m)), dtype=dtype, distance_test=tests.get(name))
            for m, name in names.items()}


def distance_tests(verification: Mapping[str, Any], dtypes: Mapping[str, str]) -> dict[str, DistanceTest]:
    """The distance run of each model in ``dtypes`` whose thresholds at its dtype measure honest
    distance (``verification_params.DISTANCE_RUN``): honest mean against a cheat
    ``CHEAT_DISTANCE_EXCESS`` above it, counting at most the calibration's longest output."""
    from gonka_p2p.inference.verification_params import verification_params_from_obj

    try:
        calibrated = verification_params_from_obj(
            {**verification, "models": {m: t for m, t in verification.get("models", {}).items() if m in dtypes}},
            dtypes).models
    except (ValueError, TypeError) as e:
        raise DevnetError(f"the verification thresholds: {e}") from None
    return {model: test for model, t in calibrated.items() if (test := distance_test_of(t)) is not None}


def distance_test_of(thresholds: ModelThresholds) -> DistanceTest | None:
    """The distance run a model's thresholds calibrate (None: they measure no honest distance):
    its honest mean against a cheat ``CHEAT_DISTANCE_EXCESS`` above it."""
    from gonka_p2p.inference.verification_params import CHEAT_DISTANCE_EXCESS

    honest, noise, tokens = thresholds.honest_distance, thresholds.distance_noise, thresholds.distance_tokens
    if honest is None or noise is None or tokens is None:
        return None
    return distance_test_from_noise(honest_mean=honest, cheat_mean=(1 + CHEAT_DISTANCE_EXCESS) * honest,
                                    token_sd=noise, max_tokens=tokens)


def init_local_network(directory: Path, nodes: int, clients: int, models: tuple[str, ...] = DEFAULT_MODELS,
                       client_balance: int = DEVNET_CLIENT_BALANCE,
                       epoch_length_blocks: int = DEVNET_EPOCH_BLOCKS,
                       chain_id: str = DEVNET_CHAIN_ID, verification: Mapping[str, Any] | None = None,
                       dtype: str = DEFAULT_DTYPE, **params: int) -> LocalNetwork:
    """Write ``node{i}.key``, ``client{j}.key`` and ``genesis.toml`` into ``directory``, each
    model pinned to this machine's copy of it in ``dtype``."""
    if nodes < 1:
        raise DevnetError("a network needs at least one node (--nodes >= 1)")
    if clients < 0 or client_balance < 0:
        raise DevnetError("--clients and --client-balance must not be negative")
    if epoch_length_blocks < 1:
        raise DevnetError("--epoch-length must be at least 1 block")
    if not models:
        raise DevnetError("name at least one model")
    directory = Path(directory)
    node_paths = [directory / f"node{i}.key" for i in range(nodes)]
    client_paths = [directory / f"client{j}.key" for j in range(clients)]
    genesis_path = directory / "genesis.toml"
    taken = [p for p in [genesis_path, *node_paths, *client_paths] if p.exists()]
    if taken:
        raise DevnetError(f"{taken[0]} already exists; refusing to overwrite a network (use another directory)")
    pins = pin_models(models, dtype, verification)
    node_keys = [Keypair.generate() for _ in node_paths]
    client_keys = [Keypair.generate() for _ in client_paths]
    genesis = devnet_genesis([k.public_key for k in node_keys], [k.peer_id for k in client_keys], tuple(pins),
                             client_balance, epoch_length_blocks, chain_id, int(time.time() * 1000),
                             verification, [epoch0_seed_commitment(k, chain_id) for k in node_keys],
                             pins, **params)  # validated before writing
    for key, path in zip(node_keys + client_keys, node_paths + client_paths):
        key.save(path)
    save_genesis(genesis, genesis_path)
    return LocalNetwork(genesis_path, genesis, node_paths, client_paths)
