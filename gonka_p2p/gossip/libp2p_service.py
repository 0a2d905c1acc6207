"""NetworkService over py-libp2p 0.8.1, run in its own trio thread.

Theory of operation
-------------------
The application's loop is asyncio; py-libp2p only runs under trio. A
:class:`~gonka_p2p.gossip.trio_bridge.TrioThread` runs one trio loop in one
daemon thread holding the host (TCP, noise, yamux), gossipsub and our stream
protocols. Every public coroutine here is a thin asyncio shim that awaits a
``_t_*`` coroutine run in that thread; trio calls back into asyncio only to
deliver gossip messages and to run stream handlers. Nothing blocks the
asyncio loop: the only cross-thread primitives are the trio token and
``loop.call_soon_threadsafe``.

Gossip delivery: each subscribed topic has an asyncio worker that runs the
handler for one message at a time. A message holds one of the topic's
``DELIVERY_SLOTS`` (a trio semaphore) from the moment it is accepted for
processing until its handler returns, so a slow handler slows intake of that
topic (backpressure) instead of growing a queue or dropping messages.

Streams: a stream carries one request frame from the opener, then response
frames, then an end-of-stream marker. Each frame is a 4-byte big-endian length
and the payload; the length ``0xFFFFFFFF`` is the end marker (real frames are
at most ``MAX_FRAME_BYTES``). The marker is what tells a finished stream from
a crashed peer: py-libp2p reports a torn-down connection as a plain EOF, so
any EOF before the marker is a :class:`StreamReset`. A reset (a handler that
raised, a frame over the limit) may discard frames the opener has not read
yet: yamux drops buffered data when the reset arrives.

py-libp2p quirks and what we do about each
------------------------------------------
* Security: ``new_host`` offers noise, TLS, secio *and plaintext* by default.
  We pass noise as the only security option and yamux as the only muxer.
* Heartbeat defaults to 120 s, so the message cache and mesh repair lag by
  minutes; we use 1 s.
* ``adaptive_gossip_enabled`` (default on) rewrites ``heartbeat_interval`` to
  at least 60 s whenever its "network health" dips and changes mesh degrees at
  runtime: disabled.
* Spam protection (default on) rate-limits each *forwarder* to 10 messages per
  second per topic; the excess is delivered locally but silently not
  forwarded, and the honest relay is penalised. Disabled: topic validators and
  delivery backpressure are our flood defence.
* The per-topic subscription channel holds 32 messages and drops the rest
  (``Pubsub.notify_subscriptions``). We bypass it: ``_GossipPubsub`` hands
  messages straight to our bounded, backpressured delivery path.
* Each peer's outbound ``RpcQueue`` holds 32 RPCs and drops the rest while
  ``publish`` returns normally. We raise it to ``OUTBOUND_QUEUE_SIZE`` and,
  before we publish or forward, wait until the target queues are below
  ``OUTBOUND_HIGH_WATER``. ``publish`` raises :class:`PublishError` when
  nobody subscribes, the mesh stays empty for ``MESH_WAIT`` (py-libp2p would
  send to nobody), or every target queue stays full;
  a message over ``MAX_PUBLISH_BYTES`` (which py-libp2p would silently drop as
  an oversized RPC) is refused up front.
* Message sequence numbers start at ``int(time.time())`` and count up, so a
  node that publishes more than one message per second and restarts reuses
  sequence numbers that peers still hold as "seen" and drops as duplicates.
  We start the counter at ``time.time_ns()``, as go-libp2p does.
* gossipsub v1.2+ sends an IDONTWANT control RPC to every mesh peer for
  every message, whatever its size (the spec meant it for large messages),
  and every RPC carries a signed peer record that the receiver verifies. Our
  gossip messages are small (payloads travel over streams), so we speak
  ``/meshsub/1.1.0`` only: half the RPCs, about twice the burst throughput.
* Peer scoring: py-libp2p *subtracts* the P4 (invalid messages), P5
  (behaviour) and P7 (IP colocation) terms, so its weights for them must be
  positive where the gossipsub spec's are negative; copying spec weights would
  reward misbehaviour. We keep all weights at zero and all thresholds at
  -inf, so scoring can never graylist or prune an honest peer (all our test
  peers share one IP, which P7 would punish); topic validators do the
  filtering instead.
* ``host.new_stream`` negotiates the protocol in lock step (multistream-select
  handshake, wait, protocol, wait) before the first byte of payload: two
  round trips per stream, and every request on the serving path opens one
  (client -> TA, TA -> executor). We pipeline instead, as go-libp2p's lazy
  negotiation does: handshake, protocol and request frame in one write, then
  both answers. Listeners cannot tell the difference; one that does not
  serve the protocol answers ``na`` and we reset the stream. Measured with
  ``benchmarks/netbench.py`` on a busy 2-core machine: request/response
  p50 24 -> 20 ms, and about 1.5x the requests per second.
* Every dial to a single address waits out a 250 ms "happy eyeballs" delay
  unless the per-peer connection limit is reached; with
  ``max_connections_per_peer=1`` a dial returns as soon as it connects.
* A peer whose dial failed is refused for 60 s by a negative cache, even
  after it comes back; ``connect`` (an explicit request) clears that entry.
* When a dial returns, the listening side may not have registered the
  connection yet, so its immediate ``open_stream`` back to the dialer fails
  with "no known addresses". ``connect`` pings once over the new connection
  before it returns.
* The TCP listener sets SO_REUSEPORT, so starting a second node on a taken
  port succeeds and the kernel splits inbound connections between the two
  nodes. We probe the port without SO_REUSEPORT first and raise
  :class:`AddressInUse`. ``host.run`` also ignores a failed listen and runs
  without a listener; we check the bound addresses.
* Validators run in the network thread, *before* delivery and forwarding, so
  they must be cheap, must not block and must only read state that is safe to
  read from another thread (decoding and signature checks are ideal). A
  validator that raises counts as a rejection and is logged. Messages must
  carry exactly one topic; the validator is not run on our own publications.

Bounded memory: delivery is bounded by slots per topic, outbound queues by
``OUTBOUND_QUEUE_SIZE`` RPCs per peer, concurrent inbound streams by
``MAX_INBOUND_STREAMS``, frames by ``MAX_FRAME_BYTES``, gossip messages by
``MAX_PUBLISH_BYTES``. py-libp2p itself still starts one task per inbound
gossip message; those tasks wait on the delivery slots rather than buffering
inside our code.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError, ParseError
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils import encode_delim
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from gonka_p2p.gossip.service import (
    MAX_FRAME_BYTES,
    AddressInUse,
    FrameTooLarge,
    MessageHandler,
    MessageValidator,
    NetworkError,
    PeerUnreachable,
    PublishError,
    SendFrame,
    StreamHandler,
    StreamReset,
)
from gonka_p2p.gossip.trio_bridge import TrioThread
from gonka_p2p.identity import Keypair

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1  # seconds; py-libp2p's default of 120 lets caches balloon
GOSSIP_DEGREE, GOSSIP_DEGREE_LOW, GOSSIP_DEGREE_HIGH = 6, 4, 12
OUTBOUND_QUEUE_SIZE = 2048  # RPCs per peer (py-libp2p: 32, then silent drops)
OUTBOUND_HIGH_WATER = OUTBOUND_QUEUE_SIZE - 64  # leaves room for control RPCs
DELIVERY_SLOTS = 1024  # gossip messages per topic in validation or awaiting the handler
MAX_PUBLISH_BYTES = 1_000_000  # py-libp2p drops RPCs over 1 MiB; envelope overhead is < 1 KiB
MESH_WAIT = 3.0  # seconds publish waits for a mesh while subscribers are known
ROOM_WAIT = 10.0  # seconds publish / forwarding wait for outbound queue room
ROOM_POLL = 0.002
MAX_INBOUND_STREAMS = 256
REQUEST_READ_TIMEOUT = 10.0  # seconds a served stream waits for its request frame
STOP_GRACE = 3.0  # seconds to close connections politely on stop
PEER_ADDR_TTL = 3600  # seconds connect()-ed addresses stay dialable
MAX_NEGOTIATION_LINE = 1024  # bytes of one multistream-select answer

_HEADER = struct.Struct(">I")
_END_OF_STREAM = 0xFFFFFFFF


# ---- frames (trio side) ----------------------------------------------------


async def _read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = await stream.read(n - len(buf))
            if not chunk:
                raise StreamReset("the peer closed the stream before the end-of-stream marker")
            buf += chunk
    except (BaseLibp2pError, OSError) as e:
        # py-libp2p reports a dead connection as EOF; only the end marker means "done".
        raise StreamReset(f"stream broken: {e!r}") from e
    return bytes(buf)


async def _read_frame(stream: INetStream) -> bytes | None:
    """The next frame, or None at the end-of-stream marker."""
    (length,) = _HEADER.unpack(await _read_exact(stream, _HEADER.size))
    if length == _END_OF_STREAM:
        return None
    if length > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"peer announced a {length}-byte frame (limit {MAX_FRAME_BYTES})")
    return await _read_exact(stream, length)


async def _write(stream: INetStream, data: bytes) -> None:
    try:
        await stream.write(data)
    except (BaseLibp2pError, OSError) as e:
        raise StreamReset(f"stream broken while writing: {type(e).__name__}") from e


async def _write_frame(stream: INetStream, frame: bytes) -> None:
    if len(frame) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"{len(frame)}-byte frame exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
    await _write(stream, _HEADER.pack(len(frame)) + frame)


async def _finish(stream: INetStream) -> None:
    """Send the end marker and close our side: the clean way to end a stream."""
    await _write(stream, _HEADER.pack(_END_OF_STREAM))
    with suppress(BaseLibp2pError, OSError):
        await stream.close()


def _proposal(protocol: str) -> bytes:
    """multistream-select's handshake and protocol lines, as one write."""
    return encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode())


