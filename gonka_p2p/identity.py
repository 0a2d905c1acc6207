"""Keys and identities: one secp256k1 key per participant and per client.

The libp2p peer id is derived from the same public key (identity multihash of
the protobuf-encoded key, base58), so a peer id *is* a ledger identity: the
noise handshake that authenticates a connection also authenticates the
account behind it. This module computes that id itself, without libp2p, so
that sans-I/O code can map signatures to peers.

Key files hold the 32-byte secret as hex and are written 0600; a key never
leaves its owner's process or key file: ``repr``/``str`` of a key show only its
peer id, and a key file that other users can read is refused (with the
``chmod`` that fixes it) rather than trusted.

Which key signs what: a participant's one key signs its libp2p identity
(noise handshake), its ledger transactions, its consensus votes and
proposals, the TA's execute orders, the executor's stream frames and
artifact replies, and the validator's artifact queries; it also derives the
participant's per-epoch validation seeds. A client's key signs only its
inference requests and the transfers it makes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import base58
from coincurve import PrivateKey, PublicKey
from coincurve.ecdsa import cdata_to_der, der_to_cdata

PUBKEY_BYTES = 33  # compressed secp256k1


class KeyFileError(Exception):
    """A key file is missing, unreadable, or does not hold a key; the message is for people."""


def peer_id_from_pubkey(pubkey: bytes) -> str:
    """libp2p peer id of a compressed secp256k1 public key (matches py-libp2p's ID.from_pubkey)."""
    if len(pubkey) != PUBKEY_BYTES:
        raise ValueError("expected a 33-byte compressed secp256k1 public key")
    # protobuf PublicKey{Type=Secp256k1(2), Data=pubkey}; <= 42 bytes, so identity multihash.
    encoded = b"\x08\x02\x12" + bytes([len(pubkey)]) + pubkey
    return base58.b58encode(b"\x00" + bytes([len(encoded)]) + encoded).decode()


def digest(data: bytes) -> bytes:
    """The project's one hash: SHA-256."""
    return hashlib.sha256(data).digest()


def verify_signature(pubkey: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` (DER) over sha256(message) was made by ``pubkey``. Never raises.

    Only the canonical encoding counts: libsecp256k1 already rejects high-S
    signatures but parses padded, non-minimal DER, which would let anyone
    re-encode a valid signature into other valid bytes -- and so change the
    identity of whatever message carries it."""
    try:
        if cdata_to_der(der_to_cdata(signature)) != signature:
            return False
        return PublicKey(pubkey).verify(signature, message)
    except Exception:  # noqa: BLE001 - malformed keys or signatures are simply invalid
        return False


@dataclass(frozen=True)
class Keypair:
    """A secp256k1 key with the identities derived from it. Its repr names the peer, never the secret."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != 32:
            raise ValueError("a secp256k1 secret is 32 bytes")

    @classmethod
    def generate(cls) -> Keypair:
        return cls(PrivateKey().secret)

    @classmethod
    def from_seed(cls, seed: bytes) -> Keypair:
        """Deterministic key for tests and simulations (never for real money)."""
        return cls(PrivateKey(hashlib.sha256(b"gonka-test-key" + seed).digest()).secret)

    def __repr__(self) -> str:
        return f"Keypair(peer_id={self.peer_id!r})"

    __str__ = __repr__

    @cached_property
    def _private(self) -> PrivateKey:
        # Built once: constructing a PrivateKey derives its public key, an EC
        # multiplication that would otherwise triple the cost of every seal.
        return PrivateKey(self.secret)

    @cached_property
    def public_key(self) -> bytes:
        return self._private.public_key.format(compressed=True)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_pubkey(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """DER signature over sha256(message)."""
        return self._private.sign(message)

    def save(self, path: Path) -> None:
        """Write the secret as hex, readable by the owner only (0600), refusing to overwrite."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.secret.hex() + "\n")

    @classmethod
    def load(cls, path: Path) -> Keypair:
        """Read a key file, refusing one that users other than its owner can read or write:
        such a secret may already be someone else's, and money follows it."""
        try:
            mode = Path(path).stat().st_mode
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist (create one with `gonka-p2p keygen`)")
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror}")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {path} is accessible to other users (mode "
                               f"{stat.filemode(mode)}); restrict it with `chmod 600 {path}`")
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist (create one with `gonka-p2p keygen`)")
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror}")
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise KeyFileError(f"key file {path} does not hold a 64-hex-digit secp256k1 secret")

    @classmethod
    def load_or_create(cls, path: Path) -> Keypair:
        if Path(path).exists():
            return cls.load(path)
        key = cls.generate()
        key.save(Path(path))
        return key
