"""One negotiated, unused stream kept ready per (peer, hot protocol): the trio side's spares.

Why: on py-libp2p, opening a stream costs more than the request it carries. A
trace of the serving benchmark at one client (per-hop timestamps in each
process, medians of 20 requests) put 2.5-3 ms on each of the two opens a
request waits for (client -> TA, TA -> executor): the opener's yamux open
(a SYN frame through noise) and its pipelined proposal, then the listener's
SYN handling, stream task and two multistream-select answers, each a frame
through noise, before the listener reads the request. A spare is that work
done ahead: after a stream of a pair ends well, the opener opens and
negotiates the next one, off every request's path, and the next request on
that pair only writes its frame. Measured the same way: 7.6 -> 4.5 ms from
the client's call to the executor's engine.

Rules, each with its reason:

* only protocols that declare it (:func:`~gonka_p2p.wire.protocols.keeps_spare`):
  the serving path opens one stream per request; catch-up and queries do not
  pay for idle streams they rarely reuse;
* at most one spare per (peer, protocol), made when a stream of the pair ended
  well (a peer that failed is not bet on) and only from a slot free at once,
  with no opener waiting for one: a spare never delays or displaces a request;
* a spare is kept at most :data:`SPARE_MAX_AGE`, a third of the listener's
  wait for a request, then reset: the listener never times out a spare before
  its request can arrive, and an idle pair holds nothing for long;
* a spare found closed or reset when taken is dropped, and the request opens
  a stream as it would have without one.

The listener cannot tell a spare from a slow opener: it admits, counts and
times it out like any stream, so spares need no trust and change no limit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from gonka_p2p.gossip import libp2p_streams as streams
from gonka_p2p.gossip.service import StreamReset

log = logging.getLogger(__name__)

SPARE_MAX_AGE = 10.0  # seconds a spare waits for a request (listeners wait REQUEST_READ_TIMEOUT = 30)

OpenSpare = Callable[[str, str], Awaitable[INetStream | None]]
Discard = Callable[[INetStream], Awaitable[None]]


@dataclass
class _Spare:
    stream: INetStream | None = None  # None while it is being opened
    taken: trio.Event = field(default_factory=trio.Event)


def is_dead(stream: INetStream) -> bool:
    """Whether the peer reset or closed ``stream`` (as far as its frames have arrived)."""
    muxed = stream.muxed_stream
    return bool(getattr(muxed, "reset_received", False) or getattr(muxed, "closed", False)
                or getattr(muxed, "recv_closed", False))


class SpareStreams:
    """The spares of one host; used in its trio thread only.

    ``open_spare(peer, protocol)`` opens and negotiates a stream without a
    request, counted as this host's outbound stream, or returns None when no
    slot is free at once; ``discard(stream)`` resets one and gives its slot
    back.
    """

    def __init__(self, open_spare: OpenSpare, discard: Discard) -> None:
        self._open = open_spare
        self._discard = discard
        self._spares: dict[tuple[str, str], _Spare] = {}

    def __len__(self) -> int:
        return sum(spare.stream is not None for spare in self._spares.values())

    async def take(self, peer: str, protocol: str) -> INetStream | None:
        """The pair's spare, negotiated and still open, for a request to use; or None."""
        spare = self._spares.get((peer, protocol))
        if spare is None or spare.stream is None:
            return None
        del self._spares[peer, protocol]
        spare.taken.set()  # its keeper returns without touching it
        if is_dead(spare.stream):
            await self._discard(spare.stream)
            return None
        return spare.stream

    async def sent(self, stream: INetStream, request: bytes, limit: int, timeout: float) -> bool:
        """Write ``request`` on a spare just taken; False, the spare discarded, if the peer had
        reset it (the caller opens a stream instead). Any other failure discards it and raises."""
        try:
            with trio.fail_after(timeout):
                await streams.write_frame(stream, request, limit)
            return True
        except BaseException as e:
            await self._discard(stream)
            if isinstance(e, trio.TooSlowError):
                raise TimeoutError(f"sending the request took over {timeout} s") from None
            if not isinstance(e, StreamReset):
                raise
            return False

    async def keep(self, peer: str, protocol: str) -> None:
        """Open the pair's spare unless it has one, and hold it until taken or too old."""
        key = (peer, protocol)
        if key in self._spares:
            return
        spare = self._spares[key] = _Spare()
        try:
            spare.stream = await self._open(peer, protocol)
        finally:
            if spare.stream is None:
                del self._spares[key]
        if spare.stream is None:
            return
        with trio.move_on_after(SPARE_MAX_AGE):
            await spare.taken.wait()
        if not spare.taken.is_set():
            del self._spares[key]
            await self._discard(spare.stream)