async def _read_line(stream: INetStream) -> str:
    """One multistream-select line (varint length, text, newline), bounded."""
    line = await read_varint_prefixed_bytes_limited(stream, MAX_NEGOTIATION_LINE)
    if not line.endswith(b"\n"):
        raise ParseError(f"multistream line without its newline: {line[:64]!r}")
    return line[:-1].decode(errors="replace")


async def _expect_agreement(stream: INetStream, peer_id: str, protocol: str) -> None:
    """Read the listener's answers to a pipelined proposal: the handshake, then ``protocol``."""
    try:
        handshake, answer = await _read_line(stream), await _read_line(stream)
    except (BaseLibp2pError, OSError) as e:
        raise StreamReset(f"{peer_id} broke off protocol negotiation: {e!r}") from e
    if handshake != MULTISELECT_PROTOCOL_ID:
        raise StreamReset(f"{peer_id} does not speak {MULTISELECT_PROTOCOL_ID} ({handshake!r})")
    if answer != protocol:
        raise StreamReset(f"{peer_id} does not serve {protocol} (it answered {answer!r})")


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), suppress(BaseLibp2pError, OSError):
        await stream.reset()


async def _close(stream: INetStream) -> None:
    with suppress(BaseLibp2pError, OSError):
        await stream.close()


