"""``TrioThread.pull`` and ``Outbox``: one trio task per stream direction instead of a trio
call per frame.

What a response stream's reader relies on: every item in order, then the end; an error
after the items before it; a reader that never runs more than ``window`` items ahead of
its consumer (a peer that floods frames is held back by the transport's flow control, not
buffered here without bound); closing or cancelling the iteration cancels the reader. What a
stream handler's sends rely on: every item written in order before the writer returns, a
sender held back while a window of items is unwritten (a peer that reads nothing cannot make
a handler buffer without bound), and a failed write raised at the next send."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress

import pytest
import trio

from gonka_p2p.gossip.service import NetworkError
from gonka_p2p.gossip.trio_bridge import Outbox, TrioThread


@asynccontextmanager
async def no_lifespan() -> AsyncIterator[None]:
    yield


@pytest.fixture
async def bridge() -> AsyncIterator[TrioThread]:
    thread = TrioThread("test-trio")
    await thread.start(no_lifespan)
    yield thread
    await thread.stop(5.0)


class Source:
    """Items 0, 1, ... read in the trio thread; ``end`` items then None, or ``fail`` at an index."""

    def __init__(self, end: int | None = None, fail: int | None = None) -> None:
        self.end, self.fail = end, fail
        self.read = 0
        self.cancelled = False

    async def next(self) -> int | None:
        try:
            await trio.sleep(0)
        except trio.Cancelled:
            self.cancelled = True
            raise
        if self.read == self.fail:
            raise ValueError(f"broken at {self.read}")
        if self.read == self.end:
            return None
        self.read += 1
        return self.read - 1


async def test_every_item_in_order_then_the_end(bridge: TrioThread) -> None:
    source = Source(end=500)
    assert [x async for x in bridge.pull(source.next, window=8)] == list(range(500))


async def test_an_error_comes_after_the_items_before_it(bridge: TrioThread) -> None:
    source, seen = Source(fail=3), []
    with pytest.raises(ValueError, match="broken at 3"):
        async for x in bridge.pull(source.next):
            seen.append(x)
    assert seen == [0, 1, 2]


async def test_a_flood_is_read_at_most_a_window_ahead_of_the_consumer(bridge: TrioThread) -> None:
    source = Source()  # never ends: a peer sending frames as fast as it can
    async with aclosing(bridge.pull(source.next, window=16)) as items:
        assert await anext(items) == 0
        await asyncio.sleep(0.3)  # the consumer is busy; the reader must stop
        assert source.read <= 16
        for _ in range(100):
            await anext(items)
        await asyncio.sleep(0.3)
        assert source.read <= 101 + 16


async def test_closing_the_iteration_cancels_the_reader(bridge: TrioThread) -> None:
    source = Source()
    async with aclosing(bridge.pull(source.next, window=4)) as items:
        await anext(items)
        await asyncio.sleep(0.1)  # the reader waits for credit, or reads
    for _ in range(50):
        if source.cancelled:
            break
        await asyncio.sleep(0.02)
    read = source.read
    await asyncio.sleep(0.1)
    assert source.read == read  # nothing is read once the consumer is gone


async def test_pull_on_a_stopped_bridge_fails_cleanly() -> None:
    thread = TrioThread("stopped")
    with pytest.raises(NetworkError):
        await anext(thread.pull(Source().next))


class Sink:
    """A trio-side writer: records items, optionally blocks until released or fails at an index."""

    def __init__(self, fail: int | None = None) -> None:
        self.written: list[int] = []
        self.fail = fail
        self.gate: trio.Event | None = None

    async def write(self, item: int) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if len(self.written) == self.fail:
            raise NetworkError(f"write {len(self.written)} failed")
        self.written.append(item)


async def run_outbox(bridge: TrioThread, outbox: Outbox[int], sink: Sink) -> asyncio.Future[None]:
    """Start ``outbox.run(sink.write)`` in the trio thread; the future ends with it."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def writer() -> None:
        with suppress(NetworkError):
            await outbox.run(sink.write)
        bridge.call_soon_in_asyncio(done.set_result, None)

    bridge.spawn(writer)
    return done


async def test_an_outbox_writes_every_item_in_order_before_its_writer_returns(bridge: TrioThread) -> None:
    outbox: Outbox[int] = Outbox(bridge, window=8)
    sink = Sink()
    done = await run_outbox(bridge, outbox, sink)
    for i in range(300):
        await outbox.send(i)
    bridge.call_soon_in_trio(outbox.close)
    await asyncio.wait_for(done, 5)
    assert sink.written == list(range(300)) and outbox.error is None


async def test_a_sender_waits_while_a_window_of_items_is_unwritten(bridge: TrioThread) -> None:
    outbox: Outbox[int] = Outbox(bridge, window=4)
    sink = Sink()
    sink.gate = trio.Event()  # a peer that reads nothing: the transport blocks the writer
    done = await run_outbox(bridge, outbox, sink)
    sent = 0

    async def sender() -> None:
        nonlocal sent
        for i in range(100):
            await outbox.send(i)
            sent += 1

    task = asyncio.create_task(sender())
    await asyncio.sleep(0.3)
    assert sent <= 4  # held back, not buffered without bound
    bridge.call_soon_in_trio(sink.gate.set)
    await asyncio.wait_for(task, 5)
    bridge.call_soon_in_trio(outbox.close)
    await asyncio.wait_for(done, 5)
    assert sink.written == list(range(100))


async def test_a_failed_write_is_raised_at_the_next_send(bridge: TrioThread) -> None:
    outbox: Outbox[int] = Outbox(bridge, window=4)
    sink = Sink(fail=2)
    done = await run_outbox(bridge, outbox, sink)
    with pytest.raises(NetworkError, match="write 2 failed"):
        for i in range(100):
            await outbox.send(i)
            await asyncio.sleep(0.01)
    await asyncio.wait_for(done, 5)
    assert sink.written == [0, 1] and isinstance(outbox.error, NetworkError)


async def test_calls_posted_together_wake_the_other_loop_once_and_run_in_order(bridge: TrioThread) -> None:
    """Every wake-up of a loop from another thread is a write to its wake-up socket: 32 relayed
    streams used to pay one per frame. Calls posted before the loop runs them share one."""
    loop = asyncio.get_running_loop()
    wakeups = 0
    real_call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args: object) -> object:
        nonlocal wakeups
        wakeups += 1
        return real_call_soon_threadsafe(*args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    ran: list[int] = []
    done = asyncio.Event()

    def fail() -> None:
        raise RuntimeError("one broken call")

    posted = threading.Event()

    def post_all() -> None:  # trio side, while the asyncio loop is held: nothing drains meanwhile
        for i in range(500):
            bridge.call_soon_in_asyncio(ran.append, i)
            if i == 250:
                bridge.call_soon_in_asyncio(fail)
        bridge.call_soon_in_asyncio(done.set)
        posted.set()

    try:
        bridge.call_soon_in_trio(post_all)
        assert posted.wait(5)  # blocks this loop on purpose (fresh clone #18: a loop left running
        # drained the queue while trio still posted, and took 80 wake-ups)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        loop.call_soon_threadsafe = real_call_soon_threadsafe  # type: ignore[method-assign]
    assert ran == list(range(500))  # in order, the failing call in the middle skipped
    assert wakeups == 1  # the first post's; the 501 after it found the loop already told (was 503)
