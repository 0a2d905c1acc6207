"""The node's evidence store: each inference's artifact, client request and signed answer, on
disk until the epoch that holds the inference has settled.

Theory of operation
-------------------
The ledger holds only a hash commitment to an artifact; validators, and a
dispute's committee, fetch the bytes from the executor (or the TA that
relayed them) until the inference's epoch settles. Evidence that is gone
before then reads as withheld, which the executor is punished for. So what
is kept must outlive a restart, and must not be pushed out by load:

* **Durable before acknowledged.** :meth:`ArtifactStore.put` returns once
  the row is committed to SQLite (WAL journal, ``synchronous=FULL``: the
  commit is fsync'd before it returns); the executor only then sends
  ``InferenceFinished`` and claims the work on the ledger. One fsync per
  inference is small beside the generation it records. SQLite's atomic
  commit means a crash leaves the row whole or absent, never half-written.
* **Kept until settled.** A row remembers the ledger's epoch when it was
  kept: the inference cannot close in an earlier one, so no settlement
  before that one can free it. When an epoch settles (:meth:`on_commit`,
  a replica commit listener) every row that may belong to a settled epoch
  is looked up in committed state: evidence of an inference that closed in
  a settled epoch goes; evidence of one still running, or that closed
  later, waits for that epoch; evidence of a request the ledger never
  started goes once the request is too old to start (``request_window_ms``),
  since nobody will ever ask for it.
* **Never before the client's recovery.** Whatever its epoch, a row stays
  while its request is inside the ledger's replay window (``request_window_ms``,
  10 minutes by default; the client library seeks a cut answer for 2): a
  client charged for an answer its relay cut may still be fetching it. With
  day-long epochs this never binds; with the testnet's one-minute epochs it
  does (run 17 lost an answer its executor pruned 87 s after the Finish, while
  the client's recovery was still waiting out a throttled TA).
* **The answer too.** Beside the artifact each row keeps the answer as the
  executor signed it (its response frames, verbatim), so a client whose
  relay broke after the executor finished -- and who is charged for the
  answer -- can still fetch it (``actors/answer_server.py``) and check every
  signature, as it checks a live stream. The artifact alone would not do: a
  TA cannot sign for the executor, and the text the client reads is only in
  the frames. It lives and goes with its artifact, in the same transaction.
* **Bounded by bytes, refusing when full.** The ledger expects every kept
  artifact until its epoch settles, so evicting one to make room would turn
  honest work into a withholding failure, silently and long after the fact.
  Refusing new evidence instead fails loudly and at once
  (:class:`EvidenceStoreFull`, one error in the log, :attr:`refused`
  counting): the executor declines orders it cannot keep evidence for, and
  the TAs draw another executor. The operator sizes the store
  (``evidence_max_bytes``) to the traffic of an epoch plus its settlement
  delay (or of the request window, where that is longer).

Deletions decided at a settlement take effect at once for readers (the
in-memory index no longer lists them) and reach the disk with the next
write's transaction, or at close; a crash in between only means the next
settlement decides them again. SQLite runs on one worker thread of the
store's own, so the event loop never waits on the disk. A node without a
ledger has no epochs to settle: its store lives in memory and only refuses.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import msgpack

from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.ledger.genesis import Params
from gonka_p2p.ledger.records import InferenceStatus
from gonka_p2p.ledger.rules import replay_memory_until
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import Signed
from gonka_p2p.wire.messages import InferenceRequest, inference_id

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    inference_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,      -- the ledger's epoch when kept: none before it can free the row
    request_ms INTEGER NOT NULL, -- the client's timestamp: when the ledger can no longer start it
    request BLOB NOT NULL,       -- the client's signed request, verbatim
    artifact BLOB NOT NULL       -- InferenceArtifact.encode()
);
CREATE TABLE IF NOT EXISTS answers (
    inference_id BLOB PRIMARY KEY,  -- a row of artifacts, written and deleted with it
    frames BLOB NOT NULL            -- msgpack list of the executor's signed response frames
);
"""
_CLOSED = (InferenceStatus.SETTLED, InferenceStatus.EXPIRED)


class EvidenceStoreError(Exception):
    """The store cannot be opened (unreadable file, not a database); the message is for people."""


class EvidenceStoreFull(Exception):
    """New evidence would exceed the store's byte bound; nothing kept was evicted for it."""


