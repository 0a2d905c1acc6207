"""How a stream is cut into frames: a 4-byte length, the payload, and an end marker.

A stream carries one request frame from the opener, then response frames,
then the end-of-stream marker. Each frame is a 4-byte big-endian length and
the payload; the length ``0xFFFFFFFF`` is the end marker (real frames are at
most their protocol's bound, :func:`gonka_p2p.wire.protocols.frame_limits`,
far below it). The marker is what tells a
finished stream from a crashed peer: a transport that reports a torn-down
connection as a plain EOF (py-libp2p does) cannot, so any EOF before the
marker means the stream was reset. Pure bytes in, bytes out; the network
service does the reading and writing.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
_END_OF_STREAM = 0xFFFFFFFF
END_MARKER = HEADER.pack(_END_OF_STREAM)


def length_prefixed(payload: bytes) -> bytes:
    """One frame on the wire: the payload's length, then the payload (the caller checks the bound)."""
    return HEADER.pack(len(payload)) + payload


def announced_length(header: bytes) -> int | None:
    """The payload length a frame header announces, or None for the end-of-stream marker."""
    (length,) = HEADER.unpack(header)
    return None if length == _END_OF_STREAM else length
