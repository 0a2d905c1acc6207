"""Who owns a network service's tasks: one TaskGroup, from ``start`` to ``stop``.

Both services (py-libp2p and in-memory) start tasks of their own on the
asyncio side: a worker per gossip topic, a task per in-memory delivery or
served stream. None of them may be fire-and-forget. A service opens one
:class:`TaskOwner` when it starts; the owner's supervisor task enters an
asyncio TaskGroup and holds it until the service stops, and every such task
is created in that group.

A task that raises (none should: a gossip handler's error is logged and
its message dropped, a stream handler's resets its stream; what is left is
a bug of the service's own) ends the group, as structured concurrency
wants: its siblings are cancelled, the crash is logged once, the service's
teardown runs (the service stops rather than running on deaf), and
:meth:`TaskOwner.wait_closed` raises :class:`ServiceCrashed` to whoever
owns the service -- a node's supervisor awaits it beside its actors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gonka_p2p.gossip.service import ServiceCrashed

log = logging.getLogger(__name__)


class TaskOwner:
    """A TaskGroup held by a supervisor task until :meth:`close`, or until a task in it crashes.

    Opening needs no await point (the in-memory service's ``start`` keeps
    the interleavings simulations replay); :meth:`group` waits out the
    moment before the supervisor first runs.
    """

    def __init__(self, name: str, teardown: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.crash: Exception | None = None
        self._teardown = teardown
        self._group: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()  # set when the group is open, and again when it closed
        self.closed = False
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name=f"{name} tasks")

    async def _supervise(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._ready.set()
                await asyncio.get_running_loop().create_future()  # until close() cancels us
        except Exception as e:  # noqa: BLE001 - the group's crash, kept for wait_closed
            self.crash = e
            log.error("%s crashed: a task it owns raised", self.name, exc_info=e)
        finally:
            await self._close_group()

    async def _close_group(self) -> None:
        self._group, self.closed = None, True
        self._ready.set()
        await self._teardown()

    async def group(self) -> asyncio.TaskGroup | None:
        """The open TaskGroup, or None once it closed (stopped or crashed)."""
        if not self.closed:
            await self._ready.wait()
        return self._group

    @property
    def open_group(self) -> asyncio.TaskGroup | None:
        """The group if it is open right now, without waiting."""
        return self._group

    async def close(self) -> None:
        """Cancel every owned task and run the teardown; idempotent."""
        if not self.closed:  # after a crash the teardown is under way: wait for it, do not cut it short
            self._supervisor.cancel()
        await asyncio.wait([self._supervisor])
        if not self.closed:  # cancelled before it first ran: nothing owned, but tear down
            await self._close_group()

    async def wait_closed(self) -> None:
        """Return once closed; raise ServiceCrashed (from the crash) if a task crashed it."""
        await asyncio.wait([self._supervisor])
        if self.crash is not None:
            raise ServiceCrashed(f"{self.name} crashed: {self.crash!r}") from self.crash
