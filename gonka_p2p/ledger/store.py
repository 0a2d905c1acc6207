"""The replica's durable storage: one SQLite file, the only ledger module that does I/O.

Theory of operation
-------------------
What a replica must never lose, and when it is written:

* **Safety state** (:meth:`LedgerStore.save_safety`): the last (height,
  round, step) the replica signed and its lock; with them, in the same
  transaction, its recent votes and its validValue with the prevotes that
  prove it (what keeps a height alive when every replica restarts in it:
  :class:`~gonka_p2p.ledger.consensus_types.SafetyState`). Written and synced
  *before* the signed message leaves the process, so a crash can never make
  it sign a second, different message for the same position. The
  validValue's block is written only when it changes (once per round at
  most, usually never), so a signature costs two small rows in one
  transaction.
* **Committed blocks** (:meth:`LedgerStore.commit_block`): block bytes,
  commit certificate, and the validator set (with proposer priorities) that
  decided it, in one transaction, synced *before* the block is applied or
  anybody is told it committed. What is acknowledged is on disk.
* **Snapshots** (:meth:`LedgerStore.save_snapshot`): every so many heights,
  ``LedgerState.to_bytes()``; only the latest two are kept. They only
  shorten recovery: the blocks are the truth.

Recovery (:meth:`LedgerStore.recover`): the latest snapshot, then every
stored block after it applied in order, gives exactly the state the replica
had acknowledged (the state machine is deterministic); the next height's
validators follow from the set stored with the last block and that state
(:func:`~gonka_p2p.ledger.validators.validator_set_after`). A snapshot the
running version cannot decode (an upgrade changed the state's encoding) is
skipped: every block is replayed from genesis, and the result must match the
app hash stored beside that snapshot.

Durability: WAL journal with ``synchronous=FULL``, so every committed
transaction is fsync'd to the WAL before ``COMMIT`` returns. The store
remembers the genesis hash it was created for and refuses to open for
another network. aiosqlite runs the connection in its own thread, so the
asyncio loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from gonka_p2p.ledger.block import decode_block
from gonka_p2p.ledger.consensus_types import CommitCertificate, SafetyState, Step, ValidatorSet, Vote
from gonka_p2p.ledger.consensus_wire import (
    CertificateWire,
    ConsensusMessage,
    ValidatorSetWire,
    certificate_from_wire,
    certificate_to_wire,
    validator_set_from_wire,
    validator_set_to_wire,
    vote_from_wire,
    vote_to_wire,
)
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.state import LedgerState, SnapshotError, apply_block
from gonka_p2p.ledger.validators import initial_validator_set, validator_set_after
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SNAPSHOTS_KEPT = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY, hash BLOB NOT NULL, block BLOB NOT NULL, certificate BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_by_hash ON blocks (hash);
CREATE TABLE IF NOT EXISTS validator_sets (height INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS safety (
    id INTEGER PRIMARY KEY CHECK (id = 0), height INTEGER NOT NULL, round INTEGER NOT NULL,
    step INTEGER NOT NULL, locked_round INTEGER NOT NULL, locked_hash BLOB);
CREATE TABLE IF NOT EXISTS safety_votes (id INTEGER PRIMARY KEY CHECK (id = 0), votes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS valid_value (
    id INTEGER PRIMARY KEY CHECK (id = 0), height INTEGER NOT NULL, round INTEGER NOT NULL,
    block BLOB NOT NULL, proof BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (height INTEGER PRIMARY KEY, state BLOB NOT NULL, app_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY AUTOINCREMENT, height INTEGER NOT NULL, validator TEXT NOT NULL, data BLOB NOT NULL);
"""


class StoreError(Exception):
    """The store cannot be used (another network's file, a newer schema); the message is for people."""


@dataclass(frozen=True)
class Recovered:
    """What a replica restarts from: the acknowledged state and the validators of its next height."""

    state: LedgerState
    validators: ValidatorSet  # the validators of height state.height + 1, with their priorities
    safety: SafetyState | None
    replayed: int  # blocks applied on top of the snapshot
    app_hashes: dict[int, bytes]  # height -> app hash, from the snapshot's height on


