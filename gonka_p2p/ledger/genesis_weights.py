"""Participant weights from the genesis file, for the executor draw, until the
ledger's state holds them; and the genesis of a local development network."""

from __future__ import annotations

from pathlib import Path

from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params, load_genesis, save_genesis

DEVNET_WEIGHT = 10
DEVNET_CLIENT_BALANCE = 1_000_000


def load_weights(path: Path) -> dict[str, int]:
    """Peer id -> weight. Raises GenesisError with a readable reason."""
    return load_genesis(path).weights()


def devnet_genesis(participant_pubkeys: list[bytes], clients: list[str],
                   models: tuple[str, ...] = ("smollm2-135m",),
                   params: Params | None = None) -> Genesis:
    """Equal weights for every participant, a starting balance for every client."""
    params = params or Params(price_per_token={m: 1 for m in models})
    return Genesis(
        chain_id="gonka-devnet",
        params=params,
        participants=tuple(GenesisParticipant(pubkey=pk, weight=DEVNET_WEIGHT, models=models)
                           for pk in participant_pubkeys),
        allocations={c: DEVNET_CLIENT_BALANCE for c in clients},
    )


def write_devnet_genesis(path: Path, participant_pubkeys: list[bytes], clients: list[str],
                         models: tuple[str, ...] = ("smollm2-135m",)) -> Genesis:
    genesis = devnet_genesis(participant_pubkeys, clients, models)
    save_genesis(genesis, path)
    return genesis
