"""Frames and protocol negotiation on a py-libp2p stream (trio side).

The frame format is :mod:`gonka_p2p.wire.framing`'s; this module reads and
writes it on an ``INetStream`` and turns py-libp2p's errors into ours: any
failure of the stream is a :class:`StreamReset`, a frame over its
protocol's bound (:func:`gonka_p2p.wire.protocols.frame_limits`) a
:class:`FrameTooLarge`, refused from its length prefix before a byte of it
is read. py-libp2p reports a dead connection as a plain EOF,
so only the end marker means "done".

Negotiation is pipelined, as go-libp2p's lazy negotiation does:
``host.new_stream`` in py-libp2p 0.8.1 negotiates in lock step
(multistream-select handshake, wait, protocol, wait) before the first byte
of payload, two round trips per stream, and every request on the serving
path opens one (client -> TA, TA -> executor). Instead the opener writes the
handshake, the protocol and the request frame at once
(:func:`proposal`), then reads both answers (:func:`expect_agreement`).
Listeners cannot tell the difference; one that does not serve the protocol
answers ``na`` and resets the stream (see :func:`expect_agreement`). Measured with
``benchmarks/netbench.py`` on a busy 2-core machine: request/response p50
24 -> 20 ms, and about 1.5x the requests per second.
"""

from __future__ import annotations

from contextlib import suppress

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError, ParseError
from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID
from libp2p.utils import encode_delim
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from gonka_p2p.gossip.service import FrameTooLarge, StreamReset
from gonka_p2p.wire.framing import END_MARKER, HEADER, announced_length, length_prefixed

MAX_NEGOTIATION_LINE = 1024  # bytes of one multistream-select answer


async def _read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = await stream.read(n - len(buf))
            if not chunk:
                raise StreamReset("the peer closed the stream before the end-of-stream marker")
            buf += chunk
    except (BaseLibp2pError, OSError) as e:
        # py-libp2p reports a dead connection as EOF; only the end marker means "done".
        raise StreamReset(f"stream broken: {e!r}") from e
    return bytes(buf)


async def read_frame(stream: INetStream, limit: int) -> bytes | None:
    """The next frame of at most ``limit`` bytes, or None at the end-of-stream marker."""
    length = announced_length(await _read_exact(stream, HEADER.size))
    if length is None:
        return None
    if length > limit:
        raise FrameTooLarge(f"peer announced a {length}-byte frame (limit {limit})")
    return await _read_exact(stream, length)


async def write(stream: INetStream, data: bytes) -> None:
    try:
        await stream.write(data)
    except (BaseLibp2pError, OSError) as e:
        raise StreamReset(f"stream broken while writing: {type(e).__name__}") from e


def check_frame(frame: bytes, limit: int, what: str = "frame") -> None:
    """Refuse a frame over its protocol's bound before it leaves this host."""
    if len(frame) > limit:
        raise FrameTooLarge(f"{len(frame)}-byte {what} exceeds its protocol's limit ({limit})")


async def write_frame(stream: INetStream, frame: bytes, limit: int) -> None:
    check_frame(frame, limit)
    await write(stream, length_prefixed(frame))


async def finish(stream: INetStream) -> None:
    """Send the end marker and close our side: the clean way to end a stream."""
    await write(stream, END_MARKER)
    with suppress(BaseLibp2pError, OSError):
        await stream.close()


def proposal(protocol: str, request: bytes | None) -> bytes:
    """multistream-select's handshake and protocol lines and the request frame, as one write
    (no frame for a spare, whose request comes later: ``gossip/spare_streams.py``)."""
    lines = encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode())
    return lines if request is None else lines + length_prefixed(request)


async def _read_line(stream: INetStream) -> str:
    """One multistream-select line (varint length, text, newline), bounded."""
    line = await read_varint_prefixed_bytes_limited(stream, MAX_NEGOTIATION_LINE)
    if not line.endswith(b"\n"):
        raise ParseError(f"multistream line without its newline: {line[:64]!r}")
    return line[:-1].decode(errors="replace")


async def expect_agreement(stream: INetStream, peer_id: str, protocol: str) -> None:
    """Read the listener's answers to a pipelined proposal: the handshake, then ``protocol``."""
    try:
        handshake, answer = await _read_line(stream), await _read_line(stream)
    except (BaseLibp2pError, OSError) as e:
        # A listener that does not serve ``protocol`` answers "na", reads our pipelined request as
        # its next proposal and resets the stream; yamux drops data still unread at a reset, so its
        # "na" may never be read. A reset here is that, or a listener that failed.
        raise StreamReset(f"{peer_id} reset the stream during protocol negotiation: it does not serve "
                          f"{protocol}, or it failed ({e!r})") from e
    if handshake != MULTISELECT_PROTOCOL_ID:
        raise StreamReset(f"{peer_id} does not speak {MULTISELECT_PROTOCOL_ID} ({handshake!r})")
    if answer != protocol:
        raise StreamReset(f"{peer_id} does not serve {protocol} (it answered {answer!r})")


async def opener_done(stream: INetStream) -> None:
    """Return once the opener of a served stream sends anything after its request: a reset, the
    end of its side (py-libp2p's word for a dead connection too) or bytes it had no business
    sending. Each means it is done with the answer: no opener here ends its side before the
    end-of-stream marker."""
    with suppress(BaseLibp2pError, OSError):
        await stream.read(1)


async def reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), suppress(BaseLibp2pError, OSError):
        await stream.reset()


async def close(stream: INetStream) -> None:
    with suppress(BaseLibp2pError, OSError):
        await stream.close()
