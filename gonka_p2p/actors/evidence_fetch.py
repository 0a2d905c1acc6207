"""Fetching an inference's evidence -- the client's signed request and the committed artifact
-- from the peers that hold it, for the validator.

The holders are counterparties, and a lying executor chooses how it answers. One that never
answers costs a request its whole timeout. Asked once per duty, in turn, a silent executor
with many inferences would hold a validator's checks for minutes at every retry, and its
honest duties could miss their deadline (a skipped duty forfeits the validator's epoch
reward). So:

* a holder is asked one request at a time; the other duties it holds queue behind that
  request without taking a slot (below);
* a holder the network did not reach is not asked again for ``RETRY_AFTER_BLOCKS``: every
  duty it holds is :class:`Unreachable` until then, at once;
* requests to different holders run side by side, at most ``EVIDENCE_SLOTS`` at a time, and
  a slot stays taken while the evidence it brought is judged, so the evidence held in
  memory is bounded too. A holder that answers slowly on purpose holds one slot, not many;
* the TA is not left waiting behind a silent executor (a hedged request): it is asked as
  soon as the executor has answered without evidence, or has kept silent for
  ``HEDGE_AFTER_S``, and at once when the executor's last request went unanswered or the
  fetch starts within ``ASK_ALL_BEFORE_BLOCKS`` of its cutoff. The first evidence wins;
* a fetch gives up at a height its caller names (``give_up_at``), unless it started there
  (then nobody was asked long enough to be judged silent): a request's timeout is
  seconds, a check's deadline is blocks, and at fast blocks one timeout outlasts the whole
  margin in which silence is judged withheld. Without it the last request to a silent
  executor and its partner TA would end after the deadline: no accusation, and a skipped
  duty for the validator. (A cutoff without the hedge made honest executors look like
  withholders: testnet run 13 cut requests to a partitioned executor while the TA that
  held the evidence had not been asked.)
* silence is evidence against a holder only where this node's own links were sound: once its
  replica fell behind the chain (:meth:`EvidenceFetcher.note_impaired`: a link outage, a
  freeze, a restart), its asks say nothing about holders until ``RECOVERY_S`` later, and an
  :class:`Unreachable` any of whose asks started before then is not ``witnessed``. (Testnet
  runs 24, 25: a participant whose link was capped for 90 s failed to reach the holders of
  honest evidence over connections that stayed stalled after the cap, and accused them.)

Locks are taken in one order only -- a holder's turn, then a slot, then (the caller's) the
engine -- and a slot is given back before the next holder's turn is awaited, so no two
fetches can wait on each other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gonka_p2p.actors.artifact_server import FORBIDDEN
from gonka_p2p.gossip.service import NetworkError, NetworkService
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.ledger.records import Inference
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, InferenceFailed, InferenceRequest
from gonka_p2p.wire.messages import inference_id as inference_id_of  # "inference_id" names ids here
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL
from gonka_p2p.wire.schema import WireError

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30.0
RETRY_AFTER_BLOCKS = 3  # blocks between tries at a holder the network did not reach
EVIDENCE_SLOTS = 8  # requests in flight, or evidence being judged, at once
HEDGE_AFTER_S = 3.0  # executor silence after which the TA is asked too
ASK_ALL_BEFORE_BLOCKS = 10  # a fetch starting this close to its cutoff asks every holder at once
# After this node fell behind the chain, how long its failed asks say nothing about holders: a TCP
# connection stalled through the outage ends within TCP_USER_TIMEOUT_S (gossip/libp2p_patches.py),
# then a fresh one is dialed.
RECOVERY_S = 30.0


@dataclass(frozen=True)
class Unreachable:
    """No holder served the evidence, and some could not be reached at all (a network error or
    a timeout, not an answer): maybe withholding, maybe down or cut off for now. ``witnessed``:
    every ask behind it started while this node's own links were trusted (module docstring);
    only then may the silence be judged withholding."""

    holders: tuple[str, ...]
    witnessed: bool = field(default=True, compare=False)


class HeightWatch:
    """The newest committed height, and a wait for a height to commit."""

    def __init__(self) -> None:
        self.height = -1
        self._next = asyncio.Event()

    def advance(self, height: int) -> None:
        self.height = height
        self._next.set()
        self._next = asyncio.Event()

    async def reach(self, height: int) -> None:
        while self.height < height:
            await self._next.wait()


@dataclass(frozen=True)
class Evidence:
    """What a holder served: the client's signed request and the artifact bytes behind the
    ledger's commitment (whether those bytes make sense is judged, not fetched)."""

    request: InferenceRequest
    artifact: bytes


