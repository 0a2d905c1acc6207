"""The addresses this host dialed each peer at, kept dialable for as long as it may want the peer.

py-libp2p keeps a peer's addresses in its peerstore under one time-to-live per
peer, which every ``add_addrs`` overwrites: ``host.connect`` sets 120 s
whatever the caller set just before. Once a connection outlives that, the
peer's addresses expire while it is connected, and when the connection drops
(the peer restarts, a partition heals) every stream to it fails with "No known
addresses" -- though the caller dialed it itself and would dial it again. Testnet
run 17's load client lost a TA so for two minutes after a rolling restart:
every request to that TA failed, and each one's recovery waited out its bound.

So :class:`DialBook` remembers the addresses each ``connect`` was given for a
peer, and puts them back into the peerstore (refreshing their TTL) before a
stream dials a peer that has no connection. (py-libp2p's dialer skips circuits
among them; the relay redials those, ``relay.py``.) The book is bounded: past
``MAX_PEERS`` the peer dialed longest ago is forgotten first.
"""

from __future__ import annotations

from collections.abc import Sequence

from libp2p.abc import IPeerStore
from libp2p.peer.id import ID
from multiaddr import Multiaddr

PEER_ADDR_TTL = 3600  # seconds remembered addresses stay in the peerstore after each use
MAX_PEERS = 4096  # peers whose addresses are remembered; far above any network's participants


class DialBook:
    """Peer -> the addresses ``connect`` was last given for it; peers in the order they were dialed."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self._addrs: dict[ID, list[Multiaddr]] = {}
        self._max_peers = max_peers

    def remember(self, peerstore: IPeerStore, peer: ID, addrs: Sequence[Multiaddr]) -> None:
        """Keep ``addrs`` as where ``peer`` is dialed, and make them dialable now."""
        self._addrs.pop(peer, None)
        self._addrs[peer] = list(addrs)
        while len(self._addrs) > self._max_peers:
            del self._addrs[next(iter(self._addrs))]
        peerstore.add_addrs(peer, addrs, PEER_ADDR_TTL)

    def restore(self, peerstore: IPeerStore, peer: ID) -> None:
        """Make ``peer``'s remembered addresses dialable again (for another ``PEER_ADDR_TTL``)."""
        addrs = self._addrs.get(peer)
        if addrs:
            peerstore.add_addrs(peer, addrs, PEER_ADDR_TTL)
