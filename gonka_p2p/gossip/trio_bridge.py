"""A trio event loop in a daemon thread, reachable from an asyncio loop.

py-libp2p only runs under trio, while the application lives on asyncio. This
module owns the one thread where trio runs and the four ways across:

* ``call`` (asyncio -> trio, awaited): run a trio coroutine function in the
  trio nursery and await its result from asyncio. Cancelling the asyncio
  caller cancels the trio task; stopping the thread fails pending calls with
  :class:`NetworkError` instead of leaving them hanging.
* ``pull`` (trio -> asyncio, a stream of items): one trio task reads ahead
  (at most ``window`` items unconsumed) and hands each item over with one
  ``call_soon_threadsafe``, instead of a ``call`` (a trio task, a cancel
  scope, a future and two thread hops) per item: what every frame of a
  response stream used to cost its reader, the TA and the client.
* ``Outbox`` (asyncio -> trio, a stream of items): the asyncio side hands
  items to one trio writer task without waiting for each to be written
  (at most ``window`` unwritten), the writer's error raised at the next
  send: what every frame a stream handler sends used to cost as a ``call``.
* ``call_soon_in_trio`` (any thread -> trio, sync, fire and forget) and
  ``spawn`` (any thread -> trio task): both through the trio token, whose
  ``run_sync_soon`` is the only trio API that is safe to use from another
  thread.
* ``run_in_asyncio`` (trio -> asyncio, awaited): run an asyncio coroutine
  function as an asyncio task and await it from trio; cancelling the trio
  side cancels the asyncio task.
* ``call_soon_in_asyncio`` (trio -> asyncio, sync): ``loop.call_soon_threadsafe``.

Nothing here blocks the asyncio loop: starting and stopping wait on asyncio
futures that the trio thread resolves. Every task spawned into the trio
nursery is wrapped so that an exception is logged (or handed to the caller)
and never tears down the nursery, which would take the whole host with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

import trio

from gonka_p2p.gossip.service import NetworkError

log = logging.getLogger(__name__)

T = TypeVar("T")

PULL_WINDOW = 64  # items a ``pull`` reader may read ahead of its consumer
OUTBOX_WINDOW = 64  # items an ``Outbox`` holds unwritten before its sender waits


def _unwrap(exc: BaseException) -> BaseException:
    """The single error inside trio's (strict) exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _CallHandle:
    """Lets the asyncio side cancel a trio task that may not have started yet."""

    __slots__ = ("cancelled", "scope")

    def __init__(self) -> None:
        self.cancelled = False
        self.scope: trio.CancelScope | None = None

    def cancel(self) -> None:  # runs in the trio thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class _Credit:
    """How many more items a ``pull`` reader may read ahead; used in the trio thread only."""

    __slots__ = ("_left", "_more")

    def __init__(self, window: int) -> None:
        self._left = window
        self._more: trio.Event | None = None

    async def take(self) -> None:
        while self._left == 0:
            self._more = trio.Event()
            await self._more.wait()
        self._left -= 1

    def give(self, n: int) -> None:
        self._left += n
        if self._more is not None:
            self._more.set()


class _Inbox(Generic[T]):
    """Items put in the trio thread, got by one asyncio consumer, in order. A put wakes the
    asyncio loop only when no wake-up is pending already, so every item that arrives before
    the consumer runs again costs one ``call_soon_threadsafe`` between them.

    Why it is safe without a lock (the GIL makes each deque operation atomic): ``_wake``
    clears the flag before the consumer looks at the items again, so an item put after the
    flag was cleared schedules a wake-up of its own, and one put before it is seen."""

    def __init__(self, bridge: TrioThread) -> None:
        self._bridge = bridge
        self._items: deque[T] = deque()
        self._wake_pending = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:  # trio thread
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._bridge.call_soon_in_asyncio(self._wake)

    def _wake(self) -> None:  # asyncio thread
        self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> T:  # asyncio thread
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


