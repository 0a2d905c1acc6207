"""An in-process implementation of :class:`NetworkService` for tests and simulations.

Same semantics as the libp2p service -- validators before delivery, publish
raises rather than drops when nobody listens, streams reset when a handler
raises or a host stops -- without sockets. A :class:`MemoryHub` plays the
network: it routes by peer id and can add a seeded latency and pubsub loss so
runs replay from their seed.

Each host owns its tasks, one per gossip delivery and one per stream it
serves, in a TaskGroup entered at ``start`` and left at ``stop``. A gossip
handler that raises is logged and its message dropped; a stream handler that
raises resets its stream.
Memory is bounded: at most ``DELIVERY_SLOTS`` gossip messages wait for one
host's handlers (``publish`` waits for room, as the libp2p service's
backpressure does), 64 frames per open stream, one subscription per topic,
and a host's peers are the hub's hosts. The size bounds are the libp2p
service's: frames by their protocol's :func:`~gonka_p2p.wire.protocols.frame_limits`,
gossip messages by their topic's :func:`~gonka_p2p.wire.protocols.topic_max_bytes`
(a longer one is dropped before its validator runs), and inbound streams by
the hub's :class:`~gonka_p2p.gossip.inbound.InboundLimits` (a refused stream
is reset before its handler runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gonka_p2p.gossip.inbound import InboundGate, InboundLimits
from gonka_p2p.gossip.outbound import RETRY_AFTER, OutboundGate
from gonka_p2p.gossip.ownership import TaskOwner
from gonka_p2p.gossip.service import (
    AddressInUse,
    FrameTooLarge,
    MessageHandler,
    MessageValidator,
    PeerUnreachable,
    PublishError,
    StreamHandler,
    StreamReset,
)
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.protocols import frame_limits, topic_max_bytes

_END = object()
DELIVERY_SLOTS = 1024  # gossip messages waiting for one host's handlers

log = logging.getLogger(__name__)


@dataclass
class MemoryHub:
    """The network all MemoryServices of one test or simulation share."""

    seed: int = 0
    latency: float = 0.0  # seconds added to every delivery
    loss: float = 0.0  # probability a pubsub message to one peer is lost
    limits: InboundLimits = field(default_factory=InboundLimits)  # every host's, as in production
    hosts: dict[str, MemoryService] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def service(self, key: Keypair) -> MemoryService:
        return MemoryService(self, key)

    async def deliver_delay(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)


class MemoryService:
    """One host on a MemoryHub."""

    def __init__(self, hub: MemoryHub, key: Keypair) -> None:
        self._hub = hub
        self._peer_id = key.peer_id
        self._running = False
        self._peers: set[str] = set()
        self._subs: dict[str, tuple[MessageHandler, MessageValidator | None]] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._slots = asyncio.Semaphore(DELIVERY_SLOTS)
        self._owner: TaskOwner | None = None
        self._vouched: Callable[[str], bool] = lambda peer: True
        self._gate = InboundGate(hub.limits)
        self._outbound = OutboundGate()  # as every honest listener counts us
        self._outbound_freed = asyncio.Event()

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self._peer_id}/p2p/{self._peer_id}"]

    async def start(self) -> None:
        if self._peer_id in self._hub.hosts:
            raise AddressInUse(f"a host with peer id {self._peer_id} is already on this hub")
        self._hub.hosts[self._peer_id] = self
        self._running = True
        self._slots = asyncio.Semaphore(DELIVERY_SLOTS)  # a fresh count: slots of cancelled deliveries are gone
        self._gate = InboundGate(self._hub.limits, self._vouched)  # and streams of the last run are gone
        self._owner = TaskOwner(f"memory host {self._peer_id}", self._leave)

    async def _leave(self) -> None:
        """Leave the hub: the teardown once this host's tasks are gone (stop, or a crash)."""
        self._running = False
        if self._hub.hosts.get(self._peer_id) is self:
            del self._hub.hosts[self._peer_id]
        for peer in list(self._peers):
            other = self._hub.hosts.get(peer)
            if other:
                other._peers.discard(self._peer_id)
        self._peers.clear()

    async def stop(self) -> None:
        if self._owner is not None:
            await self._owner.close()

    async def wait_closed(self) -> None:
        if self._owner is not None:
            await self._owner.wait_closed()

    async def _tasks(self) -> asyncio.TaskGroup | None:
        """The TaskGroup that owns this host's tasks; None once the host stopped."""
        return await self._owner.group() if self._owner is not None else None

    async def connect(self, multiaddr: str, timeout: float = 10.0) -> str:
        peer = multiaddr.rsplit("/p2p/", 1)[-1]
        other = self._hub.hosts.get(peer)
        if other is None or not other._running:
            raise PeerUnreachable(f"cannot reach {multiaddr}: no such peer is running")
        if peer != self._peer_id:
            self._peers.add(peer)
            other._peers.add(self._peer_id)
        return peer

    def connected_peers(self) -> list[str]:
        return sorted(self._peers)

    async def subscribe(
        self, topic: str, handler: MessageHandler, validator: MessageValidator | None = None
    ) -> None:
        self._subs[topic] = (handler, validator)

    def topic_peers(self, topic: str) -> list[str]:
        return sorted(p for p in self._peers if topic in self._hub.hosts[p]._subs)

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > topic_max_bytes(topic):
            raise PublishError(f"{len(data)}-byte message exceeds {topic}'s {topic_max_bytes(topic)}; use a stream")
        targets = self.topic_peers(topic)
        if not targets:
            raise PublishError(f"no peer is subscribed to {topic!r}; message not sent")
        for peer in targets:
            if self._hub.loss and self._hub.rng.random() < self._hub.loss:
                continue
            other = self._hub.hosts.get(peer)
            if other is None or await other._tasks() is None:
                continue
            await other._slots.acquire()  # no await point while a slot is free
            if (tasks := await other._tasks()) is None:  # it stopped meanwhile
                other._slots.release()
            else:
                tasks.create_task(other._receive(topic, self._peer_id, data))

    async def _receive(self, topic: str, sender: str, data: bytes) -> None:
        """Deliver one gossip message; the handler's error, if any, is logged and the message dropped."""
        try:
            await self._hub.deliver_delay()
            sub = self._subs.get(topic)
            if not self._running or sub is None:
                return
            handler, validator = sub
            if len(data) > topic_max_bytes(topic):
                return
            if validator is not None and not validator(sender, data):
                return
            try:
                await handler(sender, data)
            except Exception:
                log.exception("the handler for gossip topic %s on %s raised on a message from %s; dropped",
                              topic, self._peer_id, sender)
        finally:
            self._slots.release()

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    def set_vouched(self, vouched: Callable[[str], bool]) -> None:
        self._vouched = self._gate.vouched = vouched

    async def open_stream(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        other = self._hub.hosts.get(peer_id)
        if other is None or not other._running:
            raise PeerUnreachable(f"cannot reach peer {peer_id}")
        handler = other._stream_handlers.get(protocol)
        if handler is None:
            raise StreamReset(f"peer {peer_id} does not serve {protocol}")
        limits = frame_limits(protocol)
        if len(request) > limits.request:
            raise FrameTooLarge(f"{protocol} request of {len(request)} bytes exceeds {limits.request}")
        frames: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

        async def send(frame: bytes) -> None:
            if len(frame) > limits.reply:
                raise FrameTooLarge(f"{protocol} frame of {len(frame)} bytes exceeds {limits.reply}")
            await self._hub.deliver_delay()
            await frames.put(bytes(frame))

        async def serve() -> None:
            try:
                await handler(self._peer_id, request, send)
                await frames.put(_END)
            except asyncio.CancelledError:
                await frames.put(StreamReset(f"peer {peer_id} went away mid-stream"))
                raise
            except Exception as e:  # noqa: BLE001 - a failing handler resets the stream
                await frames.put(StreamReset(f"peer {peer_id} reset the stream: {e}"))

        await self._take_slot(peer_id, protocol, timeout)
        try:
            await self._hub.deliver_delay()
            tasks = await other._tasks()
            if tasks is None:
                raise PeerUnreachable(f"cannot reach peer {peer_id}: it stopped")
            gate = other._gate
            if (refused := gate.admit(self._peer_id, protocol, asyncio.get_running_loop().time())) is not None:
                raise StreamReset(f"peer {peer_id} refused the stream: {refused}")
            task = tasks.create_task(serve())
            task.add_done_callback(lambda _: gate.release(self._peer_id, protocol))  # even if it never ran
            try:
                while True:
                    item = await asyncio.wait_for(frames.get(), timeout)
                    if item is _END:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item  # type: ignore[misc]
            finally:
                if not task.done():
                    task.cancel()
        finally:
            self._outbound.give_back(peer_id, protocol)
            self._outbound_freed.set()
            self._outbound_freed = asyncio.Event()

    async def _take_slot(self, peer_id: str, protocol: str, timeout: float) -> None:
        """Wait until ``peer_id`` would admit one more ``protocol`` stream from us (outbound.py)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (busy := self._outbound.take(peer_id, protocol, loop.time())) is not None:
            if loop.time() >= deadline:
                raise TimeoutError(f"{peer_id} would refuse one more {protocol} stream from this host "
                                   f"({busy}) and none ended within {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbound_freed.wait(), min(RETRY_AFTER, deadline - loop.time()))

    async def request(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> bytes:
        frames = [f async for f in self.open_stream(peer_id, protocol, request, timeout)]
        if len(frames) != 1:
            raise StreamReset(f"expected one response frame from {peer_id}, got {len(frames)}")
        return frames[0]
