"""Structured concurrency for a node's actors: one TaskGroup owns every long-lived task.

Theory of operation
-------------------
Each actor with work of its own exposes one coroutine (``run``) that owns
its tasks -- in a TaskGroup of its own when it has several -- so an error
anywhere in an actor surfaces as the failure of that coroutine. The
:class:`Supervisor` runs these coroutines in one TaskGroup under
``Node.serve`` and decides, per actor, what a crash means:

* **critical** (the ledger replica, the HTTP gateway): the crash is recorded
  and re-raised; the TaskGroup cancels every other actor and ``Node.serve``
  raises it. A replica that failed mid-block may hold state it must not
  build on, and a gateway whose server died serves no one: the process
  must stop and say why, not limp on.
* **restarted** (the announcer, the validator, the transaction follower):
  the crash is recorded, logged with its traceback, and the actor runs
  again after ``restart_delay_s``. Their work is derived from committed
  state and their own memory, so a fresh ``run`` resumes it; meanwhile the
  ledger replica and the serving path keep running.

Either way a crash is never silent: it lands in :attr:`Supervisor.crashes`
(bounded, newest last), which tests and operators read, as well as the log.
Cancellation is not a crash: ``stop`` ends every actor, those with a
graceful ``stop`` of their own through it, the others by cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
CRASHES_KEPT = 100


@dataclass(frozen=True)
class Supervised:
    """One actor's long-lived coroutine and what its crash means."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    critical: bool
    stop: Callable[[], None] | None = None  # a graceful stop (run returns soon); else cancelled


@dataclass(frozen=True)
class Crash:
    actor: str
    error: Exception
    at: float  # wall clock, seconds
    restarted: bool


class Supervisor:
    """Runs a node's actors until asked to stop; records every crash."""

    def __init__(self, restart_delay_s: float = RESTART_DELAY_S, kept: int = CRASHES_KEPT) -> None:
        self.restart_delay_s = restart_delay_s
        self.crashes: deque[Crash] = deque(maxlen=kept)

    async def run(self, actors: Iterable[Supervised], stop: asyncio.Event) -> None:
        """Run ``actors`` until ``stop`` is set; raises what a critical actor raised."""
        async with asyncio.TaskGroup() as tasks:
            running = [(actor, tasks.create_task(self._supervise(actor), name=actor.name))
                       for actor in actors]
            await stop.wait()
            for actor, task in running:
                if actor.stop is not None:
                    actor.stop()
                else:
                    task.cancel()

    async def _supervise(self, actor: Supervised) -> None:
        while True:
            try:
                await actor.run()
                return
            except Exception as e:
                self.crashes.append(Crash(actor.name, e, time.time(), restarted=not actor.critical))
                if actor.critical:
                    log.error("%s crashed; stopping the node", actor.name, exc_info=e)
                    raise
                log.error("%s crashed; restarting it in %.1f s", actor.name, self.restart_delay_s,
                          exc_info=e)
            await asyncio.sleep(self.restart_delay_s)
