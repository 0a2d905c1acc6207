"""Who executes an inference: the ledger's weighted draw, over weights frozen per epoch.

The TA draws, the executor checks it was drawn before it computes, and the
ledger recomputes the draw for every ``StartInference`` -- all with these
functions, so the three can never disagree. The draw itself is
:func:`~gonka_p2p.ledger.rules.choose_executor` (seeded by the inference id and
an attempt number); this module says over which table it runs and who may be
named, as queries of the committed :class:`~gonka_p2p.ledger.state.LedgerState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gonka_p2p.ledger.records import Participant
from gonka_p2p.ledger.rules import DrawTable, NoEligibleExecutor, choose_executor, epoch_last_height, epoch_of

if TYPE_CHECKING:
    from gonka_p2p.ledger.state import LedgerState


def executor_weights(state: LedgerState, model: str, epoch: int | None = None) -> dict[str, int]:
    """The table the executor draw runs over: the weights ``epoch`` (default: the epoch of the
    next block) froze at its start, of the participants registered for ``model``.

    Frozen, so that a TA's draw and the ledger's recomputation agree whatever commits in
    between: a sanction or a weight cut landing while a Start is in flight does not turn
    the honest executor's finished work into a refused Start. A participant sanctioned
    since stays in the table (the draw does not move); TAs route around it
    (:func:`may_execute`). Zero-weight identities are never
    in it, however many an attacker registers."""
    info = state.epoch_info(state.epoch if epoch is None else epoch)
    if info is None:
        return {}
    registry = state.registry.rows
    return {peer: weight for peer, weight in info.model_weights(model).items()
            if peer in registry and model in registry[peer].models}


class ExecutorTables:
    """:func:`executor_weights` laid out for drawing (``rules.DrawTable``), once per (epoch, model)
    rather than once per Start. A table follows frozen weights and which participants still list
    the model, so a change of anyone's models drops every table when its block commits
    (:meth:`committed`), and until then tables are built afresh (:meth:`table`)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, str], DrawTable] = {}

    def table(self, state: LedgerState, model: str, epoch: int) -> DrawTable:
        if state.epoch_info(epoch) is None or _models_changed(state.registry.dirty, state.registry.rows):
            return DrawTable(executor_weights(state, model, epoch))
        if (epoch, model) not in self._tables:
            self._tables = {k: t for k, t in self._tables.items() if k[0] >= epoch - 1}  # draw_epochs' reach
            self._tables[(epoch, model)] = DrawTable(executor_weights(state, model, epoch))
        return self._tables[(epoch, model)]

    def committed(self, changed: Mapping[str, Any], rows: Mapping[str, Participant]) -> None:
        """A block's registry changes (key -> the record before it) are committed."""
        if _models_changed(changed, rows):
            self._tables.clear()


def _models_changed(before: Mapping[str, Any], rows: Mapping[str, Participant]) -> bool:
    """Did a participant that existed before change its models? (A newcomer is in no frozen table.)"""
    return any(isinstance(old, Participant) and old.models is not rows[peer].models
               and old.models != rows[peer].models for peer, old in before.items())


def draw_table(state: LedgerState) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """What an epoch freezes for its draws: per model, each unsanctioned participant's weight
    proven on that model (not its total weight: a participant strong on one model is not
    drawn for another -- Gonka's issue #629), bounded by its total weight after any cuts."""
    table: dict[str, list[tuple[str, int]]] = {}
    for peer, participant in sorted(state.registry.rows.items()):
        if participant.sanctioned or participant.weight <= 0:
            continue
        for model in participant.models:
            weight = min(participant.weight_for(model), participant.weight)
            if weight > 0:
                table.setdefault(model, []).append((peer, weight))
    return tuple((model, tuple(rows)) for model, rows in sorted(table.items()))


def may_execute(state: LedgerState, peer: str) -> bool:
    """Whether a TA should still route to a drawn executor: not once proven-invalid work
    sanctioned it (the TA takes the next attempt). The ledger still records a Start drawn to
    it -- work already in flight when the conviction landed -- so the client's escrow is on
    the ledger and refunded with the rest of the caught epoch, never lost."""
    participant = state.registry.get(peer)
    return participant is not None and not participant.sanctioned


@dataclass(frozen=True)
class Draw:
    """One attempt of a TA's routing: the executor the ledger's draw names, and whether the
    ledger bars it (:func:`may_execute`: the TA skips it, and says so if every draw fails)."""

    attempt: int
    executor: str
    barred: bool


def routing_draws(weights: Callable[[], Mapping[str, int] | DrawTable], ta: str, iid: bytes, attempts: int,
                  state: LedgerState | None) -> Iterator[Draw]:
    """The draws a TA tries for inference ``iid``, in order: attempt by attempt over the
    ``weights`` of that moment (the ledger's frozen table, which :func:`is_drawn` recomputes;
    read again per attempt, since a route can span a block), never the TA itself, each
    distinct executor once (a second draw of one that failed would fail again). The live TA
    and the simulator both route with this, so a routing rule changed here changes in both;
    each then skips what only it knows (a peer not live, or not serving the model)."""
    tried: set[str] = set()
    for attempt in range(attempts):
        try:
            executor = choose_executor(weights(), frozenset({ta}), iid, attempt)
        except NoEligibleExecutor:
            return
        if executor not in tried:
            tried.add(executor)
            yield Draw(attempt, executor, state is not None and not may_execute(state, executor))


def draw_epochs(state: LedgerState, height: int) -> tuple[int, ...]:
    """Whose frozen weights a Start applied at ``height`` may have been drawn from: its own
    epoch's, and during the first ``inference_deadline_blocks`` of an epoch also the previous
    one's -- a Start drawn just before the boundary commits just after it. (A TA thereby
    chooses among at most twice as many draws there, see ``rules.choose_executor``.)"""
    epoch = epoch_of(height, state.params)
    into = height - epoch_last_height(epoch - 1, state.params) if epoch > 0 else height
    if epoch > 0 and into <= state.params.inference_deadline_blocks and state.epoch_info(epoch - 1):
        return (epoch, epoch - 1)
    return (epoch,)


def drawable_executors(state: LedgerState, height: int) -> frozenset[str]:
    """Whom a Start applied at ``height`` or later may still name as executor: the participants
    in the frozen draw tables, for any model, of :func:`draw_epochs` at ``height`` (a Start
    drawn from an earlier table can no longer commit). Only their Finishes can ever settle."""
    infos = (state.epoch_info(epoch) for epoch in draw_epochs(state, height))
    return frozenset().union(*(_executors(info.draw_weights) for info in infos if info is not None))


@lru_cache(maxsize=8)
def _executors(draw_weights: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]) -> frozenset[str]:
    return frozenset(peer for _model, rows in draw_weights for peer, _weight in rows)


def is_drawn(state: LedgerState, model: str, ta: str, iid: bytes, attempt: int, executor: str,
             height: int) -> bool:
    """Whether the ledger's weighted draw gives inference ``iid`` to ``executor`` at ``attempt``
    for a Start that ``ta`` submits into the block at ``height``."""
    for epoch in draw_epochs(state, height):
        try:
            if choose_executor(state.executor_tables.table(state, model, epoch), frozenset({ta}), iid,
                               attempt) == executor:
                return True
        except NoEligibleExecutor:
            continue
    return False
