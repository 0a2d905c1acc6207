"""What the replica's collaborators share while it runs: the driver's event queue and the task owner.

Network handlers, timers and background tasks never call the consensus core:
they post an *event* here for the one driver task (``driver.py``). Every
background task is started through :meth:`Runtime.spawn` into the TaskGroup
that ``Replica.run`` opens, so a task that crashes ends ``run`` with its
error instead of being logged and lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gonka_p2p.ledger.consensus_types import Action

MAX_QUEUED_NETWORK_EVENTS = 1024

Event = Callable[[], list[Action]]  # a call into the consensus core, run by the driver
Publish = Callable[[str, bytes], Awaitable[None]]  # (topic, frame): publish on gossip


class Runtime:
    """What the replica's collaborators share while it runs: the driver's event queue, and the TaskGroup
    (opened by ``Replica.run``) that owns every background task, so that a crash reaches ``run``."""

    def __init__(self) -> None:
        self.running = False
        self._tasks: asyncio.TaskGroup | None = None
        self._events: asyncio.Queue[tuple[Event, bool]] = asyncio.Queue()
        self._network_slots = asyncio.Semaphore(MAX_QUEUED_NETWORK_EVENTS)

    def own(self, tasks: asyncio.TaskGroup | None) -> None:
        self._tasks = tasks

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Start ``coro`` in the replica's TaskGroup; not started (None) unless the replica runs."""
        if self._tasks is None:
            coro.close()
            return None
        return self._tasks.create_task(coro)

    def post(self, event: Event) -> None:
        if self.running:
            self._events.put_nowait((event, False))

    async def post_network(self, event: Event) -> None:
        """Post an event from a network handler, waiting while too many are queued."""
        await self._network_slots.acquire()
        if not self.running:
            self._network_slots.release()
            return
        self._events.put_nowait((event, True))

    async def next_event(self) -> tuple[Event, bool]:
        return await self._events.get()

    def event_done(self, from_network: bool) -> None:
        if from_network:
            self._network_slots.release()
