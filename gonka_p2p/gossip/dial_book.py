"""The addresses this host dialed each peer at, kept dialable for as long as it may want the peer.

py-libp2p keeps a peer's addresses in its peerstore under one time-to-live per
peer, which every ``add_addrs`` overwrites: ``host.connect`` sets 120 s
whatever the caller set just before. Once a connection outlives that, the
peer's addresses expire while it is connected, and when the connection drops
(the peer restarts, a partition heals) every stream to it fails with "No known
addresses" -- though the caller dialed it itself and would dial it again. Testnet
run 17's load client lost a TA so for two minutes after a rolling restart:
every request to that TA failed, and each one's recovery waited out its bound.

And py-libp2p dials only the *first* address its peerstore lists for a peer
(one per transport kind; none on loopback once any other is known), whatever
address ``connect`` was given. The list only grows, in the order addresses
were first heard of, so after one failed dial at a dead address -- the first
of a lying executor's addresses, or a peer's old port after it came back at
another -- that peer could never be dialed again where it listens.

So :class:`DialBook` remembers the addresses each ``connect`` was given for a
peer and makes them the peer's whole address list in the peerstore
(refreshing their TTL), at the dial and again before a stream dials a peer
that has no connection. (py-libp2p's dialer skips circuits among them; the
relay redials those, ``relay.py``.) The book is bounded: past ``MAX_PEERS``
the peer dialed longest ago is forgotten first.
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
        _dial_only(peerstore, peer, addrs)

    def __contains__(self, peer: object) -> bool:
        return peer in self._addrs

    def restore(self, peerstore: IPeerStore, peer: ID) -> None:
        """Make ``peer``'s remembered addresses the ones dialed again (for another ``PEER_ADDR_TTL``)."""
        addrs = self._addrs.get(peer)
        if addrs:
            _dial_only(peerstore, peer, addrs)


def _dial_only(peerstore: IPeerStore, peer: ID, addrs: Sequence[Multiaddr]) -> None:
    """Make ``addrs``, in their order, everything the peerstore lists for ``peer``. (The first
    add renews an expired entry: py-libp2p's ``clear_addrs`` raises on one.)"""
    peerstore.add_addrs(peer, addrs, PEER_ADDR_TTL)
    peerstore.clear_addrs(peer)
    peerstore.add_addrs(peer, addrs, PEER_ADDR_TTL)
