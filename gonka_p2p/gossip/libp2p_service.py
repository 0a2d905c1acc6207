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
``loop.call_soon_threadsafe``. What we change in py-libp2p's defaults, and
why, is in :mod:`~gonka_p2p.gossip.libp2p_patches`; frames and pipelined
negotiation on a stream in :mod:`~gonka_p2p.gossip.libp2p_streams`.

Gossip delivery: each subscribed topic has an asyncio worker that runs the
handler for one message at a time. A message holds one of the topic's
``DELIVERY_SLOTS`` from the moment it is accepted for processing until its
handler returns, so a slow handler slows intake of that topic (backpressure)
instead of growing a queue or dropping messages. ``publish`` raises
:class:`PublishError` when nobody subscribes, the mesh stays empty for
``MESH_WAIT`` (py-libp2p would send to nobody), or every target queue stays
full; a message over its topic's bound
(:func:`~gonka_p2p.wire.protocols.topic_max_bytes`, at most py-libp2p's
1 MiB RPC, which it would silently drop) is refused up front, and an
inbound one over it is dropped before the topic's validator decodes it.
Messages must carry exactly one topic; the validator is not run on our own
publications, and a validator that raises counts as a rejection and is
logged.

Who owns what: the trio nursery of the :class:`TrioThread` owns every trio
task; a :class:`~gonka_p2p.gossip.ownership.TaskOwner`, opened at ``start``
and closed at ``stop``, owns every gossip worker. A gossip handler that
raises is logged and its message dropped: it ran on a peer's bytes, and
any peer could otherwise stop the node with one message its handler
chokes on. A stream handler that raises only resets its stream (the opener
sees :class:`StreamReset`).

Streams (frame format in :mod:`gonka_p2p.wire.framing`): on the serving path's
protocols an opener keeps one negotiated stream per peer ready for the next
request (:mod:`~gonka_p2p.gossip.spare_streams`). A reset (a handler
that raised, a frame over the limit) may discard frames the opener has not
read yet: yamux drops buffered data when the reset arrives. An opener that
goes away (resets the stream, or its connection dies) cancels the handler
serving it, as on the in-memory hub: a TA stops relaying, and so stops the
executor, for a client that gave up even while it waits for a frame.