class EvidenceFetcher:
    def __init__(self, service: NetworkService, key: Keypair, heights: HeightWatch,
                 slots: int = EVIDENCE_SLOTS, hedge_after_s: float = HEDGE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self._key = key
        self._heights = heights
        self._slots = asyncio.Semaphore(slots)
        self._hedge_after_s = hedge_after_s
        self._clock = clock
        self._trusted_from = -math.inf  # asks started from then on witness a holder's silence
        self._turns: dict[str, asyncio.Lock] = {}
        self._queued: Counter[str] = Counter()  # tasks holding or awaiting each holder's turn
        # holder (a participant) -> height of its last unreached request, and when that request started
        self._unreached_at: dict[str, tuple[int, float]] = {}

    def note_impaired(self) -> None:
        """This node's own links just failed it (its replica fell behind the chain): silence heard
        until ``RECOVERY_S`` from now says nothing about the holders (module docstring)."""
        self._trusted_from = self._clock() + RECOVERY_S

    def _witnessed(self, asked_at: float) -> bool:
        return asked_at >= self._trusted_from

    @asynccontextmanager
    async def fetch(self, inference_id: bytes, record: Inference, give_up_at: int | None = None
                    ) -> AsyncIterator[Evidence | Unreachable | None]:
        """The evidence, from the executor or from the TA that relayed (and kept) it, held in a
        slot until the block exits; None when every holder answered without evidence that
        matches; ``Unreachable`` when none served and some did not answer, or had not by the
        time ``give_up_at`` committed."""
        holders = tuple(dict.fromkeys((record.executor, record.ta)))
        started = self._clock()
        served, silent = await self._first_served(holders, inference_id, record, give_up_at)
        evidence = next((s for s in served if isinstance(s, Evidence)), None)
        for extra in served:  # two holders served in the same instant: keep one slot
            if isinstance(extra, Evidence) and extra is not evidence:
                self._slots.release()
        unreached = [s for s in served if isinstance(s, Unreachable)]
        unreachable = tuple(h for s in unreached for h in s.holders) + silent
        witnessed = all(s.witnessed for s in unreached) and (not silent or self._witnessed(started))
        try:
            yield evidence if evidence is not None else Unreachable(unreachable, witnessed) if unreachable else None
        finally:
            if evidence is not None:
                self._slots.release()

    async def _first_served(self, holders: tuple[str, ...], inference_id: bytes, record: Inference,
                            give_up_at: int | None) -> tuple[list[Evidence | Unreachable | None], tuple[str, ...]]:
        """Ask ``holders`` in order, the next one once all asked so far have answered without
        evidence or the hedge is due, until the first evidence, the last answer or the cutoff.
        Returns what the finished requests served, and the holders cut off or never asked."""
        queue = list(holders)
        asks: dict[asyncio.Task[Evidence | Unreachable | None], str] = {}
        hedge_due = self._ask_all_at_once(holders[0], give_up_at)
        async with asyncio.TaskGroup() as tasks:
            cutoff = (tasks.create_task(self._heights.reach(give_up_at))  # not one that has passed: no
                      if give_up_at is not None and self._heights.height < give_up_at else None)  # accusing unasked
            while not any(a.done() and isinstance(a.result(), Evidence) for a in asks):
                running = {a for a in asks if not a.done()}
                if queue and (hedge_due or not running):
                    holder = queue.pop(0)
                    asks[tasks.create_task(self._take_from(holder, inference_id, record))] = holder
                    continue
                if not running:
                    break
                done, _ = await asyncio.wait(running | ({cutoff} if cutoff else set()),
                                             timeout=self._hedge_after_s if queue else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if cutoff in done:
                    log.info("evidence of %s: no answer by height %d", inference_id.hex()[:12], give_up_at)
                    break
                hedge_due = not done
            for task in (*asks, cutoff):
                if task is not None:
                    task.cancel()
        served = [a.result() for a in asks if not a.cancelled()]
        return served, tuple(h for a, h in asks.items() if a.cancelled()) + tuple(queue)

    def _ask_all_at_once(self, first: str, give_up_at: int | None) -> bool:
        """No time to wait on the first holder: its last request went unanswered, or the cutoff
        is too close for a hedge measured in seconds."""
        return first in self._unreached_at or (
            give_up_at is not None and self._heights.height >= give_up_at - ASK_ALL_BEFORE_BLOCKS)

    async def _take_from(self, holder: str, inference_id: bytes, record: Inference
                         ) -> Evidence | Unreachable | None:
        """Ask ``holder`` in its turn; the slot is still taken when this returns Evidence."""
        async with self._turn(holder):
            unreached = self._unreached_at.get(holder)
            if unreached is not None and self._heights.height < unreached[0] + RETRY_AFTER_BLOCKS:
                return Unreachable((holder,), self._witnessed(unreached[1]))
            await self._slots.acquire()
            asked_at = self._clock()
            try:
                served = await self._ask(holder, inference_id, record)
            except BaseException:
                self._slots.release()
                raise
            if not isinstance(served, Evidence):
                self._slots.release()
            if isinstance(served, Unreachable):
                self._unreached_at[holder] = (self._heights.height, asked_at)
                return Unreachable(served.holders, self._witnessed(asked_at))
            self._unreached_at.pop(holder, None)
            return served

    @asynccontextmanager
    async def _turn(self, holder: str) -> AsyncIterator[None]:
        """One request at a time per holder; its lock lives while some task wants it."""
        lock = self._turns.setdefault(holder, asyncio.Lock())
        self._queued[holder] += 1
        try:
            async with lock:
                yield
        finally:
            self._queued[holder] -= 1
            if not self._queued[holder]:
                del self._queued[holder], self._turns[holder]

    async def _ask(self, holder: str, inference_id: bytes, record: Inference) -> Evidence | Unreachable | None:
        """What ``holder`` served, None when it answered without matching evidence, or
        ``Unreachable`` when the network did not bring an answer -- or the holder refused this
        node as a reader: its replica may not know it as a validator yet (``artifact_server``),
        so it is asked again, and judged withheld only as a silent one is, near the deadline."""
        query = seal(ArtifactQuery(inference_id=inference_id), self._key)
        try:
            frame = await self._service.request(holder, ARTIFACT_PROTOCOL, query, timeout=FETCH_TIMEOUT_S)
        except (NetworkError, TimeoutError) as e:
            log.info("artifact of %s: %s not reached: %s", inference_id.hex()[:12], holder, e)
            return Unreachable((holder,))
        try:
            reply = open_envelope(frame, ArtifactReply)
            request = open_envelope(reply.message.request, InferenceRequest)
        except WireError as e:
            log.info("artifact of %s not served by %s: %s", inference_id.hex()[:12], holder, e)
            return Unreachable((holder,)) if _refused(frame) else None
        if (reply.signer_id != holder or inference_id_of(request) != inference_id
                or digest(reply.message.artifact) != record.artifact_commitment):
            return None
        return Evidence(request.message, reply.message.artifact)


def _refused(frame: bytes) -> bool:
    """Is ``frame`` a holder's refusal to serve this node (``artifact_server.FORBIDDEN``)?"""
    try:
        return open_envelope(frame, InferenceFailed).message.code == FORBIDDEN
    except WireError:
        return False
