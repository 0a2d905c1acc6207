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
  memory is bounded too. A holder that answers slowly on purpose holds one slot, not many.

Locks are taken in one order only -- a holder's turn, then a slot, then (the caller's) the
engine -- and a slot is given back before the next holder's turn is awaited, so no two
fetches can wait on each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gonka_p2p.gossip.service import NetworkError, NetworkService
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.ledger.records import Inference
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, InferenceRequest
from gonka_p2p.wire.messages import inference_id as inference_id_of  # "inference_id" names ids here
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL
from gonka_p2p.wire.schema import WireError

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30.0
RETRY_AFTER_BLOCKS = 3  # blocks between tries at a holder the network did not reach
EVIDENCE_SLOTS = 8  # requests in flight, or evidence being judged, at once


@dataclass(frozen=True)
class Unreachable:
    """No holder served the evidence, and some could not be reached at all (a network error or
    a timeout, not an answer): maybe withholding, maybe down or cut off for now."""

    holders: tuple[str, ...]


@dataclass(frozen=True)
class Evidence:
    """What a holder served: the client's signed request and the artifact bytes behind the
    ledger's commitment (whether those bytes make sense is judged, not fetched)."""

    request: InferenceRequest
    artifact: bytes


class EvidenceFetcher:
    def __init__(self, service: NetworkService, key: Keypair, height: Callable[[], int],
                 slots: int = EVIDENCE_SLOTS) -> None:
        self._service = service
        self._key = key
        self._height = height  # the newest committed height
        self._slots = asyncio.Semaphore(slots)
        self._turns: dict[str, asyncio.Lock] = {}
        self._queued: Counter[str] = Counter()  # tasks holding or awaiting each holder's turn
        self._unreached_at: dict[str, int] = {}  # holder (a participant) -> height of its last unreached request

    @asynccontextmanager
    async def fetch(self, inference_id: bytes, record: Inference) -> AsyncIterator[Evidence | Unreachable | None]:
        """The evidence, from the executor or else from the TA that relayed (and kept) it,
        held in a slot until the block exits; None when every holder answered without
        evidence that matches; ``Unreachable`` when none served and some did not answer."""
        unreachable: tuple[str, ...] = ()
        evidence = None
        for holder in dict.fromkeys((record.executor, record.ta)):
            served = await self._take_from(holder, inference_id, record)
            if isinstance(served, Evidence):
                evidence = served
                break
            if isinstance(served, Unreachable):
                unreachable += served.holders
        try:
            yield evidence if evidence is not None else Unreachable(unreachable) if unreachable else None
        finally:
            if evidence is not None:
                self._slots.release()

    async def _take_from(self, holder: str, inference_id: bytes, record: Inference
                         ) -> Evidence | Unreachable | None:
        """Ask ``holder`` in its turn; the slot is still taken when this returns Evidence."""
        async with self._turn(holder):
            unreached_at = self._unreached_at.get(holder)
            if unreached_at is not None and self._height() < unreached_at + RETRY_AFTER_BLOCKS:
                return Unreachable((holder,))
            await self._slots.acquire()
            try:
                served = await self._ask(holder, inference_id, record)
            except BaseException:
                self._slots.release()
                raise
            if not isinstance(served, Evidence):
                self._slots.release()
            if isinstance(served, Unreachable):
                self._unreached_at[holder] = self._height()
            else:
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
        ``Unreachable`` when the network did not bring an answer."""
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
            return None
        if (reply.signer_id != holder or inference_id_of(request) != inference_id
                or digest(reply.message.artifact) != record.artifact_commitment):
            return None
        return Evidence(request.message, reply.message.artifact)
