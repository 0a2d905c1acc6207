"""Proof-of-compute rounds over the ledger state: opening them, fixing their sample seeds, and
turning an epoch's proven compute into the next epoch's weights (rules: ``poc``).

:func:`process_poc` runs at the end of every block (``end_of_block``), before the epoch's
validator set rotates, so the weights it writes at an epoch's last block are the ones the
next epoch freezes -- a height every replica agrees on. The queries below are what the
proof-of-compute actor asks: which round is open, what it must open, what it must judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gonka_p2p.ledger.block import BlockContext
from gonka_p2p.ledger.poc import (
    Phase,
    RoundKind,
    Verdicts,
    confirmation_holds,
    confirmation_starts_after,
    confirmation_window,
    declined_targets,
    grown_weights,
    phase,
    regular_start,
    sample_indices,
    sample_seed,
    scaled_model_weights,
    secrets_close,
    work_seed,
)
from gonka_p2p.ledger.records import Participant, PocEntry, PocRound
from gonka_p2p.ledger.rules import epoch_of, is_epoch_end

if TYPE_CHECKING:
    from gonka_p2p.ledger.state import LedgerState


@dataclass(frozen=True)
class OpenRound:
    """A round and where the next block lies in it."""

    epoch: int
    kind: RoundKind
    record: PocRound
    phase: Phase


def open_rounds(state: LedgerState) -> list[OpenRound]:
    """The rounds of the current epoch as of the next block, in start order."""
    height = state.height + 1
    epoch = epoch_of(height, state.params)
    found = []
    for kind in RoundKind:
        record = state.poc_rounds.get((epoch, kind))
        if record is not None:
            found.append(OpenRound(epoch, kind, record, phase(height, record.start, kind, state.params)))
    return found


def entries(state: LedgerState, epoch: int, kind: RoundKind) -> dict[tuple[str, str], PocEntry]:
    """The round's commitments by (prover, model), sorted."""
    return {(peer, model): entry for (e, k, peer, model), entry in sorted(state.poc_entries.rows.items())
            if e == epoch and k == kind}


def sampled(state: LedgerState, epoch: int, kind: RoundKind, prover: str, model: str) -> tuple[int, ...]:
    """The nonces ``prover`` must open, once the round's sample seed is fixed (else none)."""
    record = state.poc_rounds.get((epoch, kind))
    entry = state.poc_entries.get((epoch, kind, prover, model))
    if record is None or entry is None or not record.sample_seed:
        return ()
    return sample_indices(record.sample_seed, prover, model, entry.count, state.params.poc_sample_size)


def to_judge(state: LedgerState, epoch: int, kind: RoundKind, validator: str) -> list[tuple[str, str, PocEntry]]:
    """Opened commitments of others that ``validator`` has not judged yet: (prover, model, entry)."""
    return [(peer, model, entry) for (peer, model), entry in entries(state, epoch, kind).items()
            if entry.opened and peer != validator and validator not in entry.voters]


def verdicts(state: LedgerState, epoch: int, prover: str, model: str, entry: PocEntry) -> Verdicts:
    """The verdicts on ``prover``'s commitment on ``model``, out of the power of the epoch's
    validators but the prover, and of those of them whose registry entries list the model --
    an honest prover actor recomputes only the models its node serves -- or that judged it
    anyway (``poc.Verdicts`` weighs the two)."""
    info = state.epoch_info(epoch)
    judges = {} if info is None else {peer: w for peer, w in info.weights.items() if peer != prover}
    serving = sum(w for peer, w in judges.items() if peer in entry.voters or model in _models_of(state, peer))
    return Verdicts(entry.passed, entry.failed, sum(judges.values()), serving)


def _models_of(state: LedgerState, peer: str) -> tuple[str, ...]:
    """The models ``peer``'s registry entry lists (none: it is no participant now)."""
    participant = state.registry.get(peer)
    return () if participant is None else participant.models


@dataclass(frozen=True)
class RoundOutcome:
    """What an epoch's rounds proved: the next epoch's weight target per prover and model, the
    provers a majority found lying, and those whose confirmation fell short."""

    targets: dict[str, dict[str, int]]
    fraud: frozenset[str]
    unconfirmed: frozenset[str]