# ---- gossip (trio side) ----------------------------------------------------


@dataclass
class _Topic:
    """One subscription: its handler, validator and bounded delivery path."""

    handler: MessageHandler
    validator: MessageValidator | None
    queue: asyncio.Queue[tuple[str, bytes]] = field(default_factory=lambda: asyncio.Queue(DELIVERY_SLOTS))
    slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(DELIVERY_SLOTS))
    worker: asyncio.Task[None] | None = None


class _SizedQueues(dict[ID, Any]):
    """``Pubsub.peer_queues`` that enlarges each RpcQueue py-libp2p creates with size 32."""

    def __setitem__(self, peer: ID, queue: Any) -> None:
        queue._queue.max_size = OUTBOUND_QUEUE_SIZE
        super().__setitem__(peer, queue)


class _GossipPubsub(Pubsub):
    """py-libp2p's Pubsub with lossless, backpressured delivery and thread-safe snapshots."""

    def __init__(self, host: IHost, router: GossipSub, deliver: Callable[[_Topic, str, bytes], None]) -> None:
        super().__init__(host, router, strict_signing=True)
        self.peer_queues = _SizedQueues()
        self.counter = time.time_ns()  # not int(time.time()): see module docstring
        self.topics: dict[str, _Topic] = {}
        self.topic_snapshot: dict[str, tuple[str, ...]] = {}  # replaced, never mutated
        self._deliver = deliver
        self._holding: set[int] = set()  # id() of messages that hold a delivery slot
        self._stalled: set[ID] = set()  # peers whose outbound queue stayed full

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
        """The peers a publication on ``topic`` goes to (mesh, else every known subscriber)."""
        router: GossipSub = self.router  # type: ignore[assignment]
        peers = router.mesh[topic] if topic in router.mesh else self.peer_topics.get(topic, set())
        return [p for p in peers if p in self.peers]

    # Snapshots of peer_topics for topic_peers(), which runs on the asyncio thread.

    def handle_subscription(self, origin_id: ID, sub_message: rpc_pb2.RPC.SubOpts) -> None:
        super().handle_subscription(origin_id, sub_message)
        self._snapshot_topics()

    def _forget_all_subscriptions(self, peer_id: ID) -> None:
        super()._forget_all_subscriptions(peer_id)
        self._snapshot_topics()

    def _snapshot_topics(self) -> None:
        self.topic_snapshot = {t: tuple(p.to_base58() for p in ps) for t, ps in self.peer_topics.items()}


