"""Circuit relay v2 for a peer without a public address (py-libp2p 0.8.1's, trio side).

Theory of operation
-------------------
A peer behind a NAT can dial out but cannot be dialed. It asks relays -- its
bootstrap peers, which have public addresses -- for a *reservation*; each
relay then accepts ``CONNECT`` requests for it and forwards them over the
connection the peer keeps open to it. The peer announces, instead of its
private listen address, one circuit address per relay that holds a
reservation for it::

    /ip4/<relay ip>/tcp/<port>/p2p/<relay id>/p2p-circuit/p2p/<its own id>

and any peer that dials such an address reaches it through that relay; noise
runs end to end, so the relay forwards bytes it can neither read nor forge.

Every :class:`Relay` dials circuits and accepts relayed connections (the
``STOP`` side, cheap); one with ``hop`` serves as a relay for others, bounded
by :data:`HOP_LIMITS` (reservations, circuits per reservation, bytes and
seconds per circuit: a circuit over its bounds is reset, and the dialer dials
again). A peer with ``reserve_on`` relays keeps a reservation on each: every
:data:`KEEP_INTERVAL` seconds it reserves again on a relay it holds no direct
connection to (a relay that restarted forgot the reservation, and one that
dialed back through another relay's circuit refuses a reservation asked
through it); its circuit addresses are those of the relays it currently
holds one on. A relayed connection that drops is dialed again through the
circuit that last reached the peer (:meth:`Relay.redial`), at every stream
opened to it, until one succeeds.

Which peers are behind a NAT is configured, not detected
(``gonka-p2p node --behind-nat``): the addresses a test network gives its
public hosts are private ones too, so an address's range says nothing.

Hole punching (DCUtR) is not run. Tried over the testnet's masquerade,
py-libp2p 0.8.1's ``DCUtRProtocol`` on the NATed side alone turns a relayed
connection into a direct one within a second (it dials the other side's
identified address: a connection reversal, no punch needed when one side is
public), but 60 s later it closes the relayed leg, and with it whatever
streams still run there -- gossipsub keeps one per connection -- which no
testnet run has shown harmless yet. Without it a relay carries the
connections peers open to a NATed peer; the NATed peer's own dials go out
directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from gonka_p2p.gossip.libp2p_patches import forget_failed_dial
from gonka_p2p.gossip.service import NetworkError

log = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"
# What one public peer lends to peers behind NATs: a handful of reservations, each good for the
# circuits a participant needs (one per peer that dials it), each circuit bounded in time and bytes.
HOP_LIMITS = RelayLimits(duration=3600, data=1 << 30, max_circuit_conns=16, max_reservations=8,
                         reservation_ttl=3600)
STRANGER_RESERVATIONS = 2  # of HOP_LIMITS' reservations, those peers the ledger does not know may hold together
KEEP_INTERVAL = 5.0  # seconds between checks that each relay still holds our reservation
RESERVE_TIMEOUT = 10.0  # seconds one reservation (connect, then RESERVE) may take
FIRST_RESERVATION_TIMEOUT = 30.0  # seconds a peer behind a NAT waits at start for one relay


class NoRelay(NetworkError):
    """A peer behind a NAT got no reservation from any of its relays: nobody could dial it."""


def is_circuit(addr: str) -> bool:
    return CIRCUIT + "/" in addr


def is_relayed(conn: object) -> bool:
    """Whether a py-libp2p connection runs through a relay (either side of the circuit)."""
    get_type = getattr(conn, "get_connection_type", None)
    return callable(get_type) and get_type() == ConnectionType.RELAYED


class _Untracked(dict[ID, Any]):
    """A ``CircuitV2Protocol._active_relays`` that keeps nothing (see :class:`CircuitRelay`)."""

    def __setitem__(self, peer: ID, streams: Any) -> None:
        pass


class CircuitRelay(CircuitV2Protocol):
    """Circuit relay v2 whose circuits end one at a time.

    Upstream files each circuit's two streams in ``_active_relays`` under one
    peer id (the source, then the destination), overwriting the previous
    circuit's; and when either direction of a circuit ends, its cleanup
    closes the streams filed under that peer id -- which by then belong to
    the *newest* circuit to or from that peer. A peer behind a NAT dialed by
    two peers lost the second circuit whenever the first ended, and a redial
    racing the teardown of the circuit it replaces failed its handshake. Here
    nothing is filed, and each direction closes its own circuit's two streams
    when it ends (which also ends the other direction's read).

    And upstream's RESERVE handler files the reservation under the peer id
    *written in the request*, not the connection's authenticated peer, and
    counts the reservations of peers long disconnected against
    ``max_reservations``: one connection naming eight made-up ids took every
    reservation of a public relay for an hour (``reservation_ttl``), and no
    peer behind a NAT could start meanwhile. Here a reservation is always the
    connection's own peer's, is refused over a relayed connection (the spec's
    rule; upstream's own check reads transport addresses a circuit need not
    carry), and one whose peer has no connection left is dropped before a
    new one is counted -- a reservation serves nothing without that
    connection, and the peer that comes back reserves again
    (:meth:`Relay._keep_reservations`).

    Eight keys cost nothing, though: eight throw-away identities, each connected, still
    held every reservation. Peers the node does not vouch for (``vouched``: its ledger's
    participants and accounts holding coins, as the inbound gate's) hold at most
    ``STRANGER_RESERVATIONS`` together; a participant behind a NAT, which needs one to
    serve at all, finds the rest.
    """

    def __init__(self, *args: Any, vouched: Callable[[str], bool] = lambda peer: True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_relays = _Untracked()
        self._vouched = vouched

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          *args: Any, **kwargs: Any) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, *args, **kwargs)
        finally:
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        swarm_conn = getattr(stream, "swarm_conn", None)
        if is_relayed(swarm_conn) or is_relayed(stream.muxed_conn):
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "no reservation over a relayed connection")
            return
        peer = stream.muxed_conn.peer_id
        msg.peer.id = peer.to_bytes()  # whatever id the request named
        manager = self.resource_manager
        for gone in [p for p in manager._reservations if not manager._is_peer_connected(p)]:  # noqa: SLF001
            del manager._reservations[gone]  # noqa: SLF001
        strangers = [p for p in manager._reservations if not self._vouched(p.to_base58())]  # noqa: SLF001
        if (peer not in manager._reservations and not self._vouched(peer.to_base58())  # noqa: SLF001
                and len(strangers) >= STRANGER_RESERVATIONS):
            await self._send_status(stream, StatusCode.RESERVATION_REFUSED,
                                    f"{STRANGER_RESERVATIONS} reservations held by peers this relay does not know")
            return
        await super()._handle_reserve(stream, msg)



@dataclass(frozen=True)
class RelayOptions:
    """``hop``: relay for peers behind NATs (public peers); ``reserve_on``: this peer is behind a NAT
    and reserves a slot on these relays (full multiaddrs ending in ``/p2p/<relay id>``)."""

    hop: bool = False
    reserve_on: tuple[str, ...] = ()

    @property
    def behind_nat(self) -> bool:
        return bool(self.reserve_on)


class Relay:
    """One host's circuit relay: the protocol (hop when asked, stop always), circuit dialing and,
    behind a NAT, the reservations and the circuit addresses they give. Trio thread only, except
    :attr:`addrs`, a tuple replaced whole (safe to read from another thread)."""

    def __init__(self, host: IHost, options: RelayOptions, vouched: Callable[[str], bool] = lambda peer: True
                 ) -> None:
        self._host = host
        self._options = options
        self._protocol = CircuitRelay(host, limits=HOP_LIMITS, allow_hop=options.hop, vouched=vouched)
        # STOP only: dialing a circuit needs no reservation of our own (the CLIENT role would make one
        # on every relay we dial through, and run a discovery that probes every peer)
        self._transport = CircuitV2Transport(host, self._protocol, RelayConfig(roles=RelayRole.STOP,
                                                                               limits=HOP_LIMITS))
        self._reserved: dict[ID, str] = {}  # relay -> the address we reach it at
        self._circuits: dict[ID, Multiaddr] = {}  # peer -> the circuit that last reached it (one a peer)
        self.addrs: tuple[str, ...] = ()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the relay protocol; behind a NAT, hold a reservation at start (or raise
        :class:`NoRelay`), then keep them."""
        async with background_trio_service(self._protocol):
            if self._options.behind_nat:
                with trio.move_on_after(FIRST_RESERVATION_TIMEOUT):
                    while not self._reserved:
                        await self._keep_reservations()
                        if not self._reserved:
                            await trio.sleep(1.0)
                if not self._reserved:
                    raise NoRelay(f"no relay of {', '.join(self._options.reserve_on)} granted a reservation "
                                  f"within {FIRST_RESERVATION_TIMEOUT:g} s")
            task_status.started()
            while self._options.behind_nat:
                await trio.sleep(KEEP_INTERVAL)
                await self._keep_reservations()
            await trio.sleep_forever()

    def _direct(self, peer: ID) -> bool:
        return any(not is_relayed(c) for c in self._host.get_network().get_connections(peer))

    async def _keep_reservations(self) -> None:
        """A reservation lives as long as our direct connection to its relay: one lost (the relay
        restarted, or only dials us back through another relay's circuit) is made again."""
        for addr in self._options.reserve_on:
            relay = info_from_p2p_addr(Multiaddr(addr)).peer_id
            if relay in self._reserved and self._direct(relay):
                continue
            self._reserved.pop(relay, None)
            try:
                with trio.fail_after(RESERVE_TIMEOUT):
                    await self._reserve(addr)
                self._reserved[relay] = addr
            except (trio.TooSlowError, BaseLibp2pError, OSError, ConnectionError) as e:
                log.info("no reservation on relay %s: %r", addr, e)
        me = self._host.get_id().to_base58()
        self.addrs = tuple(f"{addr}{CIRCUIT}/p2p/{me}" for addr in self._reserved.values())

    async def _reserve(self, addr: str) -> None:
        """Reserve over a direct connection: a relay refuses a reservation asked through a circuit,
        and ``host.connect`` would not dial while a relayed connection to it exists."""
        info = info_from_p2p_addr(Multiaddr(addr))
        if not self._direct(info.peer_id):
            forget_failed_dial(self._host, info.peer_id)
            await self._host.get_network().dial_addr(info.addrs[0], info.peer_id)
        stream = await self._host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])  # over the direct one
        try:
            if not await self._transport._make_reservation(stream, info.peer_id):  # noqa: SLF001
                raise ConnectionError(f"relay {addr} refused the reservation")
        finally:
            await stream.close()
        log.info("reserved a slot on relay %s", addr)

    async def dial(self, addr: Multiaddr) -> None:
        """Connect through the relay named in circuit address ``addr`` (ConnectionError if it cannot)."""
        relay, _ = self._transport.parse_circuit_ma(addr)
        forget_failed_dial(self._host, ID.from_base58(relay.get_peer_id()))  # it may be back since
        conn = await self._transport.dial(addr)
        self._circuits[conn.muxed_conn.peer_id] = addr

    async def redial(self, peer: ID) -> None:
        """Reconnect to ``peer`` through the last circuit that reached it, if there is one and it
        works now (py-libp2p's dialer skips circuits, and the signed peer record a relay hands
        over replaces the peerstore's addresses of the peer with its private ones). A circuit
        that fails is kept for the next try: its relay may be restarting, or the peer not yet
        reserved on it again, and it may be the only address of that peer known here (a client
        given the circuit alone); a circuit that works through another relay replaces it."""
        addr = self._circuits.get(peer)
        if addr is None:
            return
        try:
            await self.dial(addr)
        except (BaseLibp2pError, OSError) as e:
            log.debug("redialing %s through %s failed: %r", peer, addr, e)


def relay_addrs(bootstrap: Sequence[str]) -> tuple[str, ...]:
    """The relays a peer behind a NAT reserves on: its bootstrap peers that are not circuits themselves."""
    return tuple(a for a in bootstrap if not is_circuit(a))
