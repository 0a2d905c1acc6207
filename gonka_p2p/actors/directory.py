"""The peer directory: who is out there, what they serve, and whether they are alive.

Every participant publishes a signed :class:`Announcement` on the announce
topic every ``interval`` seconds. The directory keeps the latest one per peer;
a peer is *live* while its announcements keep arriving (within ``ttl``) and
no dial to it has failed since. It also keeps the node well connected: a star
around the bootstrap peer delivers gossip poorly, so on hearing of a new peer
it dials it until ``target_connections`` are open. A peer silent for
``FORGET_AFTER_TTLS`` times ``ttl`` is forgotten, so the records are bounded
by the peers heard from recently, not by every peer ever seen.

Weights come from the network's genesis (until the ledger holds them); a
peer missing from genesis has weight 0 and is never chosen as executor.
Without a genesis (an ad-hoc development network) every peer weighs 1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gonka_p2p.gossip.service import NetworkError, NetworkService, PublishError
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import Announcement
from gonka_p2p.wire.protocols import ANNOUNCE_TOPIC
from gonka_p2p.wire.schema import WireError

log = logging.getLogger(__name__)

FORGET_AFTER_TTLS = 10  # a peer silent this many ttl is dropped (it is re-learnt if it announces)


@dataclass
class PeerRecord:
    peer_id: str
    announcement: Announcement
    last_seen: float
    failed_since_seen: bool = False


class PeerDirectory:
    """Announces this node and tracks everyone else's announcements."""

    def __init__(
        self,
        service: NetworkService,
        key: Keypair,
        models: list[str],
        capacity: int,
        weights: Mapping[str, int] | None,
        interval: float = 2.0,
        target_connections: int = 6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._key = key
        self._models = models
        self._capacity = capacity
        self.weights = dict(weights) if weights is not None else None
        self.interval = interval
        self.ttl = 3 * interval
        self.forget_after = FORGET_AFTER_TTLS * self.ttl
        self._target = target_connections
        self._clock = clock
        self._peers: dict[str, PeerRecord] = {}
        self._seq = 0
        self._dialing: set[str] = set()

    async def start(self) -> None:
        await self._service.subscribe(ANNOUNCE_TOPIC, self._on_announcement, self._is_valid)

    async def run(self) -> None:
        """Announce forever; an empty mesh at start-up is retried on the next tick."""
        while True:
            await self.announce_once()
            await asyncio.sleep(self.interval)

    async def announce_once(self) -> bool:
        # Wall-clock milliseconds, bumped: a restarted peer's announcements supersede old ones.
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        msg = Announcement(
            addrs=self._service.listen_addrs, models=self._models,
            capacity=self._capacity, seq=self._seq,
        )
        try:
            await self._service.publish(ANNOUNCE_TOPIC, seal(msg, self._key))
            return True
        except PublishError:
            return False

    def _is_valid(self, sender: str, data: bytes) -> bool:
        try:
            signed = open_envelope(data, Announcement)
        except WireError:
            return False
        return all(a.endswith("/p2p/" + signed.signer_id) for a in signed.message.addrs)

    async def _on_announcement(self, sender: str, data: bytes) -> None:
        signed = open_envelope(data, Announcement)
        peer = signed.signer_id
        if peer == self._service.peer_id:
            return
        known = self._peers.get(peer)
        if known and signed.message.seq <= known.announcement.seq:
            if not known.failed_since_seen:  # a copy via another route still proves liveness
                known.last_seen = max(known.last_seen, self._clock())
            return
        if known is None:  # the table grows only here: forget the silent first
            self._forget_silent()
        self._peers[peer] = PeerRecord(peer, signed.message, self._clock())
        if peer not in self._service.connected_peers():
            await self._maybe_dial(peer, signed.message.addrs)

    async def _maybe_dial(self, peer: str, addrs: list[str]) -> None:
        if len(self._service.connected_peers()) >= self._target or peer in self._dialing:
            return
        self._dialing.add(peer)
        try:
            for addr in addrs:
                try:
                    await self._service.connect(addr, timeout=5.0)
                    return
                except NetworkError:
                    continue
            self.mark_failed(peer)
        finally:
            self._dialing.discard(peer)

    def _forget_silent(self) -> None:
        cutoff = self._clock() - self.forget_after
        for peer in [p for p, r in self._peers.items() if r.last_seen < cutoff]:
            del self._peers[peer]

    def mark_failed(self, peer: str) -> None:
        """A dial or stream to ``peer`` failed: not live until it announces again."""
        record = self._peers.get(peer)
        if record:
            record.failed_since_seen = True

    def is_live(self, peer: str) -> bool:
        record = self._peers.get(peer)
        return (
            record is not None
            and not record.failed_since_seen
            and self._clock() - record.last_seen <= self.ttl
        )

    def live_peers(self) -> list[PeerRecord]:
        return [r for p, r in sorted(self._peers.items()) if self.is_live(p)]

    def weight_of(self, peer: str) -> int:
        return 1 if self.weights is None else self.weights.get(peer, 0)

    def executor_weights(self, model: str) -> dict[str, int]:
        """Weights of live peers (never this node) announcing ``model``."""
        return {
            r.peer_id: self.weight_of(r.peer_id)
            for r in self.live_peers()
            if model in r.announcement.models
        }

    def live_models(self) -> list[str]:
        return sorted({m for r in self.live_peers() for m in r.announcement.models})