@dataclass(slots=True)
class _Kept:
    epoch: int  # the first epoch whose settlement may free it
    request_ms: int
    size: int  # bytes of request, artifact and answer


def last_settled_epoch(height: int, params: Params) -> int:
    """The newest epoch whose settlement has run by the end of ``height``, -1 if none: the
    inverse of :func:`~gonka_p2p.ledger.rules.settlement_height` (epoch e settles at the end of
    (e + 1) * L + settlement delay)."""
    return max(-1, (height - params.settlement_delay_blocks) // params.epoch_length_blocks - 1)


def freed_by(ledger: LedgerState, inference_id: bytes, request_ms: int) -> int | None:
    """The epoch whose settlement frees this evidence, as far as committed state tells now
    (the epoch of the next block while it may still run, or while its request is inside the
    ledger's replay window); None if the ledger never started the inference and never can,
    or started it and has long forgotten it."""
    record = ledger.inference(inference_id)
    fresh = ledger.time_ms <= replay_memory_until(request_ms, ledger.params.request_window_ms)
    if record is None:
        return ledger.epoch if fresh else None
    if record.status in _CLOSED and not fresh:
        return ledger.inference_epoch(record)
    return ledger.epoch


class ArtifactStore:
    """(client request, encoded artifact, signed answer) by inference id, at ``path`` (None: in
    memory), at most ``max_bytes`` of them. :attr:`used_bytes`, :attr:`refused` and :attr:`full` are its metrics."""

    def __init__(self, path: Path | None, max_bytes: int) -> None:
        assert max_bytes > 0
        self.path = path
        self.max_bytes = max_bytes
        self.used_bytes = 0  # of the evidence kept (and being written)
        self.refused = 0  # puts refused because the store was full, since the node started
        self.full = False  # a put was refused and no settlement has freed room since
        self._kept: dict[bytes, _Kept] = {}
        self._forgotten: set[bytes] = set()  # pruned, still to be deleted on disk
        self._epoch = 0  # the ledger's epoch at its latest commit
        self._settled = -1  # the newest settled epoch pruned for
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._kept)

    async def open(self) -> None:
        """Open (creating if needed) the file and index what it holds."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evidence-store")
        try:
            self._db = await self._run(self._connect)
            rows = await self._run(self._index)
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise EvidenceStoreError(f"cannot open the evidence store {self.path}: {e}") from None
        for iid, epoch, request_ms, size in rows:
            self._keep(iid, _Kept(epoch, request_ms, size))

    async def close(self) -> None:
        """Write the pending deletions and close; a store that never opened closes too."""
        if self._thread is None:
            return
        if self._db is not None:
            forgotten, self._forgotten = self._forgotten, set()
            await self._run(self._write, forgotten, None, b"")
            await self._run(self._conn().close)
            self._db = None
        self._thread.shutdown()
        self._thread = None

    async def put(self, request: Signed[InferenceRequest], artifact: InferenceArtifact,
                  answer: Sequence[bytes], *, copy: bool = False) -> bool:
        """Keep the evidence of ``request`` and its ``answer`` (the executor's signed frames, in
        order); durable when this returns True. This node's own work replaces what is kept under
        its inference id and raises EvidenceStoreFull when it does not fit (nothing is evicted
        for it). A ``copy`` (what a TA relayed from another executor) is only a spare: it never
        replaces a row -- a client may sign two requests under one nonce, and the copy of the
        other must not stand in for the evidence behind this node's own commitment -- and one
        that does not fit is dropped (False) without marking the store full, so a stranger's
        oversized answer cannot make this node's executor refuse work."""
        iid = inference_id(request)
        data = artifact.encode()
        frames = msgpack.packb(list(answer), use_bin_type=True)
        kept = _Kept(self._epoch, request.message.timestamp_ms, len(request.raw) + len(data) + len(frames))
        if copy and (iid in self._kept or self.used_bytes + kept.size > self.max_bytes):
            log.info("relayed evidence of %s not kept (%s)", iid.hex()[:12],
                     "evidence already kept" if iid in self._kept else "no room")
            return False
        previous = self._drop(iid)
        if self.used_bytes + kept.size > self.max_bytes:
            if previous is not None:
                self._keep(iid, previous)
            self._refuse(kept.size)
        self._keep(iid, kept)  # reserved while it is written
        self._forgotten.discard(iid)
        forgotten, self._forgotten = self._forgotten, set()
        try:
            await self._run(self._write, forgotten, (iid, kept.epoch, kept.request_ms, request.raw, data), frames)
        except BaseException:
            self._forgotten |= forgotten
            self._drop(iid)
            if previous is not None:
                self._keep(iid, previous)
            raise
        return True

    async def get(self, inference_id: bytes) -> tuple[bytes, bytes] | None:
        """(client request, encoded artifact), or None if not kept (or already pruned)."""
        if inference_id not in self._kept:
            return None
        row = await self._run(self._read, inference_id)
        return row if inference_id in self._kept else None

    async def answer(self, inference_id: bytes) -> tuple[bytes, list[bytes]] | None:
        """(client request, the executor's signed frames), or None if not kept (or already pruned)."""
        if inference_id not in self._kept:
            return None
        row = await self._run(self._read_answer, inference_id)
        return row if inference_id in self._kept else None

    def on_commit(self, ledger: LedgerState) -> None:
        """Replica commit listener: forget the evidence of every inference whose epoch has settled.

        Synchronous, so it reads the committed state in the same stretch it was handed over."""
        self._epoch = ledger.epoch
        settled = last_settled_epoch(ledger.height, ledger.params)
        if settled <= self._settled:
            return
        self._settled = settled
        for iid, kept in list(self._kept.items()):
            if kept.epoch > settled:
                continue
            until = freed_by(ledger, iid, kept.request_ms)
            if until is None or until <= settled:
                self._drop(iid)
                self._forgotten.add(iid)
                self.full = False
            else:
                kept.epoch = until

    def _keep(self, iid: bytes, kept: _Kept) -> None:
        self._kept[iid] = kept
        self.used_bytes += kept.size

    def _drop(self, iid: bytes) -> _Kept | None:
        kept = self._kept.pop(iid, None)
        if kept is not None:
            self.used_bytes -= kept.size
        return kept

    def _refuse(self, size: int) -> NoReturn:
        self.refused += 1
        if not self.full:
            log.error("evidence store full (%d of %d bytes used, %d more asked): refusing new evidence, "
                      "so this node executes nothing until an epoch settles; raise evidence_max_bytes",
                      self.used_bytes, self.max_bytes, size)
        self.full = True
        raise EvidenceStoreFull(f"the evidence store is full ({self.used_bytes} of {self.max_bytes} bytes)")

    # ---- on the store's thread -----------------------------------------------------------

    async def _run(self, work: Callable[..., T], *args: object) -> T:
        assert self._thread is not None, "the evidence store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "the evidence store is not open"
        return self._db

    def _connect(self) -> sqlite3.Connection:
        if self.path is None:
            db = sqlite3.connect(":memory:", isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return db

    def _index(self) -> list[tuple[bytes, int, int, int]]:
        return self._conn().execute(
            "SELECT inference_id, epoch, request_ms, length(request) + length(artifact) + "
            "coalesce(length(frames), 0) FROM artifacts LEFT JOIN answers USING (inference_id)"
        ).fetchall()

    def _read(self, inference_id: bytes) -> tuple[bytes, bytes] | None:
        row = self._conn().execute("SELECT request, artifact FROM artifacts WHERE inference_id = ?",
                                   (inference_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def _read_answer(self, inference_id: bytes) -> tuple[bytes, list[bytes]] | None:
        row = self._conn().execute(
            "SELECT a.request, f.frames FROM artifacts a JOIN answers f USING (inference_id) "
            "WHERE inference_id = ?", (inference_id,)).fetchone()
        return (row[0], msgpack.unpackb(row[1], raw=False)) if row else None

    def _write(self, forgotten: set[bytes], row: tuple[bytes, int, int, bytes, bytes] | None,
               frames: bytes) -> None:
        """Delete ``forgotten`` and insert ``row`` with its answer ``frames`` in one transaction:
        one fsync for all."""
        if not forgotten and row is None:
            return
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("artifacts", "answers"):
                db.executemany(f"DELETE FROM {table} WHERE inference_id = ?", [(iid,) for iid in forgotten])
            if row is not None:
                db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)", row)
                db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (row[0], frames))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
