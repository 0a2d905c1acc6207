"""Unsigned, versioned frames: the envelope without a signature.

Ledger gossip (consensus messages, transaction batches), catch-up and block
fetches, and the ledger query protocol carry messages whose author already
signed them, or need no signature at all (gossipsub signs every publication
with the publisher's key and noise authenticates every stream). Their wrapper
needs only a kind and a version, so that a peer on another protocol version
is refused, not misread: ``[FRAME_VERSION, kind, schema version, body]``.
Decoding is total and bounded like every other decoder in ``wire/``: anything
else raises :class:`~gonka_p2p.wire.schema.WireError`.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack

from gonka_p2p.wire.schema import Malformed, Message, UnknownKind, UnsupportedVersion, message_class, unpack

FRAME_VERSION = 1

M = TypeVar("M", bound=Message)


def encode_frame(message: Message) -> bytes:
    """``[FRAME_VERSION, kind, version, body]``: an unsigned, versioned wire frame."""
    return msgpack.packb([FRAME_VERSION, message.KIND, message.VERSION, message.to_obj()], use_bin_type=True)


def decode_frame(data: bytes, expected: type[M]) -> M:
    """Decode a frame that must hold ``expected``; raises WireError on anything else."""
    return decode_frame_of(data, expected)  # type: ignore[return-value]


def decode_frame_of(data: bytes, *expected: type[Message]) -> Message:
    """Decode a frame holding one of the ``expected`` kinds (a protocol with several requests)."""
    obj = unpack(data)
    if not (isinstance(obj, list) and len(obj) == 4):
        raise Malformed("not a ledger frame")
    frame_version, kind, version, body = obj
    if frame_version != FRAME_VERSION:
        raise UnsupportedVersion(f"frame version {frame_version!r} is not supported")
    if not isinstance(kind, str) or not isinstance(version, int) or isinstance(version, bool):
        raise Malformed("frame kind/version have the wrong type")
    cls = message_class(kind)
    if cls not in expected:
        raise UnknownKind(f"expected {', '.join(e.KIND for e in expected)}, got {kind!r}")
    if version != cls.VERSION:
        raise UnsupportedVersion(f"{kind} version {version} is not supported (want {cls.VERSION})")
    return cls.from_obj(body)
