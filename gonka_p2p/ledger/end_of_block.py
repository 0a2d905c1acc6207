"""The end of every block: deadlines, and at epoch boundaries the epoch's settlement.

After a block's transactions, :func:`end_block` runs, in this order:
inferences whose deadline is this height expire (full refund, a miss for
the executor); Finishes held past their deadline are dropped; request ids
older than the replay window are forgotten; disputes whose next step is
this height take it (:func:`~gonka_p2p.ledger.tx_rules.advance_dispute`:
draw a round's committee from this block's hash, or close an undecided
round); if this height settles an epoch,
:func:`process_epoch_settlement` runs; if it ends an epoch,
:func:`process_epoch_start` freezes the next epoch's validator set and
validation floor (from the epoch's traffic, capped per executor as the
reward is: ``rules.floor_traffic``).

Epochs and verification (formulas in :mod:`gonka_p2p.ledger.rules`)
--------------------------------------------------------------------
Epoch e holds heights e*L+1 .. (e+1)*L; an inference belongs to the epoch in
which it closed. Its validators commit seeds during e-1; checks of its
inferences are accepted until ``validation_deadline(e)``; seeds are revealed
after it ends; it settles at ``settlement_height(e)`` (after the last
possible dispute). Settlement is three steps: :func:`tally_epoch` reads what
happened from the state, :func:`settle_epoch` (a pure function of the tally)
decides, and :func:`process_epoch_settlement` applies. Deterministically, it:

- judges each executor: caught if a dispute found one of its inferences
  invalid, or if the epoch test (SPRTs over one observation per checked
  inference, and over its distance where the model's pin has a distance run,
  carried across epochs until they decide: ``epoch_test.py``) accuses it;
- pays each executor the fees of its epoch's inferences -- or, if it was
  caught, refunds every one of them to the client that paid it;
- splits the epoch reward: ``validator_share`` by validation work (tokens
  of the duties a validator's revealed seed gave it and it did; a dispute
  vote earns no share: seats follow weight as duties do, so paying votes
  would change nothing in expectation, and it would let a framer shift
  honest validators' rewards by opening disputes), the rest by billable
  tokens executed, each executor's capped at its weight's fair share
  (``rules.fair_share_scores``: executors are drawn by weight, so this
  share tracks weight without counting it twice, and work a client-TA
  grinds onto its own weighted executor earns nothing beyond that share).
  A forfeited share stays in the split
  and is not minted, so nobody's forfeit moves anyone else's share.
  A participant that was caught, skipped a duty or a vote, did not commit
  and reveal a seed, passed work that a dispute proved invalid, or failed
  work that a dispute found valid forfeits its share: the share is not minted;
- updates reputations (caught, too many misses or an accusation overturned:
  0; a clean, checked epoch: +1/N) and weights: the caught and everyone
  sanctioned are cut towards 0, but one settlement moves at most
  ``max_weight_shift_ppm`` of the total voting power (``rules.weight_cuts``);
  the rest waits for the next settlement. Weight is voting power, so it
  changes only here, and by bounded steps;
- records an :class:`EpochSummary` (who was paid what, who forfeited, who was
  caught; :func:`format_epoch_summary` prints it for people) and prunes the
  epoch before it. It asserts that it moved exactly the epoch's fees and
  minted exactly the shares it paid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gonka_p2p.ledger.block import BlockContext
from gonka_p2p.ledger.disputes import weight_cuts
from gonka_p2p.ledger.distance_test import inference_llr_micro
from gonka_p2p.ledger.epoch_test import NO_CARRY, Carry, run_epoch_test
from gonka_p2p.ledger.executor_draw import draw_table
from gonka_p2p.ledger.poc_rounds import process_poc, round_outcome
from gonka_p2p.ledger.records import EpochInfo, EpochSummary, InferenceStatus, ParticipantOutcome, Payout
from gonka_p2p.ledger.rules import (
    PPM,
    DisputeOutcome,
    Observation,
    epoch_after,
    epoch_reward_pools,
    epoch_settled_at,
    fair_share_scores,
    floor_traffic,
    forfeit_reasons,
    inference_observation,
    is_epoch_end,
    miss_rate_exceeded,
    pro_rata,
    reputation_after_epoch,
    validation_floor_ppm,
)
from gonka_p2p.ledger.tables import InvariantViolation
from gonka_p2p.ledger.tx_rules import advance_dispute

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params
    from gonka_p2p.ledger.state import LedgerState


def process_expiries(state: LedgerState, ctx: BlockContext) -> None:
    """Inferences still running at the end of their deadline height: full refund, a miss counted."""
    for iid in state.take_expiring(ctx.height):
        record = state.inferences.get(iid)
        if record is None or record.status is not InferenceStatus.STARTED:
            continue  # settled in time
        state.credit(record.client, record.escrow)
        state.close_inference(iid, replace(record, status=InferenceStatus.EXPIRED,
                                           closed_height=ctx.height))
        executor = state.registry.rows[record.executor]
        state.registry.put(record.executor, replace(executor, missed=executor.missed + 1))


def process_held_deadlines(state: LedgerState, ctx: BlockContext) -> None:
    """A Finish whose Start never came within the deadline is dropped (it moved no coins)."""
    for key in state.take_held_due(ctx.height):
        held = state.held.get(key)
        if held is not None and held.deadline == ctx.height:
            state.drop_held(key)


def process_replay_memory(state: LedgerState, ctx: BlockContext) -> None:
    """Forget request ids whose timestamps can no longer be fresh: they can never start again."""
    for until, iid in state.take_requests_remembered_before(ctx.time_ms):
        if state.seen.get(iid) == until:  # else a stale entry: the id was remembered again
            state.seen.delete(iid)


def process_dispute_deadlines(state: LedgerState, ctx: BlockContext) -> None:
    """Open disputes whose next step is due at the end of this height take it (an index entry
    is stale when the dispute resolved or moved its deadline since)."""
    for iid in state.take_disputes_due(ctx.height):
        dispute = state.disputes.get(iid)
        if dispute is not None and dispute.outcome is DisputeOutcome.OPEN and dispute.deadline == ctx.height:
            advance_dispute(state, ctx, iid)


@dataclass
class PeerTally:
    """What one participant did in an epoch, as settlement reads it from the state."""

    weight: int = 0  # in the epoch's validator set
    power: int = 0  # its weight in the participants table now: the voting power settlement may cut
    sanctioned: bool = False  # proven cheating earlier: its remaining weight is cut at settlement
    reputation_ppm: int = 0
    inferences: int = 0
    expired: int = 0
    tokens: int = 0
    checked: int = 0
    observations: list[Observation] = field(default_factory=list)
    distance_llrs: list[int] = field(default_factory=list)  # micro-nats: its distance run's steps
    sprt_carry: Carry = NO_CARRY  # the epoch test as the last settlement left it (epoch_test.py)
    proven_invalid: bool = False  # a dispute found one of its inferences invalid
    equivocated: bool = False  # a SubmitEvidence committed in this epoch proved it signed two votes
    committed: bool = False
    revealed: bool = False
    duties: int = 0
    done: int = 0
    checks: int = 0
    votes: int = 0
    missed_votes: int = 0
    overturned: int = 0
    vouched_invalid: int = 0  # its passing checks of work a dispute proved invalid
    work: int = 0
    unconfirmed: bool = False  # its weight failed the epoch's confirmation round of proof of compute


def epoch_executors(state: LedgerState, epoch: int) -> dict[str, int]:
    """The executors of ``epoch`` and their weights: the members of its validator set that
    serve a model (whom the executor draw could pick), idle or not."""
    return {peer: weight for peer, weight in state.epochs.rows[epoch].weights.items()
            if state.registry.rows[peer].models}


@dataclass
class EpochTally:
    epoch: int
    floor_ppm: int
    peers: dict[str, PeerTally]
    fees: list[tuple[bytes, str, str, int]]  # (inference id, executor, client, cost) of settled ones
    executors: dict[str, int] = field(default_factory=dict)  # epoch_executors: whose work sets fair shares
    checked: int = 0
    disputes: int = 0
    disputes_invalid: int = 0


def tally_epoch(state: LedgerState, epoch: int) -> EpochTally:
    """Read everything settlement needs about ``epoch`` from the state (changes nothing)."""
    info = state.epochs.rows[epoch]
    weights = info.weights
    tally = EpochTally(epoch, info.floor_ppm, {}, [], epoch_executors(state, epoch))

    def peer(address: str) -> PeerTally:
        row = tally.peers.get(address)
        if row is None:
            participant = state.registry.rows[address]
            row = tally.peers[address] = PeerTally(
                weight=weights.get(address, 0), power=participant.weight,
                sanctioned=participant.sanctioned, reputation_ppm=participant.reputation_ppm,
                sprt_carry=participant.sprt_carry)
        return row

    for address in weights:
        peer(address)
    for address, participant in state.registry.rows.items():
        if participant.weight > 0:
            peer(address)
    for address, punished in state.equivocations.rows.items():
        if punished == epoch:
            peer(address).equivocated = True
    for address in round_outcome(state, epoch).unconfirmed:
        peer(address).unconfirmed = True
    duties: set[tuple[bytes, str]] = set()  # (inference id, validator) of every revealed duty
    for (e, address), commitment in state.commitments.rows.items():
        if e == epoch and address in weights:
            row = peer(address)
            row.committed, row.revealed = True, commitment.revealed
            row.duties, row.done = commitment.duties, commitment.done
            if commitment.revealed:
                duties.update((iid, address)
                              for iid in state.validation_duties(epoch, address, commitment.seed))
    for iid in state.epoch_inferences(epoch):
        record = state.inferences.rows[iid]
        executor = peer(record.executor)
        if record.status is InferenceStatus.EXPIRED:
            executor.expired += 1
            continue
        executor.inferences += 1
        executor.tokens += record.billable_tokens
        tally.fees.append((iid, record.executor, record.client, record.cost))
        dispute = state.disputes.get(iid)
        checks = state.validations(iid)
        # Only a pass that was its signer's duty is evidence: a pass needs no seed, so any
        # committed validator can pass any inference, and counting those would let a partner
        # outvote the duty holders (committee votes are a dispute's, read through its outcome).
        passes = [(weights[v], c) for v, c in checks.items() if c.valid and (iid, v) in duties]
        observation = inference_observation(dispute.outcome if dispute else None,
                                            [(w, c.suspicious) for w, c in passes])
        if observation is not None:
            executor.checked += 1
            tally.checked += 1
            executor.observations.append(observation)
        pin = state.genesis.models.get(record.model)
        if pin is not None and pin.distance_test is not None:
            llr = inference_llr_micro(
                pin.distance_test, record.completion_tokens,
                proven_invalid=dispute is not None and dispute.outcome is DisputeOutcome.INVALID,
                passes=[(w, c.mean_distance_nano) for w, c in passes])
            if llr is not None:
                executor.distance_llrs.append(llr)
        for validator, check in checks.items():
            row = peer(validator)
            row.checks += 1
            overturned = dispute is not None and dispute.outcome is DisputeOutcome.VALID and not check.valid
            vouched = dispute is not None and dispute.outcome is DisputeOutcome.INVALID and check.valid
            row.overturned += overturned
            row.vouched_invalid += vouched
            if (iid, validator) in duties:
                row.work += record.prompt_tokens + record.completion_tokens
        if dispute is None:
            continue
        assert dispute.outcome is not DisputeOutcome.OPEN, "a dispute outlived its epoch's settlement"
        tally.disputes += 1
        if dispute.outcome is DisputeOutcome.INVALID:
            tally.disputes_invalid += 1
            executor.proven_invalid = True
        for member in dispute.members:
            if (iid, member) in state.votes:
                peer(member).votes += 1
        for member in dispute.silent:
            peer(member).missed_votes += 1
    return tally


def settle_epoch(tally: EpochTally, params: Params, height: int) -> EpochSummary:
    """The pure rule of settlement: from what happened in the epoch, who is paid what."""
    caught = {}
    tests = {a: run_epoch_test(row.observations, row.sprt_carry, params, row.distance_llrs)
             for a, row in tally.peers.items()}
    for address, row in tally.peers.items():
        if row.proven_invalid:
            caught[address] = "dispute"
        elif row.equivocated:
            caught[address] = "equivocation"
        elif tests[address].accused:
            caught[address] = "sprt"
    paid: dict[str, int] = {}
    refunded: dict[str, int] = {}
    refunds: dict[str, int] = {}
    for _iid, executor, client, cost in tally.fees:
        if executor in caught:
            refunded[executor] = refunded.get(executor, 0) + cost
            refunds[client] = refunds.get(client, 0) + cost
        else:
            paid[executor] = paid.get(executor, 0) + cost
    executor_pool, validator_pool = epoch_reward_pools(tally.epoch, params)
    executor_shares = pro_rata(executor_pool, fair_share_scores({a: r.tokens for a, r in tally.peers.items()},
                                                                tally.executors))
    validator_shares = pro_rata(validator_pool, {a: r.work for a, r in tally.peers.items()})
    cuts = weight_cuts({a: r.power for a, r in tally.peers.items()},
                       {a for a, r in tally.peers.items() if r.sanctioned or a in caught},
                       params.max_weight_shift_ppm)
    rows = []
    for address, row in sorted(tally.peers.items()):
        reasons = forfeit_reasons(in_validator_set=row.weight > 0 and tally.epoch > 0,
                                  committed=row.committed, revealed=row.revealed,
                                  skipped=row.duties - row.done, missed_votes=row.missed_votes,
                                  caught=address in caught, vouched_invalid=row.vouched_invalid,
                                  overturned=row.overturned, unconfirmed=row.unconfirmed)
        shares = executor_shares.get(address, 0), validator_shares.get(address, 0)
        missed_too_many = miss_rate_exceeded(row.expired, row.inferences, params)
        clean = row.inferences > 0 and row.checked > 0
        reputation = reputation_after_epoch(row.reputation_ppm, caught=address in caught,
                                            missed_too_many=missed_too_many, overturned=row.overturned > 0,
                                            clean=clean, params=params)
        rows.append(ParticipantOutcome(
            peer=address, weight=row.weight, inferences=row.inferences, expired=row.expired,
            tokens=row.tokens, checked=row.checked, fees_paid=paid.get(address, 0),
            fees_refunded=refunded.get(address, 0), committed=row.committed, revealed=row.revealed,
            duties=row.duties, done=row.done, checks=row.checks, votes=row.votes,
            missed_votes=row.missed_votes, overturned=row.overturned, work=row.work,
            executor_reward=0 if reasons else shares[0], validator_reward=0 if reasons else shares[1],
            forfeited=sum(shares) if reasons else 0, forfeit=tuple(str(r) for r in reasons),
            caught=caught.get(address, ""), reputation_before=row.reputation_ppm,
            reputation_after=reputation, weight_after=row.power - cuts.get(address, 0),
            sprt_carry=NO_CARRY if address in caught else tests[address].carry))
    minted = sum(r.executor_reward + r.validator_reward for r in rows)
    forfeited = sum(r.forfeited for r in rows)
    assert minted + forfeited <= executor_pool + validator_pool
    assert sum(paid.values()) + sum(refunded.values()) == sum(cost for *_, cost in tally.fees)
    return EpochSummary(
        epoch=tally.epoch, height=height, floor_ppm=tally.floor_ppm,
        inferences=len(tally.fees), expired=sum(r.expired for r in tally.peers.values()),
        checked=tally.checked, disputes=tally.disputes, disputes_invalid=tally.disputes_invalid,
        reward=executor_pool + validator_pool, minted=minted, forfeited=forfeited,
        fees_paid=sum(paid.values()), fees_refunded=sum(refunded.values()),
        refunds=tuple(sorted(refunds.items())), participants=tuple(rows))


def process_epoch_settlement(state: LedgerState, ctx: BlockContext, epoch: int) -> EpochSummary:
    """The one place an epoch's economics close, at the end of ``settlement_height(epoch)``.

    Tallies the epoch (:func:`tally_epoch`), decides (:func:`settle_epoch`), then applies:
    each settled inference's fee moves from the executor's pending fees to the executor, or
    back to its client if the executor was caught; rewards are minted; reputations, weights
    and counters are updated; the summary is stored; the epoch before is pruned.
    """
    tally = tally_epoch(state, epoch)
    summary = settle_epoch(tally, state.params, ctx.height)
    caught = {row.peer for row in summary.participants if row.caught}
    moved: dict[str, int] = {}
    for iid, executor, client, cost in tally.fees:
        record = state.inferences.rows[iid]
        assert record.payout is Payout.PENDING, f"inference {iid.hex()} settled twice"
        refund = executor in caught
        state.credit(client if refund else executor, cost)
        moved[executor] = moved.get(executor, 0) + cost
        state.inferences.put(iid, replace(record, payout=Payout.REFUNDED if refund else Payout.PAID))
    for executor, amount in sorted(moved.items()):
        remaining = state.pending_fees(executor) - amount
        if remaining < 0:
            raise InvariantViolation(f"settling epoch {epoch} took {amount} of {executor}'s pending fees "
                                     f"of {remaining + amount}")
        if remaining:
            state.fees.put(executor, remaining)
        elif executor in state.fees:
            state.fees.delete(executor)
    minted_before = state.minted
    for row in summary.participants:
        state.mint(row.peer, row.executor_reward + row.validator_reward)
        participant = state.registry.rows[row.peer]
        state.registry.put(row.peer, replace(
            participant, reputation_ppm=row.reputation_after,
            weight=row.weight_after, sanctioned=participant.sanctioned or bool(row.caught),
            caught=participant.caught + bool(row.caught), sprt_carry=row.sprt_carry,
            overturned=participant.overturned + row.overturned))
    if state.minted - minted_before != summary.minted:
        raise InvariantViolation(f"epoch {epoch} minted {state.minted - minted_before}, "
                                 f"its summary says {summary.minted}")
    state.summaries.put(epoch, summary)
    state.prune_epochs_before(epoch)
    return summary


def process_epoch_start(state: LedgerState, ctx: BlockContext, epoch: int) -> None:
    """Rotate the validator set: freeze ``epoch``'s weights (the participants table's, after any
    settlement in this block) and its validation floor from the traffic of the epoch that just
    ended (its settled inferences per executor, capped at each one's fair share)."""
    settled: dict[str, int] = {}
    for iid in state.epoch_inferences(epoch - 1):
        record = state.inferences.rows[iid]
        if record.status is InferenceStatus.SETTLED:
            settled[record.executor] = settled.get(record.executor, 0) + 1
    traffic = floor_traffic(settled, epoch_executors(state, epoch - 1))
    validators = tuple((peer, weight) for peer, weight in state.weights().items()
                       if not state.registry.rows[peer].sanctioned)  # sanctioned: validates nothing more
    state.epochs.put(epoch, EpochInfo(traffic=traffic, floor_ppm=validation_floor_ppm(traffic, state.params),
                                      validators=validators, draw_weights=draw_table(state)))


def end_block(state: LedgerState, ctx: BlockContext) -> None:
    process_expiries(state, ctx)
    process_held_deadlines(state, ctx)
    process_replay_memory(state, ctx)
    process_dispute_deadlines(state, ctx)
    settling = epoch_settled_at(ctx.height, state.params)
    if settling is not None:
        process_epoch_settlement(state, ctx, settling)
    process_poc(state, ctx)
    if is_epoch_end(ctx.height, state.params):
        process_epoch_start(state, ctx, epoch_after(ctx.height, state.params))


def format_epoch_summary(summary: EpochSummary, names: Mapping[str, str] | None = None) -> str:
    """The settlement of an epoch as a table for people (``names``: peer id -> label)."""
    def name(peer: str) -> str:
        return (names or {}).get(peer, peer[-8:])

    lines = [f"epoch {summary.epoch} settled at height {summary.height}: "
             f"{summary.inferences} inferences ({summary.checked} checked, {summary.expired} expired), "
             f"floor m = {summary.floor_ppm / PPM:.0%}, {summary.disputes} disputes "
             f"({summary.disputes_invalid} invalid)",
             f"  fees paid {summary.fees_paid}, refunded {summary.fees_refunded}; reward {summary.reward}: "
             f"minted {summary.minted}, forfeited {summary.forfeited}",
             f"  {'participant':<12} {'weight':>6} {'inf':>4} {'fees':>7} {'refund':>7} {'duties':>9} "
             f"{'votes':>5} {'reward':>8} {'forfeit':>8}  {'reputation':<12} notes"]
    for row in sorted(summary.participants, key=lambda r: name(r.peer)):
        duties = f"{row.done}/{row.duties}" if row.revealed else ("unrevealed" if row.committed else "-")
        notes = []
        if row.caught:
            notes.append(f"CAUGHT ({row.caught})")
        if row.forfeit:
            notes.append("forfeits: " + ", ".join(row.forfeit))
        if row.overturned:
            notes.append(f"{row.overturned} accusation(s) overturned")
        if row.weight_after != row.weight:
            notes.append(f"weight -> {row.weight_after}")
        lines.append(
            f"  {name(row.peer):<12} {row.weight:>6} {row.inferences:>4} {row.fees_paid:>7} "
            f"{row.fees_refunded:>7} {duties:>9} {row.votes:>5} "
            f"{row.executor_reward + row.validator_reward:>8} {row.forfeited:>8}  "
            f"{row.reputation_before / PPM:.2f} -> {row.reputation_after / PPM:.2f} {'; '.join(notes)}")
    for client, amount in summary.refunds:
        lines.append(f"  refunded {amount} to client {name(client)}")
    return "\n".join(lines)