def _encode_votes(votes: tuple[Vote, ...]) -> bytes:
    """Votes as one consensus message's votes: the schema that already bounds and checks them."""
    return encode_frame(ConsensusMessage(seq=0, proposals=[], votes=[vote_to_wire(v) for v in votes]))


def _decode_votes(data: bytes) -> tuple[Vote, ...]:
    return tuple(vote_from_wire(w) for w in decode_frame(data, ConsensusMessage).votes)


class LedgerStore:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._writing = asyncio.Lock()  # one multi-statement transaction at a time on the connection
        self._valid_saved: tuple[int, int] | None = None  # (height, round) of the validValue on disk

    @classmethod
    async def open(cls, path: Path, genesis: Genesis) -> LedgerStore:
        """Open (creating if needed) the store at ``path`` for the network of ``genesis``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(_SCHEMA)
            store = cls(db, path)
            await store._claim(genesis)
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    async def _claim(self, genesis: Genesis) -> None:
        rows = dict(await self._db.execute_fetchall("SELECT key, value FROM meta"))
        ghash = genesis.hash()
        if not rows:
            await self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", SCHEMA_VERSION), ("genesis_hash", ghash), ("chain_id", genesis.chain_id)])
            return
        if rows.get("schema") != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {rows.get('schema')!r}, this version reads "
                             f"{SCHEMA_VERSION}")
        if rows.get("genesis_hash") != ghash:
            raise StoreError(f"{self.path} belongs to another network (chain {rows.get('chain_id')!r}, "
                             f"different genesis); use another data directory")

    # ---- safety ------------------------------------------------------------------------

    async def save_safety(self, s: SafetyState) -> None:
        """Durable when this returns, all of it or none: only then may the message it covers be sent."""
        async with self._transaction():
            await self._db.execute(
                "INSERT OR REPLACE INTO safety VALUES (0, ?, ?, ?, ?, ?)",
                (s.height, s.round, int(s.step), s.locked_round, s.locked_hash))
            await self._db.execute("INSERT OR REPLACE INTO safety_votes VALUES (0, ?)", (_encode_votes(s.votes),))
            if s.valid_block is not None and (s.height, s.valid_round) != self._valid_saved:
                await self._db.execute("INSERT OR REPLACE INTO valid_value VALUES (0, ?, ?, ?, ?)", (
                    s.height, s.valid_round, s.valid_block, _encode_votes(s.proof_of_lock)))
        if s.valid_block is not None:
            self._valid_saved = (s.height, s.valid_round)

    async def load_safety(self) -> SafetyState | None:
        rows = await self._db.execute_fetchall(
            "SELECT height, round, step, locked_round, locked_hash FROM safety WHERE id = 0")
        if not rows:
            return None
        height, round, step, locked_round, locked_hash = rows[0]
        safety = SafetyState(height, round, Step(step), locked_round, locked_hash)
        votes = await self._db.execute_fetchall("SELECT votes FROM safety_votes WHERE id = 0")
        if votes:  # of this height only, should an older version have written the safety row last
            safety = replace(safety, votes=tuple(v for v in _decode_votes(votes[0][0]) if v.height == height))
        valid = await self._db.execute_fetchall(
            "SELECT round, block, proof FROM valid_value WHERE id = 0 AND height = ?", (height,))
        if valid:  # a row of an earlier height is a validValue that height no longer needs
            (valid_round, block, proof), = valid
            safety = replace(safety, valid_round=valid_round, valid_block=block, proof_of_lock=_decode_votes(proof))
        return safety

    # ---- blocks ------------------------------------------------------------------------

    async def commit_block(self, height: int, block: bytes, certificate: CommitCertificate,
                           validators: ValidatorSet) -> None:
        """Block ``height``, its certificate and the validators that decided it, atomically and durably."""
        async with self._transaction():
            await self._db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)", (
                height, certificate.block_hash, block, encode_frame(certificate_to_wire(certificate))))
            await self._db.execute("INSERT OR REPLACE INTO validator_sets VALUES (?, ?)", (
                height, encode_frame(validator_set_to_wire(validators))))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        async with self._writing:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def latest_height(self) -> int:
        rows = await self._db.execute_fetchall("SELECT MAX(height) FROM blocks")
        return rows[0][0] or 0

    async def blocks(self, from_height: int, max_count: int) -> list[tuple[int, bytes, CommitCertificate]]:
        """Stored (height, block, certificate) from ``from_height`` on, consecutive, at most ``max_count``."""
        rows = await self._db.execute_fetchall(
            "SELECT height, block, certificate FROM blocks WHERE height >= ? ORDER BY height LIMIT ?",
            (from_height, max_count))
        out = []
        for expected, (height, block, cert) in enumerate(rows, start=from_height):
            if height != expected:
                break
            out.append((height, block, certificate_from_wire(decode_frame(cert, CertificateWire))))
        return out

    async def block_by_hash(self, block_hash: bytes) -> bytes | None:
        """A committed block's bytes by its hash (a late peer may still be fetching it as a proposal)."""
        rows = await self._db.execute_fetchall("SELECT block FROM blocks WHERE hash = ?", (block_hash,))
        return rows[0][0] if rows else None

    async def validators(self, height: int) -> ValidatorSet | None:
        rows = await self._db.execute_fetchall("SELECT data FROM validator_sets WHERE height = ?", (height,))
        return validator_set_from_wire(decode_frame(rows[0][0], ValidatorSetWire)) if rows else None

    # ---- snapshots and recovery --------------------------------------------------------

    async def save_snapshot(self, state: LedgerState) -> None:
        async with self._transaction():
            await self._db.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?)",
                                   (state.height, state.to_bytes(), state.app_hash()))
            await self._db.execute(
                "DELETE FROM snapshots WHERE height NOT IN "
                "(SELECT height FROM snapshots ORDER BY height DESC LIMIT ?)", (SNAPSHOTS_KEPT,))

    async def recover(self, genesis: Genesis) -> Recovered:
        """The acknowledged state: latest snapshot + the stored blocks after it (see module docstring).

        A snapshot this version cannot decode (one written before an upgrade that changed the
        state's encoding) is only a cache: the state is rebuilt from genesis and every stored
        block, and must reach the app hash recorded with that snapshot, or this version computes
        another ledger than the one that wrote the file, and the store refuses to open."""
        rows = await self._db.execute_fetchall(
            "SELECT height, state, app_hash FROM snapshots ORDER BY height DESC LIMIT 1")
        state, unreadable = LedgerState.from_genesis(genesis), None
        if rows:
            try:
                state = LedgerState.from_bytes(rows[0][1])
            except SnapshotError as e:
                unreadable = (int(rows[0][0]), bytes(rows[0][2]))
                log.warning("the ledger snapshot at height %d is unreadable (%s); replaying every stored "
                            "block from genesis instead", unreadable[0], e)
        app_hashes = {state.height: state.app_hash()}
        replayed = 0
        while True:
            batch = await self.blocks(state.height + 1, 256)
            if not batch:
                break
            for height, raw, _ in batch:
                apply_block(state, decode_block(raw))
                app_hashes[height] = state.app_hash()
                replayed += 1
        if unreadable is not None and app_hashes.get(unreadable[0]) != unreadable[1]:
            raise StoreError(f"replaying the stored blocks does not reach the state recorded at height "
                             f"{unreadable[0]}: this version of gonka-p2p computes another ledger than the one "
                             f"that wrote this file; run that version, or start from an empty ledger directory "
                             f"to sync from peers")
        if state.height == 0:
            validators = initial_validator_set(state)
        else:
            last = await self.validators(state.height)
            if last is None:
                raise StoreError(f"{self.path} holds no validator set for height {state.height}")
            validators = validator_set_after(last, state)
        return Recovered(state, validators, await self.load_safety(), replayed, app_hashes)

    # ---- evidence ----------------------------------------------------------------------

    async def add_evidence(self, height: int, validator: str, data: bytes) -> None:
        await self._db.execute("INSERT INTO evidence (height, validator, data) VALUES (?, ?, ?)",
                               (height, validator, data))

    async def evidence(self) -> list[tuple[int, str, bytes]]:
        rows = await self._db.execute_fetchall("SELECT height, validator, data FROM evidence ORDER BY id")
        return [(h, v, d) for h, v, d in rows]
