"""Which protocol-critical transactions an actor has sent, per epoch: each at most once in
flight, done only once committed; and :class:`DutyActor`, the base of the actors that act
on what committed state says is due (the validator, the prover).

The validator and the prover act on what committed state says is due, re-reading it after
every block; this keeps them from sending a duty twice while its transaction is on its way
(the follower reports its fate, ``TxFollower.follow``'s ``done``), and makes a duty whose
transaction never committed due again at the next step. An epoch is forgotten once nothing
about it can be accepted any more, so the memory holds only the epochs still open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gonka_p2p.identity import Keypair
    from gonka_p2p.ledger.state import LedgerState

DutyKey = tuple[str, object]  # (what, which): ("check", inference id), ("poc-commit", (kind, model)), ...


class TxFollower(Protocol):
    def follow(self, build: Callable[[int], bytes], what: str, done: Callable[[bool], object]) -> None:
        """Sign with the next sequence, submit, and see it to its block in the background;
        then ``done(committed)``."""
        ...


class DutyLedger:
    def __init__(self, submitter: TxFollower) -> None:
        self._submitter = submitter
        self._done: dict[int, set[DutyKey]] = {}  # epoch -> committed (or given up here)
        self._in_flight: set[tuple[int, DutyKey]] = set()  # submitted, fate unknown

    def epochs(self) -> list[int]:
        """The epochs whose sent transactions are still remembered."""
        return sorted(self._done)

    def forget(self, closed: Callable[[int], bool]) -> None:
        """Drop every epoch for which ``closed(epoch)``: nothing about it is accepted any more."""
        for epoch in [e for e in self._done if closed(e)]:
            del self._done[epoch]

    def sent(self, epoch: int, key: DutyKey) -> bool:
        return key in self._done.get(epoch, ()) or (epoch, key) in self._in_flight

    def mark_done(self, epoch: int, key: DutyKey) -> None:
        """Done without a transaction (e.g. nothing this node can judge): never due again."""
        self._done.setdefault(epoch, set()).add(key)

    def once(self, epoch: int, key: DutyKey, build: Callable[[int], bytes]) -> None:
        """Send ``build(sequence)`` unless it is done or already on its way."""
        if self.sent(epoch, key):
            return
        self._in_flight.add((epoch, key))
        self._submitter.follow(build, f"{key[0]} {key[1]!r}", lambda committed: self._landed(epoch, key, committed))

    def _landed(self, epoch: int, key: DutyKey, committed: bool) -> None:
        """The follower's word: done once committed, else due again at the next step (the
        follower has retried for a while already: no hurry)."""
        self._in_flight.discard((epoch, key))
        if committed:
            self.mark_done(epoch, key)


class DutyActor:
    """Keeps no schedule of its own: after each committed block it reads the replica's live
    committed state (never mutated here; nothing read from it is carried across an ``await``
    but snapshots) and sends what is due through a :class:`DutyLedger`."""

    def __init__(self, key: Keypair, submitter: TxFollower) -> None:
        self._key = key
        self._duties = DutyLedger(submitter)
        self._state: LedgerState | None = None
        self._wake = asyncio.Event()

    @property
    def me(self) -> str:
        return self._key.peer_id

    def on_commit(self, state: LedgerState) -> None:
        """Replica commit listener: remember the (live) committed state and wake the loop."""
        self._state = state
        self._wake.set()

    async def next_commit(self) -> None:
        """Wait until a block has committed since the last call."""
        await self._wake.wait()
        self._wake.clear()

    def _live(self) -> LedgerState:
        """The newest committed state: what any read after an ``await`` must use."""
        assert self._state is not None
        return self._state
