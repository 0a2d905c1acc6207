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
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from multiaddr import Multiaddr

from gonka_p2p.gossip.libp2p_streams import close
from gonka_p2p.gossip.libp2p_yamux import WholeFrameYamux
from gonka_p2p.gossip.service import AddressInUse, MessageHandler, MessageValidator, NetworkError

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1  # seconds; py-libp2p's default of 120 lets caches balloon
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12
OUTBOUND_QUEUE_SIZE = 2048  # RPCs per peer (py-libp2p: 32, then silent drops)
# Gossip held for a peer until its subscriptions arrive (py-libp2p: 100 RPCs for 30 s, then a WARNING per message)
PENDING_PER_PEER = 16
PENDING_TTL_S = 5.0
OUTBOUND_HIGH_WATER = OUTBOUND_QUEUE_SIZE - 64  # leaves room for control RPCs
DELIVERY_SLOTS = 1024  # gossip messages per topic in validation or awaiting the handler
ROOM_WAIT = 10.0  # seconds publish / forwarding wait for outbound queue room
ROOM_POLL = 0.002



DIAL_BACKOFF_S = 2.0  # after every address of a peer failed, dials to it wait this long (py-libp2p: 60 s)


def secure_host(key_pair: KeyPair, listen: Multiaddr) -> IHost:
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
    """
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: WholeFrameYamux},
        listen_addrs=[listen],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    host.get_network()._negative_peer_cache._ttl = DIAL_BACKOFF_S  # type: ignore[attr-defined]  # noqa: SLF001
    return host


def gossip_router() -> GossipSub:
    """GossipSub with its lossy or inverted defaults replaced.

    * ``heartbeat_interval`` defaults to 120 s, so the message cache and mesh
      repair lag by minutes and caches grow to hundreds of MB: 1 s.
    * ``adaptive_gossip_enabled`` (default on) rewrites ``heartbeat_interval``
      to at least 60 s whenever its "network health" dips and changes mesh
      degrees at runtime: disabled.
    * Spam protection (default on) rate-limits each *forwarder* to 10
      messages per second per topic; the excess is delivered locally but
      silently not forwarded, and the honest relay is penalised. Disabled:
      topic validators and delivery backpressure are our flood defence.
    * gossipsub v1.2+ sends an IDONTWANT control RPC to every mesh peer for
      every message, whatever its size (the spec meant it for large
      messages), and every RPC carries a signed peer record that the receiver
      verifies. Our gossip messages are small (payloads travel over streams),
      so we speak ``/meshsub/1.1.0`` only: half the RPCs, about twice the
      burst throughput.
    * Peer scoring: py-libp2p *subtracts* the P4 (invalid messages), P5
      (behaviour) and P7 (IP colocation) terms, so its weights for them must
      be positive where the gossipsub spec's are negative; copying spec
      weights would reward misbehaviour. We keep all weights at zero and all
      thresholds at -inf (``ScoreParams()``), so scoring can never graylist or
      prune an honest peer (all our test peers share one IP, which P7 would
      punish); topic validators do the filtering instead.
    """
    return BoundedPendingGossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        score_params=ScoreParams(),
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
        max_pending_messages_per_peer=PENDING_PER_PEER,
        pending_messages_ttl=PENDING_TTL_S,
    )


class BoundedPendingGossipSub(GossipSub):
    """GossipSub that holds a little gossip for a peer whose subscriptions have not arrived, quietly.

    py-libp2p 0.8.1 queues each message for every gossip peer not (yet) subscribed to its topic,
    to cover the moment between a connection and its subscriptions. A client speaks gossip but
    subscribes to nothing, so it never leaves that moment: 100 messages were held for it, and
    each one past those logged a WARNING -- 99 % of every participant's log in testnet run 10,
    and one line per message per connected identity for whoever opens many. The race needs a
    few seconds: ``PENDING_PER_PEER`` messages for ``PENDING_TTL_S``, trimmed without a log line
    (gossip's IHAVE / IWANT repair covers a subscriber slower than that).
    """

    def _prune_pending_messages(self, peer_id: ID) -> None:
        queue = self._pending_messages.get(peer_id)
        if queue is None:
            return
        oldest = time.time() - self._pending_messages_ttl
        room = max(0, len(queue) - self._max_pending_messages_per_peer + 1)  # for the message queued next
        queue[:] = [entry for entry in queue[room:] if entry[0] >= oldest]
        if not queue:
            del self._pending_messages[peer_id]


@dataclass
class Topic:
    """One subscription: its handler, validator and bounded delivery path.

    A message holds one of the topic's ``DELIVERY_SLOTS`` from the moment it
    is accepted for processing (trio side) until its handler returns (asyncio
    side), so a slow handler slows intake of that topic (backpressure)
    instead of growing a queue or dropping messages; the queue between the
    two threads can never hold more than the slots.
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

    Per-peer memory: ``_stalled`` forgets a peer when it disconnects,
    ``_inbound`` when its stream to us ends;
    ``_holding`` holds at most ``DELIVERY_SLOTS`` entries per topic; the seen
    cache is py-libp2p's, swept after ``seen_ttl`` (120 s).
    """

    def __init__(self, host: IHost, router: GossipSub, deliver: Callable[[Topic, str, bytes], None]) -> None:
        super().__init__(host, router, strict_signing=True)
        self.peer_queues = SizedQueues()
        self.counter = time.time_ns()  # not int(time.time()): see the class docstring
        self.topics: dict[str, Topic] = {}
        self.topic_snapshot: dict[str, tuple[str, ...]] = {}  # replaced, never mutated
        self._deliver = deliver
        self._holding: set[int] = set()  # id() of messages that hold a delivery slot
        self._stalled: set[ID] = set()  # peers whose outbound queue stayed full
        self._inbound: dict[ID, INetStream] = {}  # the stream each peer opened to us (its subscriptions)

    # Delivery: a message takes a slot before processing; notify hands the slot on.

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        topic = self.topics.get(msg.topicIDs[0]) if len(msg.topicIDs) == 1 else None
        if msg_forwarder == self.my_id or topic is None:
            await super().push_msg(msg_forwarder, msg)
            return
        if self._is_msg_seen(msg):
            return
        await topic.slots.acquire()
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
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_relays = _Untracked()

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          *args: Any, **kwargs: Any) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, *args, **kwargs)
        finally:
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)
