"""How many streams this host opens to one peer: never more than an honest listener admits.

A listener resets every stream over its :class:`~gonka_p2p.gossip.inbound.InboundLimits`
before reading it, and the opener cannot tell that reset from a crash. A transfer agent
that relays 128 clients to one executor opened 128 execute streams at once, the executor
refused 96 of them, and those clients saw a broken stream with no frame in it (measured
with a client -> relay -> backend run over real libp2p: 30 of 128 streams, each round).
So every opener counts its own open streams per peer against the limits every honest
host applies (the defaults: a listener configured tighter only refuses more, as it may),
and waits for a slot instead of being refused: the wait is bounded by the stream's own
timeout, and a slot freed by any of its streams to that peer wakes it at once.

The counting is :class:`~gonka_p2p.gossip.inbound.InboundGate`'s (the same per-peer,
per-protocol and rate limits, with no total: other openers' streams are not ours to
count); this module adds only the waiting policy, which each network service implements
with its own loop's event.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from gonka_p2p.gossip.inbound import InboundGate, InboundLimits

RETRY_AFTER = 0.1  # seconds a waiter sleeps when no release wakes it (a rate limit refills)


class OutboundGate:
    """This host's open streams per peer, counted against an honest listener's limits."""

    def __init__(self, limits: InboundLimits = InboundLimits()) -> None:
        self._gate = InboundGate(replace(limits, streams_total=sys.maxsize))

    @property
    def open_streams(self) -> int:
        return self._gate.open_streams

    def take(self, peer: str, protocol: str, now: float) -> str | None:
        """Count a stream to ``peer`` and return None, or say why the peer would refuse it now
        (nothing counted: wait for a release, or ``RETRY_AFTER``, and ask again)."""
        return self._gate.admit(peer, protocol, now)

    def give_back(self, peer: str, protocol: str) -> None:
        """A stream ``take`` counted has ended (closed, reset or never opened)."""
        self._gate.release(peer, protocol)
