"""The genesis as it travels between peers, so that a node can join with a bootstrap address only.

A node that starts without a genesis file asks its bootstrap peers for theirs
(``/gonka/ledger/genesis/1``, served by ``actors/genesis_exchange.py``). What
travels is the *canonical* form: exactly the bytes :meth:`Genesis.hash`
hashes (the msgpack of :meth:`Genesis.to_obj`, without the hash's domain
prefix). Two honest peers of one network therefore serve identical bytes, and
the hash a receiver computes of what it decoded is the hash of what it
received, which is what an operator's ``--genesis-hash`` pins.

:func:`genesis_from_bytes` is total and bounded like every decoder in
``wire/``: over :data:`MAX_GENESIS_BYTES` is refused before parsing, and
anything but the canonical encoding of a valid genesis raises a
:class:`~gonka_p2p.wire.schema.WireError`. A *non-canonical* encoding of a
valid genesis is refused too: its receiver would compute the hash of the
re-encoded record, not of the bytes it was sent, and a peer must not be able
to make two byte strings answer to one pin.

Limits: 1 MiB holds a genesis of several hundred participants at the largest
addresses and model lists a genesis admits (thousands at typical ones); the
bounded msgpack decoder reads maps of at most 1024 keys, so a genesis with more
than 1024 initial allocations cannot be fetched (give such a network's joiners
the file).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from gonka_p2p.ledger.genesis import Genesis, GenesisError, genesis_from_obj
from gonka_p2p.wire.schema import Malformed, Message, bounded, unpack

MAX_GENESIS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GenesisRequest(Message):
    """Send me your genesis."""

    KIND = "ledger_genesis_request"


@dataclass(frozen=True)
class GenesisReply(Message):
    """``genesis``: its canonical bytes; empty: this peer runs without a ledger (an ad-hoc network)."""

    KIND = "ledger_genesis_reply"
    genesis: bytes = bounded(max_len=MAX_GENESIS_BYTES)


def genesis_bytes(genesis: Genesis) -> bytes:
    """The canonical bytes of ``genesis``: what :meth:`Genesis.hash` hashes after its domain prefix."""
    return msgpack.packb(genesis.to_obj(), use_bin_type=True)


def genesis_from_bytes(data: bytes) -> Genesis:
    """The genesis whose canonical bytes are ``data``; WireError for anything else."""
    obj = unpack(data, MAX_GENESIS_BYTES)
    try:
        genesis = genesis_from_obj(obj)
    except GenesisError as e:
        raise Malformed(f"not a valid genesis: {e}") from None
    if genesis_bytes(genesis) != data:
        raise Malformed("not the canonical encoding of the genesis it holds")
    return genesis
