"""What we change in py-libp2p 0.8.1, one correction per definition (trio side).

Each class or function here names, in its docstring, the upstream behaviour
it corrects and why that behaviour hurts this network. Upgrading py-libp2p
means re-reading each one against the new release: several reach into its
private state (``RpcQueue._queue``, ``_negative_peer_cache``), and every one
of them exists because a default silently lost messages, connections or
security.

Validators run in the network thread, *before* delivery and forwarding
(that is py-libp2p's design, kept), so they must be cheap, must not block
and must only read state that is safe to read from another thread; decoding
and signature checks are ideal.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf.message import DecodeError
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub, ValidationCache, ValidationResult
from libp2p.pubsub.validators import signature_validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.tcp import tcp as libp2p_tcp
from multiaddr import Multiaddr

from gonka_p2p.gossip.dial_book import DialBook
from gonka_p2p.gossip.libp2p_streams import close
from gonka_p2p.gossip.libp2p_yamux import WholeFrameYamux
from gonka_p2p.gossip.service import AddressInUse, MessageHandler, MessageValidator, NetworkError

log = logging.getLogger(__name__)

OUTBOUND_QUEUE_SIZE = 2048  # RPCs per peer (py-libp2p: 32, then silent drops)
OUTBOUND_HIGH_WATER = OUTBOUND_QUEUE_SIZE - 64  # leaves room for control RPCs
DELIVERY_SLOTS = 1024  # gossip messages per topic in validation or awaiting the handler
WAITING_PER_PEER = 64  # a forwarder's messages waiting for a slot once every slot is taken; the rest dropped
ROOM_WAIT = 10.0  # seconds publish / forwarding wait for outbound queue room
ROOM_POLL = 0.002
DIAL_BACKOFF_S = 2.0  # after every address of a peer failed, dials to it wait this long (py-libp2p: 60 s)
TCP_USER_TIMEOUT_S = 20  # unacknowledged data this old ends a TCP connection (Linux: about 15 minutes)
TCP_KEEPALIVE_IDLE_S, TCP_KEEPALIVE_INTERVAL_S, TCP_KEEPALIVE_PROBES = 15, 5, 3  # an idle dead peer: ~30 s


class DialedPeersOnly(AutoConnector):
    """py-libp2p's auto-connector, limited to the peers this host dialed itself.

    Upstream, below 200 connections (its watermarks' midpoint: always, here) it dials
    every 30 s any peer its peerstore holds addresses for -- and the peerstore learns
    addresses from whatever peers say: the records of a PRUNE's peer exchange
    (:class:`~gonka_p2p.gossip.libp2p_gossipsub.GossipRouter` drops those), identify
    and the records peers attach to their RPCs. That let anyone aim our dials, and
    whom to dial is the directory's decision. It still redials the peers ``connect``
    was asked for (a bootstrap peer, a peer the directory chose: the
    :class:`~gonka_p2p.gossip.dial_book.DialBook`), so a node whose connections all
    dropped finds its way back.
    """

    def __init__(self, swarm: Any, dialed: DialBook) -> None:
        super().__init__(swarm, swarm.connection_config.auto_connect_interval)
        self._dialed = dialed

    async def _get_candidate_peers(self) -> list[ID]:
        return [p for p in await super()._get_candidate_peers() if p in self._dialed]


def bound_tcp_stalls(sock: Any) -> None:
    """Make a TCP connection that stops moving end in seconds, not minutes.

    py-libp2p leaves its sockets at the kernel's defaults: a connection whose data
    goes unacknowledged retransmits with exponential backoff for about 15 minutes,
    and one whose peer vanished while idle lives forever. After a link outage (testnet
    runs 24, 25: a participant's link capped at 32 kbit/s for 90 s) the backoff had
    grown to tens of seconds: the link was back, but every request over the stalled
    connection waited out its timeout, and with one connection per peer no fresh one
    was dialed -- the validator on that node then failed to reach the holders of
    honest evidence before its deadline and accused them of withholding.
    ``TCP_USER_TIMEOUT`` ends a connection whose data stays unacknowledged for
    ``TCP_USER_TIMEOUT_S`` (the kernel clamps its retransmission timer to it), keepalive
    probes find an idle dead peer; the next stream to that peer dials afresh. Where the
    platform lacks an option the default stays.
    """
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_S * 1000), ("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE_S),
                        ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL_S), ("TCP_KEEPCNT", TCP_KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as e:
            log.debug("TCP option %s not set: %s", option, e)


class StallBoundedTCPStream(TrioTCPStream):
    """py-libp2p's TCP connection (dialed and accepted alike) with :func:`bound_tcp_stalls`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        bound_tcp_stalls(stream.socket)


def _bound_every_tcp_connection() -> None:
    """py-libp2p builds its TCP transport inside ``new_host`` and wraps every socket in
    ``TrioTCPStream``, looked up in its ``tcp`` module when a connection is made: that name
    is the one place both dialed and accepted connections pass through."""
    libp2p_tcp.TrioTCPStream = StallBoundedTCPStream  # type: ignore[misc]


def secure_host(key_pair: KeyPair, listen: Multiaddr, dialed: DialBook) -> IHost:
    """A host that offers noise only, yamux only, one connection per peer.

    * ``new_host`` offers noise, TLS, secio *and plaintext* by default: a peer
      could talk us down to plaintext. We pass noise as the only security
      option and yamux as the only muxer.
    * Every dial to a single address waits out a 250 ms "happy eyeballs"
      delay unless the per-peer connection limit is reached; with
      ``max_connections_per_peer=1`` a dial returns as soon as it connects.
    * Yamux frames are written whole (:class:`WholeFrameYamux`).
    * A peer all of whose addresses failed is refused for ``DIAL_BACKOFF_S``,
      not py-libp2p's 60 s: peers here restart in seconds (an upgrade, a
      crash), and a client cut off from a restarting TA or executor must
      reach it again to recover its answer -- for a minute it could not.
    * The auto-connector redials only the peers in ``dialed``
      (:class:`DialedPeersOnly`).
    * A TCP connection that stalls ends in seconds (:func:`bound_tcp_stalls`).
    """
    _bound_every_tcp_connection()
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: WholeFrameYamux},
        listen_addrs=[listen],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    network = host.get_network()
    network._negative_peer_cache._ttl = DIAL_BACKOFF_S  # type: ignore[attr-defined]  # noqa: SLF001
    network.auto_connector = DialedPeersOnly(network, dialed)  # type: ignore[attr-defined]
    return host


class Unremembered(ValidationCache):
    """A ``Pubsub.validation_cache`` that remembers nothing, so every message meets its topic's validator.

    Upstream caches each validation result for 300 s under the message id, which is
    (sender, seqno) -- not the data -- while it forgets having *seen* that id after 120 s.
    In between, a sender re-publishing its own earlier valid id with other data, correctly
    signed, is neither seen nor validated: the cached "valid" lets bytes its validator
    would reject reach the handler. The cache saves nothing here anyway: a message is
    validated once before it is marked seen, and our validators are cheap.
    """

    def get(self, msg_id: bytes) -> ValidationResult | None:
        return None

    def put(self, msg_id: bytes, result: ValidationResult) -> None:
        pass


@dataclass
class Topic:
    """One subscription: its handler, validator and bounded delivery path.

    A message holds one of the topic's ``DELIVERY_SLOTS`` from the moment it
    is accepted for processing (trio side) until its handler returns (asyncio
    side), so a slow handler slows intake of that topic (backpressure)
    instead of growing a queue; the queue between the two threads can never
    hold more than the slots, and at most ``WAITING_PER_PEER`` messages of
    each forwarder wait for one (:class:`GossipPubsub`).
    """

    handler: MessageHandler
    validator: MessageValidator | None
    queue: asyncio.Queue[tuple[str, bytes]] = field(default_factory=lambda: asyncio.Queue(DELIVERY_SLOTS))
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(DELIVERY_SLOTS))


