"""Spare streams (gossip/spare_streams.py) over real py-libp2p hosts on 127.0.0.1.

What is observed is what the listener sees: every stream it admits passes its
inbound gate, before any request. A spare is a stream admitted with no request
yet; a request sent on it reaches the handler without a new admission.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from helpers import eventually

from gonka_p2p.gossip import libp2p_service, spare_streams
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.service import SendFrame
from gonka_p2p.gossip.spare_streams import is_dead
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.protocols import EXECUTE_PROTOCOL, keeps_spare

pytestmark = [pytest.mark.libp2p]

T = TypeVar("T")
Hosts = tuple[Libp2pService, Libp2pService, list[str], list[int]]


@pytest.fixture
async def hosts() -> AsyncIterator[Hosts]:
    """An opener and a listener serving EXECUTE_PROTOCOL (which keeps spares) and /echo/1 (which
    does not); the protocols the listener admitted, in order, and how many it had admitted when
    each request reached its handler."""
    opener = Libp2pService(Keypair.from_seed(b"spare-opener"))
    listener = Libp2pService(Keypair.from_seed(b"spare-listener"))
    await opener.start()
    await listener.start()
    admitted: list[str] = []
    admitted_at_handler: list[int] = []
    gate_admit = listener._gate.admit

    def counting_admit(peer: str, protocol: str, now: float) -> str | None:
        refused = gate_admit(peer, protocol, now)
        if refused is None:
            admitted.append(protocol)
        return refused

    listener._gate.admit = counting_admit  # type: ignore[method-assign]

    async def answer(opener_id: str, request: bytes, send: SendFrame) -> None:
        admitted_at_handler.append(len(admitted))
        await send(request.upper())

    listener.set_stream_handler(EXECUTE_PROTOCOL, answer)
    listener.set_stream_handler("/echo/1", answer)
    assert await opener.connect(listener.listen_addrs[0]) == listener.peer_id
    try:
        yield opener, listener, admitted, admitted_at_handler
    finally:
        await asyncio.gather(opener.stop(), listener.stop())


async def ask(opener: Libp2pService, listener: Libp2pService, protocol: str, request: bytes) -> list[bytes]:
    """Every frame of one stream, read to its end."""
    async with contextlib.aclosing(opener.open_stream(listener.peer_id, protocol, request, timeout=10)) as frames:
        return [frame async for frame in frames]


def in_trio(service: Libp2pService, probe: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """``probe`` as a coroutine run in the service's trio thread, which owns what it reads."""
    async def run() -> T:
        async def call() -> T:
            return probe()
        return await service._running().call(call)
    return run


def listener_open_streams(listener: Libp2pService) -> Callable[[], Awaitable[int]]:
    return in_trio(listener, lambda: listener._gate.open_streams)


def opener_open_streams(opener: Libp2pService) -> Callable[[], Awaitable[int]]:
    return in_trio(opener, lambda: opener._outbound.open_streams)


async def test_a_stream_that_ended_well_leaves_a_spare_and_the_next_request_uses_it(hosts: Hosts) -> None:
    opener, listener, admitted, admitted_at_handler = hosts
    assert keeps_spare(EXECUTE_PROTOCOL) and not keeps_spare("/echo/1")

    assert await ask(opener, listener, "/echo/1", b"plain") == [b"PLAIN"]
    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"first") == [b"FIRST"]
    # The spare's admission first: the count alone may still hold the first stream, closing
    # (fresh clone #17 saw it so on a loaded machine).
    await eventually(lambda: len(admitted), until=lambda n: n == 3, what="a spare admitted")
    assert admitted == ["/echo/1", EXECUTE_PROTOCOL, EXECUTE_PROTOCOL]  # no spare for /echo/1
    await eventually(listener_open_streams(listener), until=lambda n: n == 1, what="only the spare open")
    await eventually(in_trio(opener, lambda: len(opener._spares)), until=lambda n: n == 1, what="the opener to hold it")

    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"second") == [b"SECOND"]
    # The second request reached its handler on the stream admitted before it was sent.
    assert admitted_at_handler == [1, 2, 3]
    await eventually(lambda: len(admitted), until=lambda n: n == 4, what="the spare replaced")
    await eventually(listener_open_streams(listener), until=lambda n: n == 1, what="only the new spare open")


async def test_a_spare_nobody_takes_is_reset_after_its_max_age(hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    opener, listener, admitted, _ = hosts
    monkeypatch.setattr(spare_streams, "SPARE_MAX_AGE", 0.3)
    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"once") == [b"ONCE"]
    await eventually(lambda: len(admitted), until=lambda n: n == 2, what="a spare")
    await eventually(listener_open_streams(listener), until=lambda n: n == 0, what="the stale spare reset")
    assert await opener_open_streams(opener)() == 0 and len(opener._spares) == 0
    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"later") == [b"LATER"]


async def test_a_spare_the_listener_dropped_is_not_used(hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener stops waiting for a spare's request (its own timeout, a restart): the next
    request sees the reset and opens a stream of its own, and no slot leaks."""
    opener, listener, admitted, admitted_at_handler = hosts
    monkeypatch.setattr(libp2p_service, "REQUEST_READ_TIMEOUT", 0.3)  # the listener's, in this process
    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"one") == [b"ONE"]
    await eventually(lambda: len(admitted), until=lambda n: n == 2, what="a spare")
    await eventually(in_trio(opener, lambda: len(opener._spares)), until=lambda n: n == 1, what="the opener to hold it")
    spare = opener._spares._spares[listener.peer_id, EXECUTE_PROTOCOL].stream
    assert spare is not None
    await eventually(in_trio(opener, lambda: is_dead(spare)), what="the opener to see the reset")

    assert await ask(opener, listener, EXECUTE_PROTOCOL, b"two") == [b"TWO"]
    assert admitted_at_handler == [1, 3]  # a fresh stream carried the request
    await eventually(lambda: len(admitted), until=lambda n: n == 4, what="a new spare")
    # the new spare's slot; the dead one's went back
    await eventually(opener_open_streams(opener), until=lambda n: n == 1, what="one slot held")
