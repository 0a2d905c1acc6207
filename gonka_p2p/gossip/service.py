"""The network service interface every actor talks through.

Theory of operation
-------------------
Actors never touch libp2p directly. They see one narrow asyncio interface:

* **pubsub** -- ``subscribe(topic, handler, validator)`` and ``publish(topic,
  data)``. A validator runs on every inbound message *before* it is handed to
  the handler or forwarded to other peers, so invalid traffic dies at the
  first honest hop. ``publish`` never drops silently: if the message cannot be
  handed to at least one peer (empty mesh, full queue) it raises
  :class:`PublishError`, and the caller decides whether to retry.
* **streams** -- one request frame in, any number of response frames out.
  ``set_stream_handler(protocol, handler)`` serves a protocol; ``open_stream``
  sends a request and yields the response frames until the server closes the
  stream. Request/response is the special case of exactly one response frame
  (``request``). Payloads (prompts, tokens, artifacts, blocks) travel here,
  never over gossip.
* **ownership** -- a service owns every task it starts (gossip workers,
  in-memory deliveries) from ``start`` to ``stop``. A gossip handler that
  raises is logged and its message dropped: handlers run on peers' bytes,
  and a crash there would let any peer stop the node with one message. If a
  task of the service's own fails, the service stops and ``wait_closed``
  raises :class:`ServiceCrashed`, so whoever owns the service (the node's
  supervisor) learns of it instead of running on without gossip. A stream
  handler that raises resets only its stream; an opener that goes away
  (abandons or resets the stream, or disconnects) cancels its handler.

Frames are opaque bytes; their meaning (and their signatures) belongs to
``gonka_p2p.wire``. Every frame is bounded by its protocol's
``wire.protocols.frame_limits`` and every gossip message by its topic's
``topic_max_bytes``: a peer that announces a longer frame is cut off with
:class:`FrameTooLarge` before it is read, a longer gossip message is dropped
before its validator runs. Inbound streams are admitted per peer
(``gossip.inbound``): a peer over its limits has its streams reset, other
peers do not notice.

Two implementations share these semantics: ``libp2p_service`` (py-libp2p in
its own trio thread; production and integration tests) and ``memory`` (an
in-process hub with optional seeded latency and loss; unit tests and large
simulations).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol

# (sender peer id, message bytes) -> None
MessageHandler = Callable[[str, bytes], Awaitable[None]]
# (sender peer id, message bytes) -> accept?  Must be cheap and must not raise.
MessageValidator = Callable[[str, bytes], bool]
# Sends one response frame to the stream's opener.
SendFrame = Callable[[bytes], Awaitable[None]]
# (opener peer id, request frame, send) -> None. Returning closes the stream;
# raising resets it (the opener sees StreamReset).
StreamHandler = Callable[[str, bytes, SendFrame], Awaitable[None]]


class NetworkError(Exception):
    """Base class of every error the network service raises."""


class PeerUnreachable(NetworkError):
    """A dial failed: the peer is down, the address is wrong, or it timed out."""


class PublishError(NetworkError):
    """A published message could not be handed to any peer (empty mesh or full queue)."""


class StreamReset(NetworkError):
    """The remote side reset the stream, crashed, or disconnected mid-stream."""


class FrameTooLarge(NetworkError):
    """A frame exceeded its protocol's bound (``wire.protocols.frame_limits``)."""


class AddressInUse(NetworkError):
    """The listen address is already taken by another process."""


class ServiceCrashed(NetworkError):
    """A task the service owns (a gossip worker) failed, and the service stopped; see ``__cause__``."""


class NetworkService(Protocol):
    """What actors may ask of the network. See the module docstring."""

    @property
    def peer_id(self) -> str:
        """This host's peer id (base58), derived from its secp256k1 key."""
        ...

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs others can dial, each ending in ``/p2p/<peer id>``."""
        ...

    async def start(self) -> None:
        """Bind the listen address and start serving. Raises AddressInUse."""
        ...

    async def stop(self) -> None:
        """Close every stream and connection; idempotent."""
        ...

    async def wait_closed(self) -> None:
        """Return once the service has stopped; raise ServiceCrashed if a task it owns failed.

        Owners await it beside their actors (cancelling the wait leaves the service running).
        """
        ...

    async def connect(self, multiaddr: str, timeout: float = 10.0) -> str:
        """Dial a peer by full multiaddr and return its peer id. Raises PeerUnreachable."""
        ...

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection right now."""
        ...

    async def subscribe(
        self, topic: str, handler: MessageHandler, validator: MessageValidator | None = None
    ) -> None:
        """Join a topic. Messages published by this host are not delivered back to it."""
        ...

    def topic_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic`` (the mesh candidates)."""
        ...

    async def publish(self, topic: str, data: bytes) -> None:
        """Broadcast ``data`` on ``topic``. Raises PublishError rather than dropping."""
        ...

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol`` (e.g. ``/gonka/infer/1``) with ``handler``."""
        ...

    def set_vouched(self, vouched: Callable[[str], bool]) -> None:
        """Which peers this host knows: the others, strangers, share part of its inbound streams
        (:mod:`~gonka_p2p.gossip.inbound`). Called from the network's own thread, at every
        inbound stream: it must be cheap and safe to call from there. Everyone, until set."""
        ...

    def open_stream(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> AsyncIterator[bytes]:
        """Send ``request`` to ``peer_id`` and yield response frames until the server closes.

        ``timeout`` bounds the dial and the wait for *each* frame. Raises
        PeerUnreachable (dial), StreamReset (remote reset / crash) or
        TimeoutError (no frame within ``timeout``).
        """
        ...

    async def request(
        self, peer_id: str, protocol: str, request: bytes, timeout: float = 30.0
    ) -> bytes:
        """One request, exactly one response frame. Raises as ``open_stream``."""
        ...


async def connect_any(service: NetworkService, addrs: Iterable[str], give_up: float, per_dial: float) -> bool:
    """Dial ``addrs`` in turn until one connects, each dial within ``per_dial`` seconds and all
    before the event loop's time ``give_up``; whether one did. A peer chooses the addresses it
    announces or signs, so ones that accept and never answer cost the dialer at most that."""
    loop = asyncio.get_running_loop()
    for addr in addrs:
        left = min(per_dial, give_up - loop.time())
        if left <= 0:
            return False
        try:
            await service.connect(addr, timeout=left)
            return True
        except (NetworkError, TimeoutError):
            continue
    return False
