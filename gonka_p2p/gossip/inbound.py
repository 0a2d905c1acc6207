"""Which inbound streams a host serves: per-peer limits, the same in both network services.

Theory of operation
-------------------
A served stream holds memory (its request frame, the handler's state) from
the moment it opens until its handler returns, and the opener decides when
that is. A single global limit lets one peer take every slot, so each stream
is admitted against four limits, all of which must hold:

* all open inbound streams (``streams_total``), the host's own bound;
* open streams from one peer (``streams_per_peer``);
* open streams from one peer on one protocol (``streams_per_protocol``), so
  one peer's catch-up cannot starve its own inference streams;
* streams one peer opened recently: a token bucket of ``request_burst``
  tokens refilled at ``requests_per_s``, so a peer cannot make us decode and
  refuse requests as fast as it can write them;
* open streams from *strangers* together (``streams_strangers``): peers the
  host does not vouch for (``vouched``; a node vouches for what its ledger
  knows -- participants, accounts holding coins). A key costs nothing, so
  per-peer limits alone do not hold: four throw-away identities holding
  ``streams_per_peer`` silent streams each took every slot, and every honest
  peer was refused for as long as they kept it up. Strangers -- clients
  without coins, a newcomer before it registers, and every such attacker --
  share part of the slots; the rest is kept for peers it costs stake or coins
  to be. A peer keeps the standing it was admitted with while any of its
  streams is open, so the counts stay consistent when the ledger changes.

A refused stream is reset before its request is read; other peers do not
notice. The gate is pure (the caller passes the clock), and both services
(``libp2p_service``, ``memory``) consult one, so tests and simulations see
the limits production does. Its own memory: one counter per (peer,
protocol) with an open stream, and one bucket per peer heard from recently;
buckets that have refilled are dropped once more than ``TRACKED_PEERS`` are
kept, and every peer needs a live connection to have one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

TRACKED_PEERS = 1024  # rate buckets kept before the refilled ones are swept


@dataclass(frozen=True)
class InboundLimits:
    """Bounds on the inbound streams one host serves (see the module docstring)."""

    streams_total: int = 256
    streams_per_peer: int = 64
    streams_per_protocol: int = 32  # per peer
    requests_per_s: float = 200.0  # per peer, sustained (a saturated benchmark peer makes ~140)
    request_burst: int = 400  # per peer
    streams_strangers: int = 128  # from all the peers the host does not vouch for, together

    def __post_init__(self) -> None:
        assert 0 < self.streams_per_protocol <= self.streams_per_peer <= min(self.streams_total, self.streams_strangers)
        assert self.requests_per_s > 0 and self.request_burst >= 1


@dataclass
class _Bucket:
    tokens: float
    at: float


class InboundGate:
    """Admits an inbound stream against :class:`InboundLimits` and counts it until released."""

    def __init__(self, limits: InboundLimits, vouched: Callable[[str], bool] = lambda peer: True) -> None:
        self.limits = limits
        self.vouched = vouched  # the caller's: which peers are not strangers (the module docstring)
        self._by_peer: Counter[str] = Counter()
        self._by_protocol: Counter[tuple[str, str]] = Counter()
        self._strangers: Counter[str] = Counter()  # open streams of the peers admitted as strangers
        self._open = 0  # the two totals, kept as streams come and go
        self._open_strangers = 0
        self._buckets: dict[str, _Bucket] = {}

    @property
    def open_streams(self) -> int:
        return self._open

    def admit(self, peer: str, protocol: str, now: float) -> str | None:
        """Count the stream and return None, or return why it is refused (and count nothing)."""
        lim = self.limits
        if self.open_streams >= lim.streams_total:
            return f"{lim.streams_total} inbound streams open"
        if self._by_peer[peer] >= lim.streams_per_peer:
            return f"{lim.streams_per_peer} streams open from {peer}"
        if self._by_protocol[peer, protocol] >= lim.streams_per_protocol:
            return f"{lim.streams_per_protocol} {protocol} streams open from {peer}"
        stranger = peer in self._strangers or (peer not in self._by_peer and not self.vouched(peer))
        if stranger and self._open_strangers >= lim.streams_strangers:
            return f"{lim.streams_strangers} streams open from peers this host does not know"
        bucket = self._refilled(peer, now)
        if bucket.tokens < 1:
            return f"{peer} opens streams faster than {lim.requests_per_s}/s"
        bucket.tokens -= 1
        self._by_peer[peer] += 1
        self._by_protocol[peer, protocol] += 1
        self._open += 1
        if stranger:
            self._strangers[peer] += 1
            self._open_strangers += 1
        return None

    def release(self, peer: str, protocol: str) -> None:
        """The stream ``admit`` counted has ended."""
        assert self._by_protocol[peer, protocol] > 0, "released a stream that was never admitted"
        self._by_peer[peer] -= 1
        self._by_protocol[peer, protocol] -= 1
        if not self._by_protocol[peer, protocol]:
            del self._by_protocol[peer, protocol]
        if not self._by_peer[peer]:
            del self._by_peer[peer]
        self._open -= 1
        if peer in self._strangers:
            self._open_strangers -= 1
            self._strangers[peer] -= 1
            if not self._strangers[peer]:
                del self._strangers[peer]

    def _refilled(self, peer: str, now: float) -> _Bucket:
        lim = self.limits
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= TRACKED_PEERS:
                self._sweep(now)
            bucket = self._buckets[peer] = _Bucket(float(lim.request_burst), now)
        bucket.tokens = min(float(lim.request_burst), bucket.tokens + (now - bucket.at) * lim.requests_per_s)
        bucket.at = now
        return bucket

    def _sweep(self, now: float) -> None:
        """Forget the buckets that are full again: a forgotten peer starts with a full one anyway."""
        lim = self.limits
        full = [p for p, b in self._buckets.items()
                if b.tokens + (now - b.at) * lim.requests_per_s >= lim.request_burst]
        for peer in full:
            del self._buckets[peer]
