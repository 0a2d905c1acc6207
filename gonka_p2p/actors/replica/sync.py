"""Catch-up: decided blocks and their certificates, fetched from peers and served to them.

**At start-up**, after recovering from its store (``chain.py``) and once
validators holding more than 2/3 of the power are connected (a replica
that voted alone would only run its rounds ahead of everybody else's), the
replica asks its peers for the blocks after its height
(``/gonka/ledger/sync/1``) and applies each only after :func:`~gonka_p2p.ledger.commit_checks.verify_commit`
accepts its certificate against the validator set of that height.

**While running**, the core's ``RequestCommit`` (it saw a message from a
later height) fetches a batch the same way, and feeds each record to the
core through ``on_commit_certificate``, which checks it; one sync task at a
time, in the replica's TaskGroup.

A peer's reply is untrusted, and the peer that triggered the request (the
preferred one) may be byzantine. So a reply ends at ``sync_batch`` records
and ``request_timeout_s`` however the peer trickles them; a reply whose
first record (the height after ours, whose validators we know) does not
verify is thrown away and the next peer asked; a record the core refuses is
dropped, so the next request fetches again instead of re-offering it; and
the driver treats a height as decided (starts it at once, skips proposing
in it) only once its record verifies (``holds``). Otherwise one bad reply
would stall a lagging replica for good.

Memory: fetched records wait in ``_fetched`` only until their height
commits (``forget_below``), and the sync task fetches the next batch only
once the last one is committed, so at most ``sync_batch`` are held.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from contextlib import aclosing

from gonka_p2p.gossip.service import NetworkError, NetworkService, SendFrame
from gonka_p2p.identity import digest
from gonka_p2p.ledger.commit_checks import verify_commit
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import Action, CommitCertificate, InvalidCommit, RequestCommit, ValidatorSet
from gonka_p2p.ledger.consensus_wire import (
    CommitRecord,
    SyncRequest,
    certificate_from_wire,
    certificate_to_wire,
)
from gonka_p2p.ledger.block import decode_block
from gonka_p2p.wire.protocols import SYNC_PROTOCOL
from gonka_p2p.wire.schema import WireError

from gonka_p2p.actors.replica.chain import Chain
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.runtime import Runtime
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

log = logging.getLogger(__name__)

# Decided heights a replica fetched at once that mean it had fallen behind the chain (its links
# failed it, or it was frozen or down), not that one vote outran a block: its listeners are told.
LAGGING_HEIGHTS = 5
QUORUM_POLL_S = 0.2  # how often a starting replica checks whether enough validators are connected


class Sync:
    """Fetches decided heights for a replica that is behind, and serves its own to others."""

    def __init__(self, peer_id: str, service: NetworkService, core: ConsensusState, runtime: Runtime,
                 chain: Chain, params: ReplicaParams, metrics: ReplicaMetrics,
                 lagged: Callable[[int], None] = lambda heights: None) -> None:
        self._peer_id = peer_id
        self._lagged = lagged
        self._service = service
        self._core = core
        self._runtime = runtime
        self._chain = chain
        self._params = params
        self._metrics = metrics
        self._fetched: dict[int, tuple[bytes, CommitCertificate]] = {}  # decided heights, not yet committed
        self._proven: set[int] = set()  # heights in _fetched whose certificate verified
        self._sync_task: asyncio.Task[None] | None = None

    def holds(self, height: int) -> bool:
        """Whether a fetched record of ``height`` whose certificate verifies waits for the core.

        Asked for the next height to commit, whose validators we know: a
        record that does not verify is dropped here, so that the driver
        neither starts the height for it nor skips proposing in it.
        """
        record = self._fetched.get(height)
        if record is None or height != self._chain.state.height + 1:
            return False
        if height not in self._proven:
            if not self._proves(self._chain.validators, height, *record):
                del self._fetched[height]
                return False
            self._proven.add(height)
        return True

    def forget_below(self, height: int) -> None:
        self._fetched = {h: r for h, r in self._fetched.items() if h >= height}
        self._proven = {h for h in self._proven if h >= height}

    async def await_quorum(self) -> None:
        """Wait until validators holding > 2/3 of the power (ourselves included) are connected.

        Alone, or with too few of the validators, a replica could only time
        out round after round; its rounds would run ahead of the others',
        and since no f+1 of the power is ever in a later round than its own,
        it would not rejoin them until their (shorter) timeouts caught up.
        Starting together avoids that, and gives catch-up peers to ask.
        """
        announced = False
        while True:
            connected = {*self._service.connected_peers(), self._peer_id}
            validators = self._chain.validators
            if validators.is_quorum(sum(v.power for v in validators.validators if v.address in connected)):
                return
            if not announced:
                log.info("replica %s waits for validators holding > 2/3 of the power to connect",
                         self._peer_id[-8:])
                announced = True
            await asyncio.sleep(QUORUM_POLL_S)

    async def catch_up(self) -> None:
        """Before voting: fetch, verify and apply every block the peers have beyond ours."""
        fetched = 0
        while records := await self._fetch_records(self._chain.state.height + 1, None):
            fetched = self._note_lag(fetched, records)
            for height, raw, certificate in records:
                try:
                    self._verify(self._chain.validators, height, raw, certificate)
                    block = decode_block(raw)
                except (InvalidCommit, WireError) as e:
                    log.warning("catch-up stopped at height %d: a peer sent a bad record (%s)", height, e)
                    return
                await self._chain.commit_block(height, raw, block, certificate)
                self._metrics.catchup_blocks += 1

    def request_commit(self, request: RequestCommit) -> None:
        """The core is behind: hand it a fetched certificate, or fetch some (one sync task at a time)."""
        if request.height in self._fetched:
            self._runtime.post(self.offer)
        elif self._sync_task is None or self._sync_task.done():
            self._sync_task = self._runtime.spawn(self._sync(request.peer))

    def offer(self) -> list[Action]:
        """The event that hands the core the fetched certificate of its height, if there is one.

        The record is handed over once: if the core refuses it (its
        certificate does not verify), the next ``RequestCommit`` fetches anew.
        """
        height = self._core.height
        record = self._fetched.pop(height, None)
        self._proven.discard(height)
        return self._core.on_commit_certificate(*record) if record is not None else []

    async def _sync(self, peer: str) -> None:
        """Fetch the decided heights after our last for the core, batch after batch while we lag."""
        fetched = 0
        while records := await self._fetch_records(self._chain.state.height + 1, peer):
            fetched = self._note_lag(fetched, records)
            for h, raw, certificate in records:
                self._fetched[h] = (raw, certificate)
            self._proven.add(records[0][0])  # _fetch_records verified it
            self._runtime.post(self.offer)
            if len(records) < self._params.sync_batch:
                return
            try:
                await self._chain.wait_for_height(records[-1][0], self._params.request_timeout_s)
            except TimeoutError:
                return  # a record did not verify; the core will ask again

    def _note_lag(self, fetched: int, records: list[tuple[int, bytes, CommitCertificate]]) -> int:
        """Heights fetched so far in one catch-up, ``records`` included; past ``LAGGING_HEIGHTS``
        the listeners hear of it at every batch, before its heights are applied. Only proven
        heights count: a peer padding its reply to one height we lacked with made-up records
        would otherwise make this node distrust its own links (its validator accusing no one
        for ``evidence_fetch.RECOVERY_S``). So the record that reaches ``LAGGING_HEIGHTS`` must
        verify (the first of each reply did, and later batches follow committed ones)."""
        total = fetched + len(records)
        if total >= LAGGING_HEIGHTS and (
                fetched >= LAGGING_HEIGHTS
                or self._proves(self._chain.validators, *records[LAGGING_HEIGHTS - fetched - 1])):
            self._lagged(total)
        return total

    async def _fetch_records(self, height: int, preferred: str | None
                             ) -> list[tuple[int, bytes, CommitCertificate]]:
        """Consecutive (height, block, certificate) from ``height`` (the height after our last) on,
        from the first peer whose first record verifies: at most ``sync_batch`` of them, each peer
        given ``request_timeout_s`` for its whole reply (module docstring)."""
        validators = self._chain.validators  # of ``height``, read with it before any await
        others = [p for p in self._service.connected_peers() if p not in (preferred, self._peer_id)]
        random.shuffle(others)
        limit = self._params.sync_batch
        request = encode_frame(SyncRequest(from_height=height, max_count=limit))
        for peer in ([preferred] if preferred else []) + others:
            records: list[tuple[int, bytes, CommitCertificate]] = []
            try:
                async with asyncio.timeout(self._params.request_timeout_s):
                    frames = self._service.open_stream(peer, SYNC_PROTOCOL, request, self._params.request_timeout_s)
                    async with aclosing(frames):  # type: ignore[type-var]
                        async for frame in frames:  # leaving early resets the stream
                            record = decode_frame(frame, CommitRecord)
                            if record.height != height + len(records):
                                break
                            records.append((record.height, record.block,
                                            certificate_from_wire(record.certificate)))
                            if len(records) == limit:
                                break
            except (NetworkError, TimeoutError, WireError) as e:
                log.debug("sync from %s failed: %r", peer, e)
            if records and self._proves(validators, *records[0]):
                return records
            if records:
                log.info("sync from %s: its record of height %d does not verify", peer[-8:], height)
        return []

    def _verify(self, validators: ValidatorSet, height: int, raw: bytes, certificate: CommitCertificate) -> None:
        """Raise :class:`InvalidCommit` unless ``certificate`` proves ``raw`` decided at ``height``."""
        verify_commit(validators, height, digest(raw), certificate, self._chain.signatures.verify, chain_id=self._chain.chain_id)

    def _proves(self, validators: ValidatorSet, height: int, raw: bytes, certificate: CommitCertificate) -> bool:
        try:
            self._verify(validators, height, raw, certificate)
        except InvalidCommit:
            return False
        return True

    async def serve(self, opener: str, frame: bytes, send: SendFrame) -> None:
        """``/gonka/ledger/sync/1``: our stored blocks and certificates from the requested height on."""
        request = decode_frame(frame, SyncRequest)
        count = min(request.max_count, self._params.sync_batch)
        for height, block, certificate in await self._chain.store.blocks(request.from_height, count):
            await send(encode_frame(CommitRecord(height=height, block=block,
                                                 certificate=certificate_to_wire(certificate))))
