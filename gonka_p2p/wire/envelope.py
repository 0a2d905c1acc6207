"""The signed envelope every message on the wire travels in.

Layout (msgpack array): ``[ENVELOPE_VERSION, kind, schema_version, body,
signer_pubkey, signature]``. The signature (secp256k1, DER, over SHA-256)
covers a domain tag, the kind, the schema version and the body, so a
signature for one kind can never be replayed as another. ``open_envelope``
checks, in order: size, shape, kind is known and expected, schema version,
signature, body schema, canonical encoding -- and raises a typed :class:`WireError` on the first
failure. Only the canonical encoding opens, so a relayed message cannot be
altered unnoticed; still, identities are derived from what was signed, never
from envelope bytes (an inference's id: ``messages.inference_id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import msgpack

from gonka_p2p.identity import PUBKEY_BYTES, Keypair, peer_id_from_pubkey, verify_signature
from gonka_p2p.wire.schema import (
    BadSignature,
    Malformed,
    Message,
    UnknownKind,
    UnsupportedVersion,
    message_class,
    unpack,
)

ENVELOPE_VERSION = 1
_DOMAIN = b"gonka-p2p/envelope/v1\x00"
MAX_SIGNATURE_BYTES = 72

M = TypeVar("M", bound=Message)


def _signing_bytes(kind: str, version: int, body: bytes) -> bytes:
    return _DOMAIN + kind.encode() + b"\x00" + version.to_bytes(2, "big") + body


@dataclass(frozen=True)
class Signed(Generic[M]):
    """A verified message with who signed it and the exact bytes it arrived as."""

    message: M
    signer: bytes  # compressed public key
    raw: bytes

    @property
    def signer_id(self) -> str:
        return peer_id_from_pubkey(self.signer)


def seal(message: Message, key: Keypair) -> bytes:
    """Encode and sign ``message`` with ``key``."""
    body = message.encode()
    sig = key.sign(_signing_bytes(message.KIND, message.VERSION, body))
    return _pack_envelope(message.KIND, message.VERSION, body, key.public_key, sig)


def open_envelope(data: bytes, *expected: type[M]) -> Signed[M]:
    """Verify and decode an envelope whose kind must be one of ``expected``."""
    obj = unpack(data)
    if not (isinstance(obj, list) and len(obj) == 6):
        raise Malformed("not a signed envelope")
    env_version, kind, version, body, pubkey, sig = obj
    if env_version != ENVELOPE_VERSION:
        raise UnsupportedVersion(f"envelope version {env_version!r} is not supported")
    if not isinstance(kind, str) or not isinstance(version, int) or isinstance(version, bool):
        raise Malformed("envelope kind/version have the wrong type")
    if not (isinstance(body, bytes) and isinstance(pubkey, bytes) and isinstance(sig, bytes)):
        raise Malformed("envelope body, key and signature must be bytes")
    cls = message_class(kind)
    if expected and cls not in expected:
        names = ", ".join(c.KIND for c in expected)
        raise UnknownKind(f"expected {names}, got {kind!r}")
    if version != cls.VERSION:
        raise UnsupportedVersion(f"{kind} version {version} is not supported (want {cls.VERSION})")
    if len(pubkey) != PUBKEY_BYTES or not 8 <= len(sig) <= MAX_SIGNATURE_BYTES:
        raise BadSignature("signature or public key has the wrong size")
    if not verify_signature(pubkey, sig, _signing_bytes(kind, version, body)):
        raise BadSignature(f"{kind}: signature does not match its signer")
    message = cls.decode(body)
    if message.encode() != body or _pack_envelope(kind, version, body, pubkey, sig) != bytes(data):
        # msgpack admits many encodings of one value (wider ints, str vs bin, map order);
        # only the one seal() writes is accepted, so nobody but the signer can mint
        # another valid envelope -- another identity -- for the same signed content.
        raise Malformed(f"{kind}: not the canonical encoding")
    return Signed(message=message, signer=pubkey, raw=bytes(data))  # type: ignore[arg-type]


def _pack_envelope(kind: str, version: int, body: bytes, pubkey: bytes, sig: bytes) -> bytes:
    return msgpack.packb([ENVELOPE_VERSION, kind, version, body, pubkey, sig], use_bin_type=True)
