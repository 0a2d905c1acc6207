"""Signatures stood in by a keyed hash for one simulated run (``[network] signatures = "keyed-hash"``).

Every transaction of a run is sealed by the simulator and opened by the
ledger's ``open_envelope``, which checks it with the envelope module's
``verify_signature``; secp256k1 signing and verifying is about a tenth of a
1,000-peer epoch. Like :mod:`sim.consensus_sim`, a run may swap it for
``sha256(public key + message)``: forgeable by anyone holding the public key,
which no simulated actor uses to forge, and identical in every rule the ledger
applies (the signer, its sequence, the canonical encoding). The swap lasts for
the run only (:func:`keyed_hash_signatures` restores both on exit), and the
default stays real signatures, so a report says which it used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from gonka_p2p.identity import Keypair
from gonka_p2p.wire import envelope


def _keyed_sign(key: Keypair, message: bytes) -> bytes:
    return hashlib.sha256(key.public_key + message).digest()


def _keyed_verify(pubkey: bytes, signature: bytes, message: bytes) -> bool:
    return signature == hashlib.sha256(pubkey + message).digest()


@contextmanager
def keyed_hash_signatures(enabled: bool) -> Iterator[None]:
    """Within the block, every seal signs and every envelope verifies with the keyed hash."""
    if not enabled:
        yield
        return
    sign, verify = Keypair.sign, envelope.verify_signature
    Keypair.sign = _keyed_sign  # type: ignore[method-assign]
    envelope.verify_signature = _keyed_verify
    try:
        yield
    finally:
        Keypair.sign = sign  # type: ignore[method-assign]
        envelope.verify_signature = verify