class _ConnectionSnapshot(INotifee):
    """Keeps ``peers`` equal to the connected peer ids, for connected_peers() on another thread."""

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


def _log_if_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gossip delivery worker died", exc_info=task.exception())


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as e:  # noqa: BLE001 - base58/multihash raise assorted types
        raise PeerUnreachable(f"{peer_id!r} is not a valid peer id") from e


def _check_port_free(maddr: Multiaddr) -> None:
    """Raise AddressInUse if another socket listens on ``maddr``'s port.

    py-libp2p listens with SO_REUSEPORT, so a second node on a taken port binds
    without error and the kernel splits incoming connections between the two.
    A probe bound without SO_REUSEPORT fails exactly when the port is taken.
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


class Libp2pService:
    """The production NetworkService: py-libp2p (noise + yamux + gossipsub) in a trio thread."""

    def __init__(self, key: Keypair, listen_multiaddr: str = "/ip4/127.0.0.1/tcp/0") -> None:
        self._key = key
        self._listen = Multiaddr(listen_multiaddr)
        self._bridge: TrioThread | None = None
        self._host: IHost | None = None
        self._pubsub: _GossipPubsub | None = None
        self._connections = _ConnectionSnapshot()
        self._listen_addrs: list[str] = []
        self._handlers: dict[str, StreamHandler] = {}
        self._topics: dict[str, _Topic] = {}
        self._inbound = trio.Semaphore(MAX_INBOUND_STREAMS)

    # ---- lifecycle -------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._key.peer_id

    @property
    def listen_addrs(self) -> list[str]:
        return list(self._listen_addrs)

    async def start(self) -> None:
        if self._bridge is not None:
            raise NetworkError("the network service is already running")
        bridge = TrioThread(f"libp2p-{self.peer_id[-8:]}")
        self._bridge = bridge
        try:
            await bridge.start(self._lifespan)
        except BaseException:
            self._bridge = None
            raise

    async def stop(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is None:
            return
        workers = [t.worker for t in self._topics.values() if t.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._topics.clear()
        await bridge.stop(timeout=STOP_GRACE + 5)
        self._listen_addrs = []
        self._connections.peers = ()

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        """Build, run and finally tear down the host (trio thread)."""
        _check_port_free(self._listen)
        key_pair = create_new_key_pair(self._key.secret)
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            listen_addrs=[self._listen],
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
        router = GossipSub(
            protocols=[PROTOCOL_ID_V11],  # not v1.2: see module docstring on IDONTWANT
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            score_params=ScoreParams(),  # neutral: see module docstring on the inverted signs
            spam_protection_enabled=False,
            adaptive_gossip_enabled=False,
        )
        pubsub = _GossipPubsub(host, router, self._deliver)
        host.get_network().register_notifee(self._connections)
        for protocol, handler in self._handlers.items():
            host.set_stream_handler(TProtocol(protocol), self._stream_server(handler))
        async with host.run([self._listen]):
            if not host.get_transport_addrs():  # py-libp2p only logs why, at debug level
                raise NetworkError(f"cannot listen on {self._listen}")
            async with background_trio_service(pubsub), background_trio_service(router), trio.open_nursery() as nursery:
                await pubsub.wait_until_ready()
                nursery.start_soon(host.get_peerstore().start_cleanup_task, 60)
                self._host, self._pubsub = host, pubsub
                self._listen_addrs = [str(a) for a in host.get_addrs()]
                try:
                    yield
                finally:
                    self._host = self._pubsub = None
                    with trio.move_on_after(STOP_GRACE) as scope:
                        scope.shield = True
                        await self._t_close_connections(host)
                    nursery.cancel_scope.cancel()

    @staticmethod
    async def _t_close_connections(host: IHost) -> None:
        """Close all connections at once (py-libp2p closes them one by one, 0.1 s each)."""
        async with trio.open_nursery() as nursery:
            for conns in host.get_network().get_connections_map().values():
                for conn in conns:
                    nursery.start_soon(conn.close)

    def _running(self) -> TrioThread:
        if self._bridge is None:
            raise NetworkError("the network service is not running (call start() first)")
        return self._bridge

    # ---- peers -----------------------------------------------------------

    async def connect(self, multiaddr: str, timeout: float = 10.0) -> str:
        return await self._running().call(self._t_connect, multiaddr, timeout)

    async def _t_connect(self, multiaddr: str, timeout: float) -> str:
        host = self._t_host()
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except Exception as e:  # noqa: BLE001 - multiaddr parsing raises assorted types
            raise PeerUnreachable(f"{multiaddr!r} is not a full multiaddr ending in /p2p/<peer id>: {e}") from e
        if info.peer_id == host.get_id():
            raise PeerUnreachable(f"{multiaddr} is this host itself")
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL)
        host.get_network()._negative_peer_cache.evict(str(info.peer_id))  # type: ignore[attr-defined]
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                await host.connect(info)
        except trio.TooSlowError:
            raise PeerUnreachable(f"cannot connect to {multiaddr}: timed out after {timeout} s") from None
        except (BaseLibp2pError, OSError) as e:
            raise PeerUnreachable(f"cannot connect to {multiaddr}: {e}") from e
        await self._t_confirm(host, info.peer_id, deadline)
        return info.peer_id.to_base58()

    @staticmethod
    async def _t_confirm(host: IHost, peer: ID, deadline: float) -> None:
        """Ping once, so the remote has registered the connection when connect() returns.

        Without this the listener may not know the connection yet, and its
        immediate open_stream back to us fails with "no known addresses".
        """
        try:
            with trio.fail_at(deadline):
                stream = await host.new_stream(peer, [PING_PROTOCOL_ID])
                try:
                    await perform_ping_roundtrip(stream)
                finally:
                    await _close(stream)
        except (trio.TooSlowError, BaseLibp2pError, OSError, ValueError) as e:
            log.debug("connected to %s but the confirming ping failed: %r", peer, e)

    def connected_peers(self) -> list[str]:
        return list(self._connections.peers)

    def _t_host(self) -> IHost:
        if self._host is None:
            raise NetworkError("the network service is stopping")
        return self._host

    def _t_pubsub(self) -> _GossipPubsub:
        if self._pubsub is None:
            raise NetworkError("the network service is stopping")
        return self._pubsub

    # ---- gossip ----------------------------------------------------------

    async def subscribe(self, topic: str, handler: MessageHandler, validator: MessageValidator | None = None) -> None:
        """Join ``topic``; subscribing again replaces the handler and validator."""
        bridge = self._running()
        entry = self._topics.get(topic)
        if entry is None:
            entry = _Topic(handler, validator)
            entry.worker = asyncio.get_running_loop().create_task(self._deliver_loop(topic, entry))
            entry.worker.add_done_callback(_log_if_failed)
            self._topics[topic] = entry
        entry.handler, entry.validator = handler, validator
        await bridge.call(self._t_subscribe, topic, entry)

    async def _t_subscribe(self, topic: str, entry: _Topic) -> None:
        pubsub = self._t_pubsub()
        pubsub.topics[topic] = entry
        pubsub.set_topic_validator(topic, self._validator_for(entry), is_async_validator=False)
        await pubsub.subscribe(topic)

    def _validator_for(self, entry: _Topic) -> Callable[[ID, rpc_pb2.Message], bool]:
        my_id = ID.from_base58(self.peer_id)

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if len(msg.topicIDs) != 1:
                return False
            if forwarder == my_id or entry.validator is None:
                return True
            try:
                return bool(entry.validator(ID(msg.from_id).to_base58(), msg.data))
            except Exception:
                log.exception("validator for topic %s raised; message rejected", msg.topicIDs[0])
                return False

        return validate

    def _deliver(self, entry: _Topic, sender: str, data: bytes) -> None:
        """Hand an accepted message (and its slot) to the topic's asyncio worker (trio thread)."""
        if self._bridge is not None:
            self._bridge.call_soon_in_asyncio(entry.queue.put_nowait, (sender, data))

    async def _deliver_loop(self, topic: str, entry: _Topic) -> None:
        """Run the handler for one message at a time, then return the message's slot."""
        while True:
            sender, data = await entry.queue.get()
            try:
                await entry.handler(sender, data)
            except Exception:
                log.exception("handler for topic %s raised on a message from %s", topic, sender)
            finally:
                if self._bridge is not None:
                    self._bridge.call_soon_in_trio(entry.slots.release)

    def topic_peers(self, topic: str) -> list[str]:
        pubsub = self._pubsub
        return list(pubsub.topic_snapshot.get(topic, ())) if pubsub is not None else []

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_PUBLISH_BYTES:
            raise PublishError(f"{len(data)}-byte message exceeds MAX_PUBLISH_BYTES ({MAX_PUBLISH_BYTES}); use a stream")
        await self._running().call(self._t_publish, topic, bytes(data))

    async def _t_publish(self, topic: str, data: bytes) -> None:
        pubsub = self._t_pubsub()
        deadline = trio.current_time() + MESH_WAIT
        while not (targets := pubsub.publish_targets(topic)):
            if not pubsub.peer_topics.get(topic):
                raise PublishError(f"no peer is subscribed to {topic!r}")
            if trio.current_time() >= deadline:
                raise PublishError(f"no mesh for {topic!r} after {MESH_WAIT} s although peers subscribe")
            await trio.sleep(0.01)
        if not await pubsub.wait_for_room(targets, ROOM_WAIT):
            raise PublishError(f"outbound queues to all {len(targets)} peers of {topic!r} are full")
        await pubsub.publish(topic, data)

    # ---- streams ---------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``; may be called before or after start()."""
        self._handlers[protocol] = handler
        if self._bridge is not None:
            server = self._stream_server(handler)
            self._bridge.call_soon_in_trio(self._t_set_handler, protocol, server)

    def _t_set_handler(self, protocol: str, server: Callable[[INetStream], Any]) -> None:
        if self._host is not None:
            self._host.set_stream_handler(TProtocol(protocol), server)

    def _stream_server(self, handler: StreamHandler) -> Callable[[INetStream], Any]:
        async def serve(stream: INetStream) -> None:
            try:
                self._inbound.acquire_nowait()
            except trio.WouldBlock:
                log.warning("refusing a stream: %d inbound streams already open", MAX_INBOUND_STREAMS)
                await _reset(stream)
                return
            try:
                await self._t_serve(handler, stream)
            finally:
                self._inbound.release()

        return serve

    async def _t_serve(self, handler: StreamHandler, stream: INetStream) -> None:
        opener = stream.muxed_conn.peer_id.to_base58()
        protocol = stream.get_protocol()
        bridge = self._bridge
        if bridge is None:
            await _reset(stream)
            return
        lock = trio.Lock()

        async def write(frame: bytes) -> None:
            async with lock:
                await _write_frame(stream, frame)

        async def send(frame: bytes) -> None:  # asyncio side
            if len(frame) > MAX_FRAME_BYTES:
                raise FrameTooLarge(f"{len(frame)}-byte frame exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
            await bridge.call(write, bytes(frame))

        send_frame: SendFrame = send
        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                request = await _read_frame(stream)
            if request is None:
                raise StreamReset("the opener ended the stream without a request")
        except (NetworkError, trio.TooSlowError) as e:
            log.debug("%s from %s: bad request: %r", protocol, opener, e)
            await _reset(stream)
            return
        try:
            await bridge.run_in_asyncio(handler, opener, request, send_frame)
        except Exception as e:
            if isinstance(e, NetworkError) and not isinstance(e, FrameTooLarge):
                log.debug("%s handler for %s ended by the network: %r", protocol, opener, e)
            else:
                log.warning("%s handler raised for %s; resetting the stream", protocol, opener, exc_info=True)
            await _reset(stream)
            return
        try:
            async with lock:
                await _finish(stream)
        except NetworkError as e:
            log.debug("%s to %s: could not end the stream: %r", protocol, opener, e)
            await _reset(stream)

    async def open_stream(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        if len(request) > MAX_FRAME_BYTES:
            raise FrameTooLarge(f"{len(request)}-byte request exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
        bridge = self._running()
        stream = await bridge.call(self._t_open, peer_id, protocol, bytes(request), timeout)
        finished = False
        try:
            while (frame := await bridge.call(self._t_read, stream, timeout)) is not None:
                yield frame
            finished = True
        finally:
            if not finished:  # abandoned, failed or cancelled: do not leave the stream open
                bridge.spawn(_reset, stream)

    async def request(self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0) -> bytes:
        if len(request) > MAX_FRAME_BYTES:
            raise FrameTooLarge(f"{len(request)}-byte request exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")
        return await self._running().call(self._t_request, peer_id, protocol, bytes(request), timeout)

    async def _t_open(self, peer_id: str, protocol: str, request: bytes, timeout: float) -> INetStream:
        host, peer = self._t_host(), _parse_peer_id(peer_id)
        try:
            with trio.fail_after(timeout):
                stream = await host.get_network().new_stream(peer)
        except trio.TooSlowError:
            raise PeerUnreachable(f"opening {protocol} to {peer_id} timed out after {timeout} s") from None
        except (BaseLibp2pError, OSError) as e:
            raise PeerUnreachable(f"cannot reach {peer_id}: {e}") from e
        try:
            with trio.fail_after(timeout):
                await _write(stream, _proposal(protocol) + _HEADER.pack(len(request)) + request)
                await _expect_agreement(stream, peer_id, protocol)
        except trio.TooSlowError:
            await _reset(stream)
            raise TimeoutError(f"sending the request to {peer_id} took over {timeout} s") from None
        except BaseException:
            await _reset(stream)
            raise
        stream.set_protocol(TProtocol(protocol))
        return stream

    async def _t_read(self, stream: INetStream, timeout: float) -> bytes | None:
        """The next response frame, or None (stream closed) after the end marker."""
        try:
            with trio.fail_after(timeout):
                frame = await _read_frame(stream)
        except trio.TooSlowError:
            await _reset(stream)
            raise TimeoutError(f"no frame from {stream.muxed_conn.peer_id} within {timeout} s") from None
        except BaseException:
            await _reset(stream)
            raise
        if frame is None:
            await _close(stream)
        return frame

    async def _t_request(self, peer_id: str, protocol: str, request: bytes, timeout: float) -> bytes:
        stream = await self._t_open(peer_id, protocol, request, timeout)
        response = await self._t_read(stream, timeout)
        if response is None:
            raise StreamReset(f"{peer_id} closed {protocol} without a response")
        if await self._t_read(stream, timeout) is not None:
            await _reset(stream)
            raise StreamReset(f"{peer_id} sent more than one response on {protocol}")
        return response
