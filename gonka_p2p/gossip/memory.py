"""An in-process implementation of :class:`NetworkService` for tests and simulations.

Same semantics as the libp2p service -- validators before delivery, publish
raises rather than drops when nobody listens, streams reset when a handler
raises or a host stops -- without sockets. A :class:`MemoryHub` plays the
network: it routes by peer id and can add a seeded latency and pubsub loss so
runs replay from their seed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gonka_p2p.gossip.service import (
    MAX_FRAME_BYTES,
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

log = logging.getLogger(__name__)

_END = object()


@dataclass
class MemoryHub:
    """The network all MemoryServices of one test or simulation share."""

    seed: int = 0
    latency: float = 0.0  # seconds added to every delivery
    loss: float = 0.0  # probability a pubsub message to one peer is lost
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
        self._tasks: set[asyncio.Task[None]] = set()

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

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._hub.hosts.pop(self._peer_id, None)
        for peer in list(self._peers):
            other = self._hub.hosts.get(peer)
            if other:
                other._peers.discard(self._peer_id)
        self._peers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
        targets = self.topic_peers(topic)
        if not targets:
            raise PublishError(f"no peer is subscribed to {topic!r}; message not sent")
        for peer in targets:
            if self._hub.loss and self._hub.rng.random() < self._hub.loss:
                continue
            self._spawn(self._hub.hosts[peer]._receive(topic, self._peer_id, data))

    async def _receive(self, topic: str, sender: str, data: bytes) -> None:
        await self._hub.deliver_delay()
        sub = self._subs.get(topic)
        if not self._running or sub is None:
            return
        handler, validator = sub
        if validator is not None and not validator(sender, data):
            return
        await handler(sender, data)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handler failed on %s", self._peer_id, exc_info=task.exception())

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def open_stream(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        other = self._hub.hosts.get(peer_id)
        if other is None or not other._running:
            raise PeerUnreachable(f"cannot reach peer {peer_id}")
        handler = other._stream_handlers.get(protocol)
        if handler is None:
            raise StreamReset(f"peer {peer_id} does not serve {protocol}")
        if len(request) > MAX_FRAME_BYTES:
            raise FrameTooLarge(f"request of {len(request)} bytes exceeds {MAX_FRAME_BYTES}")
        frames: asyncio.Queue[object] = asyncio.Queue(maxsize=64)

        async def send(frame: bytes) -> None:
            if len(frame) > MAX_FRAME_BYTES:
                raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
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

        await self._hub.deliver_delay()
        task = asyncio.ensure_future(serve())
        other._tasks.add(task)
        task.add_done_callback(other._tasks.discard)
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

    async def request(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> bytes:
        frames = [f async for f in self.open_stream(peer_id, protocol, request, timeout)]
        if len(frames) != 1:
            raise StreamReset(f"expected one response frame from {peer_id}, got {len(frames)}")
        return frames[0]
