"""The in-memory network service: who owns its tasks, and what bounds its memory."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import a_raising_handler_is_contained, eventually

from gonka_p2p.gossip import memory
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.identity import Keypair


async def pair(hub: MemoryHub) -> tuple[MemoryService, MemoryService]:
    a, b = hub.service(Keypair.from_seed(b"mem-a")), hub.service(Keypair.from_seed(b"mem-b"))
    await a.start()
    await b.start()
    await a.connect(b.listen_addrs[0])
    return a, b


async def test_a_gossip_handler_that_raises_is_logged_and_its_host_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """As over libp2p: a handler runs on a peer's bytes, so its error must not stop the host
    (any peer could then stop it with one message); it is logged and the message dropped."""
    hub = MemoryHub()
    a, b = await pair(hub)
    owner = await a_raising_handler_is_contained(a, b, caplog, "gonka_p2p.gossip.memory")
    assert b.peer_id in hub.hosts
    await b.stop()
    await a.stop()
    await owner  # a clean stop: returns without raising


async def test_deliveries_waiting_for_a_slow_handler_are_bounded_and_publish_waits_for_room(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "DELIVERY_SLOTS", 2)
    hub = MemoryHub()
    a, b = await pair(hub)
    release = asyncio.Event()
    got: list[bytes] = []

    async def slow(sender: str, data: bytes) -> None:
        await release.wait()
        got.append(data)

    await b.subscribe("t", slow)
    await a.publish("t", b"1")
    await a.publish("t", b"2")
    third = asyncio.create_task(a.publish("t", b"3"))
    await asyncio.sleep(0.05)
    assert not third.done()  # both slots are held by undelivered messages: publish waits
    release.set()
    await asyncio.wait_for(third, 5)
    await eventually(lambda: len(got) == 3, what="all three delivered")
    assert sorted(got) == [b"1", b"2", b"3"]  # waited for, not dropped
    await a.stop()
    await b.stop()


async def test_stop_ends_the_tasks_serving_streams() -> None:
    hub = MemoryHub()
    a, b = await pair(hub)
    never = asyncio.Event()

    async def stall(opener: str, request: bytes, send) -> None:  # type: ignore[no-untyped-def]
        await send(b"first")
        await never.wait()

    b.set_stream_handler("/stall/1", stall)
    frames = a.open_stream(b.peer_id, "/stall/1", b"go", timeout=5)
    assert await anext(frames) == b"first"
    await asyncio.wait_for(b.stop(), 5)  # the serving task is b's: stop cancels it, it does not hang
    with pytest.raises(Exception, match="went away"):
        await anext(frames)
    await a.stop()