Bounded memory: delivery is bounded by slots per topic, outbound queues by
``OUTBOUND_QUEUE_SIZE`` RPCs per peer (dropped with the peer), stalled peers
forgotten on disconnect, inbound streams in all, per peer, per peer and
protocol and by rate per peer (:mod:`~gonka_p2p.gossip.inbound`; a refused
stream is reset before its request is read), frames by their protocol's
bounds, gossip messages by their topic's, the seen cache by py-libp2p's 120 s TTL, topics by the
subscriptions the actors make. py-libp2p itself still starts one task per
inbound gossip message; at most ``WAITING_PER_PEER`` of each forwarder's
signed messages wait for a delivery slot, the rest are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from functools import partial
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from gonka_p2p.gossip import libp2p_streams as streams
from gonka_p2p.gossip.dial_book import DialBook
from gonka_p2p.gossip.inbound import InboundGate, InboundLimits
from gonka_p2p.gossip.outbound import RETRY_AFTER, OutboundGate
from gonka_p2p.gossip.libp2p_gossipsub import gossip_router
from gonka_p2p.gossip.libp2p_patches import (
    ROOM_WAIT,
    ConnectionSnapshot,
    GossipPubsub,
    Topic,
    check_port_free,
    clean_peerstore,
    close_connections,
    confirm_connection,
    forget_failed_dial,
    secure_host,
)
from gonka_p2p.gossip.service import (
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
from gonka_p2p.gossip.ownership import TaskOwner
from gonka_p2p.gossip.relay import Relay, RelayOptions, is_circuit
from gonka_p2p.gossip.spare_streams import SpareStreams
from gonka_p2p.gossip.trio_bridge import Outbox, TrioThread
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.protocols import frame_limits, keeps_spare, topic_max_bytes

log = logging.getLogger(__name__)

MESH_WAIT = 3.0  # seconds publish waits for a mesh while subscribers are known
REQUEST_READ_TIMEOUT = 30.0  # seconds a served stream waits for its request frame (a spare's included)
SPARE_OPEN_TIMEOUT = 10.0  # seconds to open and negotiate a spare stream
STOP_GRACE = 3.0  # seconds to close connections politely on stop


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as e:  # noqa: BLE001 - base58/multihash raise assorted types
        raise PeerUnreachable(f"{peer_id!r} is not a valid peer id") from e


class Libp2pService:
    """The production NetworkService: py-libp2p (noise + yamux + gossipsub) in a trio thread."""

    def __init__(self, key: Keypair, listen_multiaddr: str = "/ip4/127.0.0.1/tcp/0",
                 limits: InboundLimits = InboundLimits(), relay: RelayOptions = RelayOptions()) -> None:
        """``relay``: whether this host relays for peers behind NATs, or is one (gossip/relay.py)."""
        self._key = key
        self._listen = Multiaddr(listen_multiaddr)
        self._relay_options = relay
        self._relay: Relay | None = None
        self._bridge: TrioThread | None = None
        self._host: IHost | None = None
        self._pubsub: GossipPubsub | None = None
        self._connections = ConnectionSnapshot()
        self._listen_addrs: list[str] = []
        self._handlers: dict[str, StreamHandler] = {}
        self._topics: dict[str, Topic] = {}
        self._owner: TaskOwner | None = None
        self._gate = InboundGate(limits)  # read and written in the trio thread only
        self._outbound = OutboundGate()  # as every honest listener counts us; trio thread only
        self._outbound_streams: dict[INetStream, tuple[str, str]] = {}  # stream -> (peer, protocol)
        self._outbound_freed: trio.Event | None = None
        self._slot_waiters = 0  # openers waiting for an outbound slot: no spare may take one meanwhile
        self._spares = SpareStreams(self._t_open_spare, self._t_abandon)
        self._dialed = DialBook()  # trio thread only

    # ---- lifecycle -------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._key.peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """Where peers dial us: behind a NAT, the circuits through the relays that hold our reservation."""
        if self._relay is not None and self._relay_options.behind_nat:
            return list(self._relay.addrs)
        return list(self._listen_addrs)

    async def start(self) -> None:
        if self._owner is not None and not self._owner.closed:
            raise NetworkError("the network service is already running")
        bridge = TrioThread(f"libp2p-{self.peer_id[-8:]}")
        self._bridge = bridge
        try:
            await bridge.start(self._lifespan)
        except BaseException:
            self._bridge = None
            raise
        self._owner = TaskOwner(f"network service {self.peer_id}", lambda: self._teardown(bridge))

    async def _teardown(self, bridge: TrioThread) -> None:
        """Stop the trio thread once the gossip workers are gone (stop, or a crash)."""
        self._bridge = None
        self._topics.clear()
        await bridge.stop(timeout=STOP_GRACE + 5)
        self._listen_addrs = []
        self._connections.peers = ()

    async def stop(self) -> None:
        if self._owner is not None:
            await self._owner.close()

    async def wait_closed(self) -> None:
        if self._owner is not None:
            await self._owner.wait_closed()

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        """Build, run and finally tear down the host (trio thread)."""
        check_port_free(self._listen)
        host = secure_host(create_new_key_pair(self._key.secret), self._listen, self._dialed)
        router = gossip_router()
        pubsub = GossipPubsub(host, router, self._deliver)
        host.get_network().register_notifee(self._connections)
        for protocol, handler in self._handlers.items():
            host.set_stream_handler(TProtocol(protocol), self._stream_server(handler))
        async with host.run([self._listen]):
            if not host.get_transport_addrs():  # py-libp2p only logs why, at debug level
                raise NetworkError(f"cannot listen on {self._listen}")
            async with background_trio_service(pubsub), background_trio_service(router), trio.open_nursery() as nursery:
                await pubsub.wait_until_ready()
                nursery.start_soon(clean_peerstore, host.get_peerstore(), 60)
                relay = Relay(host, self._relay_options, vouched=lambda peer: self._gate.vouched(peer))
                await nursery.start(relay.run)  # behind a NAT: once a relay holds our reservation (or NoRelay)
                self._host, self._pubsub, self._relay = host, pubsub, relay
                self._listen_addrs = [str(a) for a in host.get_addrs()]
                try:
                    yield
                finally:
                    self._host = self._pubsub = self._relay = None
                    with trio.move_on_after(STOP_GRACE) as scope:
                        scope.shield = True
                        await close_connections(host)
                    nursery.cancel_scope.cancel()

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
        self._dialed.remember(host.get_peerstore(), info.peer_id, info.addrs)
        forget_failed_dial(host, info.peer_id)
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                if not is_circuit(multiaddr):
                    await host.connect(info)
                elif not host.get_network().get_connections(info.peer_id):  # py-libp2p never dials circuits
                    await self._t_relay().dial(Multiaddr(multiaddr))
        except trio.TooSlowError:
            raise PeerUnreachable(f"cannot connect to {multiaddr}: timed out after {timeout} s") from None
        except (BaseLibp2pError, OSError, ConnectionError) as e:
            raise PeerUnreachable(f"cannot connect to {multiaddr}: {e}") from e
        await confirm_connection(host, info.peer_id, deadline)
        return info.peer_id.to_base58()

    def connected_peers(self) -> list[str]:
        return list(self._connections.peers)

    def _t_host(self) -> IHost:
        if self._host is None:
            raise NetworkError("the network service is stopping")
        return self._host

    def _t_relay(self) -> Relay:
        if self._relay is None:
            raise NetworkError("the network service is stopping")
        return self._relay

    def _t_pubsub(self) -> GossipPubsub:
        if self._pubsub is None:
            raise NetworkError("the network service is stopping")
        return self._pubsub

    # ---- gossip ----------------------------------------------------------

    async def subscribe(self, topic: str, handler: MessageHandler, validator: MessageValidator | None = None) -> None:
        """Join ``topic``; subscribing again replaces the handler and validator."""
        bridge = self._running()
        workers = await self._owner.group() if self._owner is not None else None
        if workers is None:
            raise NetworkError("the network service is stopping")
        entry = self._topics.get(topic)
        if entry is None:
            entry = Topic(handler, validator)
            workers.create_task(self._deliver_loop(topic, entry), name=f"gossip {topic}")
            self._topics[topic] = entry
        entry.handler, entry.validator = handler, validator
        await bridge.call(self._t_subscribe, topic, entry)

    async def _t_subscribe(self, topic: str, entry: Topic) -> None:
        pubsub = self._t_pubsub()
        pubsub.topics[topic] = entry
        pubsub.set_topic_validator(topic, self._validator_for(entry), is_async_validator=False)
        await pubsub.subscribe(topic)

    def _validator_for(self, entry: Topic) -> Callable[[ID, rpc_pb2.Message], bool]:
        my_id = ID.from_base58(self.peer_id)

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if len(msg.topicIDs) != 1 or len(msg.data) > topic_max_bytes(msg.topicIDs[0]):
                return False
            if forwarder == my_id or entry.validator is None:
                return True
            try:
                return bool(entry.validator(ID(msg.from_id).to_base58(), msg.data))
            except Exception:
                log.exception("validator for topic %s raised; message rejected", msg.topicIDs[0])
                return False

        return validate

    def _deliver(self, entry: Topic, sender: str, data: bytes) -> None:
        """Hand an accepted message (and its slot) to the topic's asyncio worker (trio thread)."""
        if self._bridge is not None:
            self._bridge.call_soon_in_asyncio(entry.queue.put_nowait, (sender, data))

    async def _deliver_loop(self, topic: str, entry: Topic) -> None:
        """Run the handler for one message at a time, then return the message's slot.

        A handler that raises is logged and the message dropped (module docstring).
        """
        while True:
            sender, data = await entry.queue.get()
            try:
                await entry.handler(sender, data)
            except Exception:
                log.exception("the handler for gossip topic %s raised on a message from %s; dropped", topic, sender)
            finally:
                if self._bridge is not None:
                    self._bridge.call_soon_in_trio(entry.slots.release)

    def topic_peers(self, topic: str) -> list[str]:
        pubsub = self._pubsub
        return list(pubsub.topic_snapshot.get(topic, ())) if pubsub is not None else []

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > topic_max_bytes(topic):
            raise PublishError(f"{len(data)}-byte message exceeds {topic}'s {topic_max_bytes(topic)}; use a stream")
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

    def set_vouched(self, vouched: Callable[[str], bool]) -> None:
        """Which peers are no strangers to the inbound gate (read in the trio thread: one reference)."""
        self._gate.vouched = vouched

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
            opener, protocol = stream.muxed_conn.peer_id.to_base58(), str(stream.get_protocol())
            if (refused := self._gate.admit(opener, protocol, trio.current_time())) is not None:
                log.info("refusing a %s stream from %s: %s", protocol, opener, refused)
                await streams.reset(stream)
                return
            try:
                await self._t_serve(handler, stream, opener, protocol)
            finally:
                self._gate.release(opener, protocol)

        return serve

    async def _t_serve(self, handler: StreamHandler, stream: INetStream, opener: str, protocol: str) -> None:
        limits = frame_limits(protocol)
        bridge = self._bridge
        if bridge is None:
            await streams.reset(stream)
            return
        outbox: Outbox[bytes] = Outbox(bridge)  # frames written by one task, not a trio call each

        async def send(frame: bytes) -> None:  # asyncio side
            streams.check_frame(frame, limits.reply)
            await outbox.send(bytes(frame))

        async def write_all() -> None:
            with suppress(Exception):  # kept as outbox.error: the stream is reset below
                await outbox.run(partial(streams.write_frame, stream, limit=limits.reply))

        send_frame: SendFrame = send
        try:
            with trio.fail_after(REQUEST_READ_TIMEOUT):
                request = await streams.read_frame(stream, limits.request)
            if request is None:
                raise StreamReset("the opener ended the stream without a request")
        except (NetworkError, trio.TooSlowError) as e:
            log.debug("%s from %s: bad request: %r", protocol, opener, e)
            await streams.reset(stream)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_all)
            watching = trio.CancelScope()

            async def cancel_when_the_opener_leaves() -> None:
                with watching:
                    await streams.opener_done(stream)
                    log.debug("%s opener %s went away; cancelling its handler", protocol, opener)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(cancel_when_the_opener_leaves)
            try:
                await bridge.run_in_asyncio(handler, opener, request, send_frame)
            except Exception as e:
                if isinstance(e, NetworkError) and not isinstance(e, FrameTooLarge):
                    log.debug("%s handler for %s ended by the network: %r", protocol, opener, e)
                else:
                    log.warning("%s handler raised for %s; resetting the stream", protocol, opener, exc_info=True)
                nursery.cancel_scope.cancel()
            watching.cancel()
            outbox.close()  # the writer returns once every frame sent is written
        if outbox.error is not None or nursery.cancel_scope.cancel_called:
            await streams.reset(stream)
            return
        try:
            await streams.finish(stream)
        except NetworkError as e:
            log.debug("%s to %s: could not end the stream: %r", protocol, opener, e)
            await streams.reset(stream)

    async def open_stream(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        streams.check_frame(request, frame_limits(protocol).request, "request")
        bridge = self._running()
        opened: list[INetStream] = []  # written and read in the trio thread only
        request = bytes(request)

        async def next_frame() -> bytes | None:  # the reader opens the stream, then reads it
            if not opened:
                opened.append(await self._t_open(peer_id, protocol, request, timeout))
            return await self._t_read(opened[0], protocol, timeout)

        finished = False
        try:  # one trio task per stream opens and reads it: no trio call to open, none per frame
            async with aclosing(bridge.pull(next_frame)) as frames:
                async for frame in frames:
                    yield frame
            finished = True
        finally:
            if not finished:  # abandoned, failed or cancelled: do not leave the stream open
                bridge.spawn(self._t_abandon_opened, opened)

    async def request(self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0) -> bytes:
        streams.check_frame(request, frame_limits(protocol).request, "request")
        return await self._running().call(self._t_request, peer_id, protocol, bytes(request), timeout)

    async def _t_open(self, peer_id: str, protocol: str, request: bytes, timeout: float) -> INetStream:
        spare = await self._spares.take(peer_id, protocol)
        if spare is not None and await self._spares.sent(spare, request, frame_limits(protocol).request, timeout):
            return spare
        await self._t_take_slot(peer_id, protocol, timeout)
        return await self._t_open_counted(peer_id, protocol, request, timeout)

    async def _t_open_counted(self, peer_id: str, protocol: str, request: bytes | None,
                              timeout: float) -> INetStream:
        """Open a stream from the slot just taken; the slot goes back if it cannot be opened."""
        try:
            stream = await self._t_negotiated(peer_id, protocol, request, timeout)
        except BaseException:
            self._t_give_back_slot(peer_id, protocol)
            raise
        self._outbound_streams[stream] = (peer_id, protocol)
        return stream

    async def _t_open_spare(self, peer_id: str, protocol: str) -> INetStream | None:
        """A negotiated stream without a request, from a slot free now that nobody waits for;
        None when there is none or the peer cannot be reached (gossip/spare_streams.py)."""
        if self._slot_waiters or self._outbound.take(peer_id, protocol, trio.current_time()) is not None:
            return None
        try:
            return await self._t_open_counted(peer_id, protocol, None, SPARE_OPEN_TIMEOUT)
        except (NetworkError, TimeoutError) as e:
            log.debug("no spare %s stream to %s: %r", protocol, peer_id, e)
            return None

    async def _t_negotiated(self, peer_id: str, protocol: str, request: bytes | None, timeout: float) -> INetStream:
        host, peer = self._t_host(), _parse_peer_id(peer_id)
        try:
            with trio.fail_after(timeout):
                if not host.get_network().get_connections(peer):
                    self._dialed.restore(host.get_peerstore(), peer)
                    await self._t_relay().redial(peer)
                stream = await host.get_network().new_stream(peer)
        except trio.TooSlowError:
            raise PeerUnreachable(f"opening {protocol} to {peer_id} timed out after {timeout} s") from None
        except (BaseLibp2pError, OSError) as e:
            raise PeerUnreachable(f"cannot reach {peer_id}: {e}") from e
        try:
            with trio.fail_after(timeout):
                await streams.write(stream, streams.proposal(protocol, request))
                await streams.expect_agreement(stream, peer_id, protocol)
        except trio.TooSlowError:
            await streams.reset(stream)
            raise TimeoutError(f"sending the request to {peer_id} took over {timeout} s") from None
        except BaseException:
            await streams.reset(stream)
            raise
        stream.set_protocol(TProtocol(protocol))
        return stream

    async def _t_take_slot(self, peer_id: str, protocol: str, timeout: float) -> None:
        """Wait until ``peer_id`` would admit one more ``protocol`` stream from us (outbound.py)."""
        try:
            with trio.fail_after(timeout):
                while (busy := self._outbound.take(peer_id, protocol, trio.current_time())) is not None:
                    log.debug("waiting to open %s to %s: %s", protocol, peer_id, busy)
                    if self._outbound_freed is None:
                        self._outbound_freed = trio.Event()
                    freed = self._outbound_freed
                    self._slot_waiters += 1
                    try:
                        with trio.move_on_after(RETRY_AFTER):
                            await freed.wait()
                    finally:
                        self._slot_waiters -= 1
        except trio.TooSlowError:
            raise TimeoutError(f"{peer_id} would refuse one more {protocol} stream from this host "
                               f"({busy}) and none ended within {timeout} s") from None

    def _t_give_back_slot(self, peer_id: str, protocol: str) -> None:
        self._outbound.give_back(peer_id, protocol)
        if self._outbound_freed is not None:
            self._outbound_freed.set()
            self._outbound_freed = None

    def _t_ended(self, stream: INetStream) -> tuple[str, str] | None:
        """An opened stream is closed or reset: its slot goes back (once, whichever path ends it).
        Returns its (peer, protocol) the first time."""
        if (key := self._outbound_streams.pop(stream, None)) is not None:
            self._t_give_back_slot(*key)
        return key

    async def _t_abandon(self, stream: INetStream) -> None:
        try:
            await streams.reset(stream)
        finally:
            self._t_ended(stream)

    async def _t_abandon_opened(self, opened: list[INetStream]) -> None:
        """Abandon the stream a cancelled or failed reader opened, if it got that far. This runs
        after the reader's cancellation was delivered, and a stream is in ``opened`` from the step
        that finished opening it (an open cut short resets its own stream)."""
        if opened:
            await self._t_abandon(opened[0])

    async def _t_read(self, stream: INetStream, protocol: str, timeout: float) -> bytes | None:
        """The next response frame of ``protocol``, or None (stream closed) after the end marker."""
        try:
            with trio.fail_after(timeout):
                frame = await streams.read_frame(stream, frame_limits(protocol).reply)
        except trio.TooSlowError:
            await self._t_abandon(stream)
            raise TimeoutError(f"no frame from {stream.muxed_conn.peer_id} within {timeout} s") from None
        except BaseException:
            await self._t_abandon(stream)
            raise
        if frame is None:
            await streams.close(stream)
            ended = self._t_ended(stream)
            if ended is not None and keeps_spare(protocol) and self._bridge is not None:
                self._bridge.spawn(self._spares.keep, *ended)  # ended well: the next request's stream
        return frame

    async def _t_request(self, peer_id: str, protocol: str, request: bytes, timeout: float) -> bytes:
        stream = await self._t_open(peer_id, protocol, request, timeout)
        try:
            response = await self._t_read(stream, protocol, timeout)
            if response is None:
                raise StreamReset(f"{peer_id} closed {protocol} without a response")
            if await self._t_read(stream, protocol, timeout) is not None:
                raise StreamReset(f"{peer_id} sent more than one response on {protocol}")
            return response
        except BaseException:
            await self._t_abandon(stream)
            raise