def round_outcome(state: LedgerState, epoch: int) -> RoundOutcome:
    """The regular round's proven counts, each checked against the same epoch's confirmation
    round: a prover that did not confirm gets nothing; one whose confirmation shows less than
    ``poc_confirm_min_ppm`` of its regular nonce rate gets only the rate it confirmed -- so
    hardware rented for the regular window buys no weight beyond one's own. (No confirmation
    round opened: nothing to check.)"""
    params = state.params
    confirming = (epoch, RoundKind.CONFIRMATION) in state.poc_rounds
    confirmations = entries(state, epoch, RoundKind.CONFIRMATION)
    targets: dict[str, dict[str, int]] = {}
    fraud, unconfirmed = set(), set()
    for (peer, model), entry in entries(state, epoch, RoundKind.REGULAR).items():
        judged = verdicts(state, epoch, peer, model, entry)
        if judged.fraud:
            fraud.add(peer)
            continue
        if not judged.proven:
            continue
        target = entry.count
        confirmation = confirmations.get((peer, model))
        if confirming:
            confirmed = None if confirmation is None else verdicts(state, epoch, peer, model, confirmation)
            if confirmed is not None and confirmed.fraud:
                fraud.add(peer)
            if confirmed is None or not confirmed.proven:
                target = 0
                unconfirmed.add(peer)
            elif not confirmation_holds(confirmation.count, entry.count, params):
                target = min(target, confirmation.count * params.poc_compute_blocks // params.poc_confirm_compute_blocks)
                unconfirmed.add(peer)
        targets.setdefault(peer, {})[model] = target
    return RoundOutcome(targets, frozenset(fraud), frozenset(unconfirmed))


def may_commit_seed(state: LedgerState, epoch: int, peer: str) -> bool:
    """May ``peer`` commit a validation seed for ``epoch`` (during ``epoch - 1``)? When it holds
    weight now, or when it committed compute in ``epoch - 1``'s regular round: the round that
    may give it weight in ``epoch`` ends with that epoch, too late to commit a seed then, and
    a newcomer without a seed would validate nothing in its first epoch and forfeit its reward."""
    participant = state.registry.get(peer)
    if participant is None:
        return False
    return participant.weight > 0 or any(
        e == epoch - 1 and kind == RoundKind.REGULAR and prover == peer
        for e, kind, prover, _model in state.poc_entries.rows)


def process_poc(state: LedgerState, ctx: BlockContext) -> None:
    """Open rounds, fix sample seeds, and at an epoch's end set the next epoch's weights."""
    params = state.params
    if not params.poc_enabled:
        return
    height = ctx.height
    epoch = epoch_of(height, params)
    if height == regular_start(epoch, params) - 1:
        state.poc_rounds.put((epoch, RoundKind.REGULAR), PocRound(
            start=height + 1, work_seed=work_seed(state.chain_id, epoch, RoundKind.REGULAR, ctx.block_hash)))
    for kind in RoundKind:
        record = state.poc_rounds.get((epoch, kind))
        if record is not None and not record.sample_seed and height == secrets_close(record.start, kind, params):
            info = state.epoch_info(epoch)
            weighted = {} if info is None else info.weights
            secrets = {(peer, model): entry.secret for (peer, model), entry in entries(state, epoch, kind).items()
                       if entry.secret and peer in weighted}
            state.poc_rounds.put((epoch, kind), replace(record, sample_seed=sample_seed(record.work_seed, secrets)))
    regular = state.poc_rounds.get((epoch, RoundKind.REGULAR))
    first, last = confirmation_window(epoch, params)
    if (regular is not None and regular.sample_seed and (epoch, RoundKind.CONFIRMATION) not in state.poc_rounds
            and first - 1 <= height < last
            and confirmation_starts_after(regular.sample_seed, ctx.block_hash, height, last)):
        state.poc_rounds.put((epoch, RoundKind.CONFIRMATION), PocRound(
            start=height + 1, work_seed=work_seed(state.chain_id, epoch, RoundKind.CONFIRMATION, ctx.block_hash)))
    if is_epoch_end(height, params):
        apply_round(state, epoch)


def split_basis(participant: Participant, proven: Mapping[str, int]) -> Mapping[str, int]:
    """How ``participant``'s next weight splits across models: as this round proved it, or --
    when it proved nothing (skipped the round, failed its confirmation, or nobody proved
    anything) while the bounded decline leaves it weight -- as its previous split. Never the
    empty split, which ``Participant.weight_for`` reads as unsplit genesis weight on every
    model it lists: weight proven on one model would become draw weight on models never proven."""
    return proven if any(proven.values()) else dict(participant.model_weights)


def apply_round(state: LedgerState, epoch: int) -> None:
    """The next epoch's weights from ``epoch``'s rounds (:func:`round_outcome`): proven nonces per
    model, as far as confirmed; nothing for a fraudulent prover (fraud also resets its
    reputation); at most the remaining weight of a sanctioned one; the others' decreases (an
    unproven or unconfirmed round included) bounded together (``poc.declined_targets``), and
    their increases (``poc.grown_weights``). Each weight splits across models by
    :func:`split_basis`."""
    outcome = round_outcome(state, epoch)
    targets, fraud = outcome.targets, outcome.fraud
    totals = {}
    for peer, per_model in targets.items():
        participant = state.registry.rows[peer]
        total = 0 if peer in fraud else sum(per_model.values())
        totals[peer] = min(total, participant.weight) if participant.sanctioned else total
    held = {peer: p.weight for peer, p in state.registry.rows.items() if p.weight > 0}
    proven = any(totals.values())
    if epoch and proven:
        exempt = fraud | {peer for peer in held if state.registry.rows[peer].sanctioned}
        totals = declined_targets(held, totals, state.params.max_weight_shift_ppm, exempt)
    # The first round rebases: genesis weights are in other units, the genesis set's proven counts stay.
    weights = grown_weights(held if epoch else {peer: totals.get(peer, 0) for peer in held}, totals,
                            state.params.max_weight_growth_ppm) if proven else {}
    if not weights:  # nobody proved anything, or nobody would be left: the set stays as it is,
        weights = {peer: w for peer, w in held.items() if peer not in fraud}  # but for proven liars
    for peer, participant in sorted(state.registry.rows.items()):
        weight = weights.get(peer, 0)
        split = split_basis(participant, targets.get(peer, {}))
        model_weights = scaled_model_weights(split, weight) if weight else ()
        changed = replace(participant, weight=weight, model_weights=model_weights,
                          reputation_ppm=0 if peer in fraud else participant.reputation_ppm)
        if changed != participant:
            state.registry.put(peer, changed)
