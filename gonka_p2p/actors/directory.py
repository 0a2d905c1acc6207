"""The peer directory: who is out there, what they serve, and whether they are alive.

Every participant publishes a signed :class:`Announcement` on the announce
topic every ``interval`` seconds. The directory keeps the latest one per peer;
a peer is *live* while its announcements keep arriving (within ``ttl``) and
no dial to it has failed since. It also keeps the node well connected: a star
around the bootstrap peer delivers gossip poorly, so on hearing an
announcement it dials one more peer until ``target_connections`` are open --
from a task of its own, never in the handler: a topic's messages are handled
one at a time, and a stranger announcing 8 addresses that never answer held
every announcement behind it for 40 s (``DIAL_BUDGET_S`` bounds each
candidate's dials together).

Weights come from the ledger (genesis until the first commit); a peer
missing from them has weight 0 and is never chosen as executor. Without a
genesis (an ad-hoc development network) every peer weighs 1.

Memory is bounded before trust: an announcement costs its sender one key,
so anyone can announce as many peers as they like. What bounds the table:

* each announcement is small: the topic drops messages over 8 KiB before
  decoding (``wire.protocols``), the schema bounds each address and model;
* a *participant* (weight > 0) is kept while it announces; at most
  ``MAX_PARTICIPANTS``, the lightest evicted first. Their number is the
  ledger's, which costs stake to grow;
* a *stranger* (weight 0) is kept only among the ``MAX_STRANGERS`` most
  recently heard: a flood of throw-away keys churns the strangers and never
  touches a participant;
* a peer silent for ``FORGET_AFTER_TTLS`` times ``ttl`` is forgotten, on
  every announcement tick.

What is relayed (the topic's validator): an announcement newer than the one
held for its peer, at most one per peer every half ``interval`` (the sender
picks ``seq``: one key counting it up as fast as it can publish had every
announcement relayed by every node), and strangers' announcements together
at most ``MAX_STRANGERS`` an interval -- the pace at which the table keeps
strangers anyway -- so a flood of fresh keys does not cross the network.
The rest is dropped, not passed on or handled.

Which peers to dial is the same rule (:meth:`PeerDirectory.dial_candidates`):
participants by weight first, strangers only while fewer than
``STRANGER_CONNECTIONS`` are connected and at most one stranger dial per
announcement interval, so announcements cannot fill our connections with
the attacker's hosts (an eclipse) or aim our dials at a victim's addresses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gonka_p2p.gossip.service import NetworkService, PublishError, connect_any
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import Announcement
from gonka_p2p.wire.protocols import ANNOUNCE_TOPIC
from gonka_p2p.wire.schema import WireError

log = logging.getLogger(__name__)

# A dead peer is found by the first dial or stream to it that fails (mark_failed), so the ttl
# only has to outlast a live one's late announcement: an executor generating on a loaded CPU
# was seen silent for more than three intervals (a benchmark's TA then refused every request).
LIVE_FOR_INTERVALS = 5
FORGET_AFTER_TTLS = 10  # a peer silent this many ttl is dropped (it is re-learnt if it announces)
MAX_PARTICIPANTS = 4096  # the ledger lists at most this many (query.MAX_LISTED_PARTICIPANTS)
MAX_STRANGERS = 32  # weight-0 peers kept: newcomers not yet registered, clients' nodes
STRANGER_CONNECTIONS = 2  # connections this node opens to weight-0 peers
DIAL_BUDGET_S = 5.0  # one candidate's dials, all its announced addresses together


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
        self.ttl = LIVE_FOR_INTERVALS * interval
        self.forget_after = FORGET_AFTER_TTLS * self.ttl
        self._target = target_connections
        self._clock = clock
        self._peers: dict[str, PeerRecord] = {}
        self._seq = 0
        self._dialing: set[str] = set()
        self._last_stranger_dial = -float("inf")
        self._want_peers = asyncio.Event()  # set by an announcement heard while below target
        self._stranger_relays: deque[float] = deque(maxlen=MAX_STRANGERS)  # when the last ones were relayed

    async def start(self) -> None:
        await self._service.subscribe(ANNOUNCE_TOPIC, self._on_announcement, self._is_valid)

    async def run(self) -> None:
        """Announce, forget the silent and dial forever; an empty mesh at start-up is retried on the next tick."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._dial_forever(), name="directory dials")
            while True:
                self.forget_silent()
                await self.announce_once()
                await asyncio.sleep(self.interval)

    async def _dial_forever(self) -> None:
        """One more peer each time an announcement finds the node below its target."""
        while True:
            await self._want_peers.wait()
            self._want_peers.clear()
            if len(self._service.connected_peers()) < self._target:
                await self._dial_next()

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

    @staticmethod
    def _opened(data: bytes) -> Signed[Announcement] | None:
        """The signed announcement in ``data``; None if it does not decode or lists another peer's address."""
        try:
            signed = open_envelope(data, Announcement)
        except WireError:
            return None
        return signed if all(a.endswith("/p2p/" + signed.signer_id) for a in signed.message.addrs) else None

    def _is_valid(self, sender: str, data: bytes) -> bool:
        """Signed, newer than what is held, and at its sender's pace (module docstring); the
        network thread's, the one caller that writes ``_stranger_relays``."""
        signed = self._opened(data)
        if signed is None:
            return False
        peer, now = signed.signer_id, self._clock()
        known = self._peers.get(peer)
        if known is not None and (signed.message.seq <= known.announcement.seq
                                  or now - known.last_seen < self.interval / 2):
            return False
        if self.is_participant(peer):
            return True
        relays = self._stranger_relays
        if len(relays) == relays.maxlen and now - relays[0] < self.interval:
            return False
        relays.append(now)
        return True

    async def _on_announcement(self, sender: str, data: bytes) -> None:
        """Keep a newer announcement. Checked again, and a bad one dropped, not trusted to
        ``_is_valid``: a network layer that let a message skip its validator (py-libp2p's
        validation cache, keyed by sender and seqno, did) must not make this raise."""
        signed = self._opened(data)
        if signed is None:
            log.warning("dropping an announcement from %s that its validator would have refused", sender)
            return
        peer = signed.signer_id
        if peer == self._service.peer_id:
            return
        known = self._peers.get(peer)
        if known and signed.message.seq <= known.announcement.seq:
            if not known.failed_since_seen:  # a copy via another route still proves liveness
                known.last_seen = max(known.last_seen, self._clock())
            return
        self._peers[peer] = PeerRecord(peer, signed.message, self._clock())
        if known is None:  # the table grows only here
            self.forget_silent()
            self._evict()
        if len(self._service.connected_peers()) < self._target:
            self._want_peers.set()

    # ---- what is kept ------------------------------------------------------

    def is_participant(self, peer: str) -> bool:
        return self.weight_of(peer) > 0

    def _evict(self) -> None:
        """Keep the heaviest MAX_PARTICIPANTS participants and the MAX_STRANGERS most recent strangers."""
        participants = [r for r in self._peers.values() if self.is_participant(r.peer_id)]
        strangers = [r for r in self._peers.values() if not self.is_participant(r.peer_id)]
        participants.sort(key=lambda r: (-self.weight_of(r.peer_id), r.peer_id))
        strangers.reverse()  # on a tie in last_seen, the later heard stays
        strangers.sort(key=lambda r: -r.last_seen)
        for record in participants[MAX_PARTICIPANTS:] + strangers[MAX_STRANGERS:]:
            del self._peers[record.peer_id]

    def forget_silent(self) -> None:
        """Forget every peer silent for longer than ``forget_after``."""
        cutoff = self._clock() - self.forget_after
        for peer in [p for p, r in self._peers.items() if r.last_seen < cutoff]:
            del self._peers[peer]

    # ---- whom to dial --------------------------------------------------------

    def dial_candidates(self) -> list[str]:
        """Live peers worth a connection, best first: participants by weight, then a few strangers.

        Strangers (most recently heard first) only while fewer than
        STRANGER_CONNECTIONS are connected, and none within ``interval`` of the
        last stranger dial.
        """
        connected = set(self._service.connected_peers())
        unconnected = [r for r in self.live_peers() if r.peer_id not in connected | self._dialing]
        participants = sorted((r.peer_id for r in unconnected if self.is_participant(r.peer_id)),
                              key=lambda p: (-self.weight_of(p), p))
        stranger_room = STRANGER_CONNECTIONS - sum(not self.is_participant(p) for p in connected)
        if self._clock() - self._last_stranger_dial < self.interval:
            stranger_room = 0
        strangers = [r.peer_id for r in sorted(unconnected, key=lambda r: -r.last_seen)
                     if not self.is_participant(r.peer_id)]
        return participants + strangers[:max(0, stranger_room)]

    async def _dial_next(self) -> None:
        """Dial the best candidate at its announced addresses, within ``DIAL_BUDGET_S`` in all."""
        candidates = self.dial_candidates()
        if not candidates:
            return
        peer = candidates[0]
        if not self.is_participant(peer):
            self._last_stranger_dial = self._clock()
        self._dialing.add(peer)
        give_up = asyncio.get_running_loop().time() + DIAL_BUDGET_S
        try:
            if not await connect_any(self._service, self._peers[peer].announcement.addrs, give_up, DIAL_BUDGET_S):
                self.mark_failed(peer)
        finally:
            self._dialing.discard(peer)

    # ---- liveness and the executor draw -----------------------------------------

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

    def serves(self, peer: str, model: str) -> bool:
        """``peer`` is live and announces ``model``: a draw of any other peer would be refused."""
        return self.is_live(peer) and model in self._peers[peer].announcement.models

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