class SizedQueues(dict[ID, Any]):
    """``Pubsub.peer_queues`` that enlarges each RpcQueue py-libp2p creates.

    Upstream, each peer's outbound ``RpcQueue`` holds 32 RPCs and drops the
    rest while ``publish`` returns normally. We raise it to
    ``OUTBOUND_QUEUE_SIZE``; :meth:`GossipPubsub.wait_for_room` keeps it
    below ``OUTBOUND_HIGH_WATER``. py-libp2p removes a peer's queue when the
    peer goes away, so this holds one queue per connected peer.
    """

    def __setitem__(self, peer: ID, queue: Any) -> None:
        queue._queue.max_size = OUTBOUND_QUEUE_SIZE
        super().__setitem__(peer, queue)


class GossipPubsub(Pubsub):
    """py-libp2p's Pubsub with lossless, backpressured delivery and thread-safe snapshots.

    * The per-topic subscription channel holds 32 messages and drops the rest
      (``Pubsub.notify_subscriptions``). We bypass it: accepted messages go
      straight to ``deliver``, the service's bounded, backpressured path.
    * Outbound queues drop when full (see :class:`SizedQueues`): before we
      forward, we wait until the target queues have room.
    * Message sequence numbers start at ``int(time.time())`` and count up, so
      a node that publishes more than one message per second and restarts
      reuses sequence numbers that peers still hold as "seen" and drops as
      duplicates. We start the counter at ``time.time_ns()``, as go-libp2p
      does.
    * ``peer_topics`` is mutated in the network thread; ``topic_snapshot``
      is a copy replaced on every change, safe to read from asyncio.
    * When our stream *to* a peer fails while the peer stays connected (a
      write error on a loaded machine; the old connection's stream after the
      peer restarted and dialled again), upstream forgets every subscription
      of that peer and re-opens only its own stream. The peer's stream *to us*
      still runs, so it never announces its subscriptions again: it is never
      meshed, gossiped or published to again, and hears nothing from us while
      we still hear it (issue 14: a testnet whose replicas all restarted sat
      at one height, two of them deaf to the other three). A peer's
      subscriptions are what it announced on the stream it opened to us; we
      forget them when that stream ends, not when ours fails.

    * py-libp2p's stream reader starts one task per inbound message and
      reads on; a task that waits for a delivery slot (every slot taken: a
      handler that is behind) holds its message, up to 1 MiB. Upstream checks
      the signature only after that wait, so a peer flooding junk while a
      handler was busy held it all. Here the seen cache and the signature
      are checked first (a valid message's signature is then checked again
      upstream: cheap next to a held MiB), and at most ``WAITING_PER_PEER``
      messages per forwarder wait; the rest are dropped unseen (gossip's
      IHAVE / IWANT may bring them again).
    * Validation results are not cached (:class:`Unremembered`).

    Per-peer memory: ``_stalled`` forgets a peer when it disconnects,
    ``_inbound`` when its stream to us ends, ``_waiting`` when its last
    waiting message gets a slot;
    ``_holding`` holds at most ``DELIVERY_SLOTS`` entries per topic; the seen
    cache is py-libp2p's, swept after ``seen_ttl`` (120 s).
    """

    def __init__(self, host: IHost, router: GossipSub, deliver: Callable[[Topic, str, bytes], None]) -> None:
        super().__init__(host, router, strict_signing=True)
        self.validation_cache = Unremembered()
        self.peer_queues = SizedQueues()
        self.counter = time.time_ns()  # not int(time.time()): see the class docstring
        self.topics: dict[str, Topic] = {}
        self.topic_snapshot: dict[str, tuple[str, ...]] = {}  # replaced, never mutated
        self._deliver = deliver
        self._holding: set[int] = set()  # id() of messages that hold a delivery slot
        self._waiting: Counter[ID] = Counter()  # messages waiting for a slot, per forwarder
        self._stalled: set[ID] = set()  # peers whose outbound queue stayed full
        self._inbound: dict[ID, INetStream] = {}  # the stream each peer opened to us (its subscriptions)

    # Delivery: a message takes a slot before processing; notify hands the slot on.

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        topic = self.topics.get(msg.topicIDs[0]) if len(msg.topicIDs) == 1 else None
        if msg_forwarder == self.my_id or topic is None:
            await super().push_msg(msg_forwarder, msg)
            return
        if self._is_msg_seen(msg) or not signature_validator(msg):
            return
        if self._waiting[msg_forwarder] >= WAITING_PER_PEER:
            log.debug("dropping a %s message from %s: %d of its messages already wait for a slot",
                      msg.topicIDs[0], msg_forwarder, WAITING_PER_PEER)
            return
        self._waiting[msg_forwarder] += 1
        try:
            await topic.slots.acquire()
        finally:
            self._waiting[msg_forwarder] -= 1
            if not self._waiting[msg_forwarder]:
                del self._waiting[msg_forwarder]
        key = id(msg)
        self._holding.add(key)
        try:
            mesh = self.router.mesh.get(msg.topicIDs[0], ())  # type: ignore[attr-defined]
            await self.wait_for_room([p for p in mesh if p != msg_forwarder], ROOM_WAIT)
            await super().push_msg(msg_forwarder, msg)
        finally:
            if key in self._holding:  # rejected or duplicate: the slot was not handed on
                self._holding.discard(key)
                topic.slots.release()

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        key = id(publish_message)
        if key not in self._holding:  # our own publication: never delivered to ourselves
            return
        self._holding.discard(key)
        topic = self.topics[publish_message.topicIDs[0]]
        self._deliver(topic, ID(publish_message.from_id).to_base58(), publish_message.data)

    # Outbound room: wait instead of letting RpcQueue.push drop.

    async def wait_for_room(self, peers: Iterable[ID], timeout: float) -> list[ID]:
        """Wait until the peers' outbound queues are below the high-water mark; return those that are.

        A peer whose queue stays full for ``timeout`` is marked stalled and not
        waited for again until its queue drains, so one stuck peer cannot
        throttle every publication to one per ``timeout``.
        """
        peers = list(peers)
        deadline = trio.current_time() + timeout
        while True:
            full = {p for p in peers if len(self.peer_queues.get(p, ())) >= OUTBOUND_HIGH_WATER}
            self._stalled -= set(peers) - full
            waiting = full - self._stalled
            if not waiting:
                return [p for p in peers if p not in full]
            if trio.current_time() >= deadline:
                log.warning("outbound queues still full after %.0f s: %s", timeout, sorted(map(str, waiting)))
                self._stalled |= waiting
            else:
                await trio.sleep(ROOM_POLL)

    def publish_targets(self, topic: str) -> list[ID]:
        """The peers a publication on ``topic`` goes to (mesh, else every known subscriber).

        Upstream, a node whose mesh is empty publishes to nobody and returns
        normally; the service waits for targets or raises instead.
        """
        router: GossipSub = self.router  # type: ignore[assignment]
        peers = router.mesh[topic] if topic in router.mesh else self.peer_topics.get(topic, set())
        return [p for p in peers if p in self.peers]

    # Snapshots of peer_topics for topic_peers(), which runs on the asyncio thread.

    def handle_subscription(self, origin_id: ID, sub_message: rpc_pb2.RPC.SubOpts) -> None:
        super().handle_subscription(origin_id, sub_message)
        self._snapshot_topics()

    async def stream_handler(self, stream: INetStream) -> None:
        """Read a peer's stream to us; its subscriptions last as long as it (class docstring).

        py-libp2p lets a frame that does not parse as an RPC (``DecodeError``) escape the
        handler, which crashes the whole trio loop and with it the node: one malformed or
        truncated frame from any peer stopped two participants of the 30-minute testnet
        (run 10). Such a stream is reset instead; the peer may open another."""
        peer_id = stream.muxed_conn.peer_id
        self._inbound[peer_id] = stream
        try:
            await super().stream_handler(stream)
        except DecodeError as e:
            log.warning("gossip stream from %s sent a frame that is not an RPC (%s); resetting it", peer_id, e)
            await stream.reset()
        finally:
            if self._inbound.get(peer_id) is stream:  # not replaced by a newer stream from the peer
                del self._inbound[peer_id]
                self._forget_all_subscriptions(peer_id)

    def _forget_all_subscriptions(self, peer_id: ID) -> None:
        if peer_id in self._inbound:  # only our stream to it failed: what it announced still holds
            return
        super()._forget_all_subscriptions(peer_id)
        self._stalled.discard(peer_id)
        self._snapshot_topics()

    def _snapshot_topics(self) -> None:
        self.topic_snapshot = {t: tuple(p.to_base58() for p in ps) for t, ps in self.peer_topics.items()}