class Outbox(Generic[T]):
    """Items sent from asyncio, written in order by one trio task (:meth:`run`, in the
    trio thread). ``send`` returns once the item is queued, so a sender does not wait for
    a write per item; it waits only while ``window`` items are unwritten (the transport's
    flow control reaches it from there). The items queued before the writer runs share
    one wake-up of the trio thread. A write that fails ends the writer: the next ``send``
    raises its error, and what was still queued is dropped (the stream is broken).

    The same lock-free hand-over as :class:`_Inbox`, in both directions: each side clears
    its wake-up flag before it looks at the shared state again."""

    def __init__(self, bridge: TrioThread, window: int = OUTBOX_WINDOW) -> None:
        self._bridge = bridge
        self._window = window
        self._items: deque[T] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self._wake_pending = False  # a wake-up of the writer is scheduled
        self._more: trio.Event | None = None  # the writer waits for items (trio thread)
        self._room: asyncio.Future[None] | None = None  # the sender waits for room (asyncio)

    async def send(self, item: T) -> None:  # asyncio thread
        if self._error is not None:
            raise self._error
        self._items.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._bridge.call_soon_in_trio(self._wake)
        if len(self._items) >= self._window:
            room = self._room  # another sender may wait already: wait with it
            if room is None or room.done():
                room = self._room = asyncio.get_running_loop().create_future()
            if len(self._items) >= self._window and self._error is None:  # the writer may have drained meanwhile
                await room
            self._room = None
            if self._error is not None:
                raise self._error

    def _wake(self) -> None:  # trio thread
        self._wake_pending = False
        if self._more is not None:
            self._more.set()

    def _make_room(self) -> None:  # trio thread
        room = self._room
        if room is not None and (len(self._items) <= self._window // 2 or self._error is not None):
            self._room = None
            self._bridge.call_soon_in_asyncio(_resolve_once, room)

    @property
    def error(self) -> BaseException | None:
        """Why the writer stopped before writing everything, if it did."""
        return self._error

    def close(self) -> None:
        """No more items come (trio thread): :meth:`run` returns once the queued ones are written."""
        self._closed = True
        if self._more is not None:
            self._more.set()

    async def run(self, write: Callable[[T], Awaitable[None]]) -> None:
        """Write the items as they come until :meth:`close`; raise the first write's error."""
        try:
            while True:
                while not self._items:
                    if self._closed:
                        return
                    self._more = trio.Event()
                    await self._more.wait()
                await write(self._items.popleft())
                self._make_room()
        except BaseException as e:
            self._error = e if isinstance(e, Exception) else NetworkError("the stream's writer was cancelled")
            self._make_room()
            raise


class _Mailbox:
    """Calls posted from other threads for one loop, run there in order, with one wake-up
    of that loop for every call posted before it runs them.

    Waking a loop from another thread writes to its wake-up socket: a system call, and the
    largest single cost of a TA's network thread relaying 32 streams at once (py-spy), since
    each stream's frames woke the asyncio loop on their own. ``post`` says whether the caller
    must schedule :meth:`run` (no run pending yet); ``run`` clears that flag before it takes
    the calls, so a call posted after the flag was cleared schedules a run of its own and one
    posted before it is taken by this run -- the hand-over of :class:`_Inbox`, for any number
    of posting threads (two that race may both schedule a run; the second finds nothing)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._run_pending = False

    def post(self, fn: Callable[..., object], args: tuple[Any, ...]) -> bool:  # any thread
        self._calls.append((fn, args))
        if self._run_pending:
            return False
        self._run_pending = True
        return True

    def run(self) -> None:  # the loop's own thread
        self._run_pending = False
        while self._calls:
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:  # one failing call must not stop the others, nor crash trio
                log.exception("%s: %s failed", self._name, getattr(fn, "__qualname__", fn))


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TrioThread:
    """One trio loop in one daemon thread, serving one asyncio loop."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested: trio.Event | None = None
        self._finished: asyncio.Future[None] | None = None
        self._started_ok = False
        self._to_trio = _Mailbox(f"{name} (trio side)")
        self._to_asyncio = _Mailbox(f"{name} (asyncio side)")

    async def start(self, lifespan: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        """Start the thread and enter ``lifespan()`` in it; raise what entering raised.

        The context stays entered until :meth:`stop`; its exit runs before the
        remaining trio tasks are cancelled, so it can shut down gracefully.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        started: asyncio.Future[None] = loop.create_future()
        self._finished = loop.create_future()

        def resolve(fut: asyncio.Future[None], exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        async def trio_main() -> None:
            self._stop_requested = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                async with lifespan():
                    self._token = trio.lowlevel.current_trio_token()
                    self._started_ok = True
                    self.call_soon_in_asyncio(resolve, started, None)
                    await self._stop_requested.wait()
                    self._token = None
                nursery.cancel_scope.cancel()

        def thread_main() -> None:
            error: BaseException | None = None
            try:
                trio.run(trio_main)
            except BaseException as e:  # noqa: BLE001 - handed to start() or logged
                error = _unwrap(e)
            finally:
                self._token = None
                if error is not None and self._started_ok:
                    log.error("%s: trio loop crashed", self._name, exc_info=error)
                self.call_soon_in_asyncio(resolve, started, error or NetworkError("network thread exited"))
                self.call_soon_in_asyncio(resolve, self._finished, None)

        threading.Thread(target=thread_main, name=self._name, daemon=True).start()
        await started

    async def stop(self, timeout: float) -> None:
        """Exit the lifespan, cancel leftover tasks and wait (without blocking) for the thread."""
        token, finished = self._token, self._finished
        if finished is None:
            return
        if token is not None and self._stop_requested is not None:
            try:
                token.run_sync_soon(self._stop_requested.set)
            except trio.RunFinishedError:
                pass
        try:
            await asyncio.wait_for(asyncio.shield(finished), timeout)
        except TimeoutError:
            log.error("%s: trio thread did not stop within %.0f s; abandoning it", self._name, timeout)

    # ---- asyncio -> trio -------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` run as a task in the trio thread (call from asyncio)."""
        token, nursery, loop = self._token, self._nursery, asyncio.get_running_loop()
        if token is None or nursery is None:
            raise NetworkError("the network service is not running")
        fut: asyncio.Future[T] = loop.create_future()
        handle = _CallHandle()

        def resolve(exc: BaseException | None, value: Any) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

        async def runner() -> None:
            if handle.cancelled:
                return
            with trio.CancelScope() as scope:
                handle.scope = scope
                try:
                    value = await fn(*args)
                except trio.Cancelled:
                    self.call_soon_in_asyncio(resolve, NetworkError("the network service stopped"), None)
                    raise
                except Exception as e:  # noqa: BLE001 - re-raised on the asyncio side
                    self.call_soon_in_asyncio(resolve, _unwrap(e), None)
                else:
                    self.call_soon_in_asyncio(resolve, None, value)

        try:
            token.run_sync_soon(nursery.start_soon, runner)
        except trio.RunFinishedError:
            raise NetworkError("the network service is not running") from None
        try:
            return await fut
        except asyncio.CancelledError:
            self.call_soon_in_trio(handle.cancel)
            raise

    async def pull(self, next_item: Callable[[], Awaitable[T | None]],
                   window: int = PULL_WINDOW) -> AsyncIterator[T]:
        """The items of ``next_item()`` (a trio coroutine function) until it returns None, read
        by one trio task that stays at most ``window`` items ahead (call from asyncio).

        An error of ``next_item`` is raised here after the items before it; closing or
        cancelling the iteration cancels the reader. Credit goes back to the reader every
        ``window // 2`` items consumed, and the items that arrive before the consumer runs
        share one wake-up of its loop: a fast stream costs at most one thread hop per item,
        fewer under load, and a slow consumer holds the reader back (and with it the
        transport's flow control)."""
        token, nursery = self._token, self._nursery
        if token is None or nursery is None:
            raise NetworkError("the network service is not running")
        inbox: _Inbox[tuple[T | None, BaseException | None]] = _Inbox(self)
        handle = _CallHandle()
        credit = _Credit(window)

        async def reader() -> None:
            if handle.cancelled:
                return
            with trio.CancelScope() as scope:
                handle.scope = scope
                try:
                    while True:
                        await credit.take()
                        item = await next_item()
                        inbox.put((item, None))
                        if item is None:
                            return
                except trio.Cancelled:
                    inbox.put((None, NetworkError("the network service stopped")))
                    raise
                except Exception as e:  # noqa: BLE001 - re-raised on the asyncio side
                    inbox.put((None, _unwrap(e)))

        try:
            token.run_sync_soon(nursery.start_soon, reader)
        except trio.RunFinishedError:
            raise NetworkError("the network service is not running") from None
        consumed = 0
        try:
            while True:
                item, error = await inbox.get()
                if error is not None:
                    raise error
                if item is None:
                    return
                consumed += 1
                if consumed == max(1, window // 2):
                    self.call_soon_in_trio(credit.give, consumed)
                    consumed = 0
                yield item
        finally:
            self.call_soon_in_trio(handle.cancel)

    def call_soon_in_trio(self, fn: Callable[..., object], *args: Any) -> None:
        """Run sync ``fn(*args)`` in the trio thread soon; a no-op once trio has stopped."""
        token = self._token
        if token is None:
            return
        if self._to_trio.post(fn, args):
            try:
                token.run_sync_soon(self._to_trio.run)
            except trio.RunFinishedError:
                pass

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start ``fn(*args)`` as a trio task from any thread; its exceptions are logged."""
        nursery = self._nursery
        if nursery is None:
            return

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("%s: background task %s failed", self._name, getattr(fn, "__qualname__", fn))

        self.call_soon_in_trio(nursery.start_soon, guarded)

    # ---- trio -> asyncio -------------------------------------------------

    def call_soon_in_asyncio(self, fn: Callable[..., object], *args: Any) -> None:
        """Run sync ``fn(*args)`` on the asyncio loop soon; a no-op once the loop is closed."""
        loop = self._loop
        if loop is None:
            return
        if self._to_asyncio.post(fn, args):
            try:
                loop.call_soon_threadsafe(self._to_asyncio.run)
            except RuntimeError:  # loop closed: nobody is left to tell
                pass

    async def run_in_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` run as an asyncio task (call from trio)."""
        loop, token = self._loop, trio.lowlevel.current_trio_token()
        if loop is None or loop.is_closed():
            raise NetworkError("the asyncio loop is gone")
        done = trio.Event()
        tasks: list[asyncio.Task[T]] = []

        def finish(_: asyncio.Task[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        def start() -> None:
            task = loop.create_task(fn(*args))
            tasks.append(task)
            task.add_done_callback(finish)

        def cancel() -> None:
            if tasks:
                tasks[0].cancel()

        self.call_soon_in_asyncio(start)
        try:
            await done.wait()
        except trio.Cancelled:
            self.call_soon_in_asyncio(cancel)
            raise
        task = tasks[0]
        if task.cancelled():
            raise NetworkError("the asyncio side was cancelled")
        exc = task.exception()
        if exc is not None:
            raise exc
        return task.result()