class ConnectionSnapshot(INotifee):
    """Keeps ``peers`` equal to the connected peer ids, for connected_peers() on another thread.

    py-libp2p's connection map is mutated in the network thread; this tuple
    is replaced on every change, so the asyncio side reads a consistent copy.
    """

    def __init__(self) -> None:
        self.peers: tuple[str, ...] = ()

    def _update(self, network: INetwork) -> None:
        self.peers = tuple(p.to_base58() for p, conns in network.get_connections_map().items() if conns)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._update(network)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._update(network)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


def check_port_free(maddr: Multiaddr) -> None:
    """Raise AddressInUse if another socket listens on ``maddr``'s port.

    py-libp2p listens with SO_REUSEPORT, so a second node on a taken port binds
    without error and the kernel splits incoming connections between the two.
    A probe bound without SO_REUSEPORT fails exactly when the port is taken.
    (``host.run`` also ignores a failed listen and runs without a listener:
    the service checks the bound addresses after it starts.)
    """
    names = {p.name for p in maddr.protocols()}
    if not {"ip4", "tcp"} <= names or int(maddr.value_for_protocol("tcp")) == 0:
        return
    ip, port = str(maddr.value_for_protocol("ip4")), int(maddr.value_for_protocol("tcp"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((ip, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(f"cannot listen on {maddr}: port {port} is already in use by another process") from e
            raise NetworkError(f"cannot listen on {maddr}: {e.strerror}") from e


def forget_failed_dial(host: IHost, peer: ID) -> None:
    """Clear ``peer`` from the dial negative cache.

    A peer whose dial failed is refused for 60 s by a negative cache, even
    after it comes back; an explicit ``connect`` should try again.
    """
    host.get_network()._negative_peer_cache.evict(str(peer))  # type: ignore[attr-defined]


async def confirm_connection(host: IHost, peer: ID, deadline: float) -> None:
    """Ping once, so the remote has registered the connection when connect() returns.

    When a dial returns, the listening side may not have registered the
    connection yet, so its immediate ``open_stream`` back to the dialer fails
    with "no known addresses".
    """
    try:
        with trio.fail_at(deadline):
            stream = await host.new_stream(peer, [PING_PROTOCOL_ID])
            try:
                await perform_ping_roundtrip(stream)
            finally:
                await close(stream)
    except (trio.TooSlowError, BaseLibp2pError, OSError, ValueError) as e:
        log.debug("connected to %s but the confirming ping failed: %r", peer, e)


async def clean_peerstore(peerstore: PeerStore, interval: float) -> None:
    """Forget expired peers every ``interval`` seconds, as ``PeerStore.start_cleanup_task`` does,
    without crashing.

    Upstream's cleanup asks ``addrs()`` of every expired peer whose signed peer record it
    holds (to drop the record once no address is left), and ``addrs()`` raises for an
    expired peer: the exception ends the trio loop, and with it the node. A peer that leaves
    for good expires once its addresses' time to live runs out, so every node that knew it
    stopped. We drop the records of expired peers first -- what that check meant to do --
    then run the rest.
    """
    while True:
        await trio.sleep(interval)
        for peer, data in list(peerstore.peer_data_map.items()):
            if data.is_expired():
                peerstore.peer_record_map.pop(peer, None)
        peerstore._cleanup_expired_records()  # noqa: SLF001 -- upstream's own cleanup, now safe


async def close_connections(host: IHost) -> None:
    """Close all connections at once (py-libp2p closes them one by one, 0.1 s each)."""
    async with trio.open_nursery() as nursery:
        for conns in host.get_network().get_connections_map().values():
            for conn in conns:
                nursery.start_soon(conn.close)
