"""The dispute's rules: who may accuse, who judges, what decides, what it costs. Pure functions.

A dispute is how one failed check becomes a conviction. The threat it is
built against (issue 11): a coalition holding c < 1/3 of the weight that
accuses honest work to take the honest participants' weight (which is also
consensus voting power). Four rules stop it; the state machine applies them
in :mod:`~gonka_p2p.ledger.tx_rules` and :mod:`~gonka_p2p.ledger.end_of_block`.

1. **Only a duty can fail work.** A failing ``Validation`` carries the
   accuser's epoch seed -- an early reveal: the ledger checks that it opens
   the seed commitment (made in the epoch before, when the inference did not
   exist) and that it makes the inference the accuser's duty
   (``duties.is_validation_duty``). A pass needs no proof: duties are counted
   at the reveal, as before. Why this rather than a bond or a committee seat:
   the duty is the one thing the protocol already assigns by secret,
   unbiasable randomness, so an accuser cannot pick its target -- it can
   only accuse where its seed put it, about p * w / W of the epoch's work.
   The price of the early reveal is that the accuser's remaining duties of
   the epoch become public; every other validator's stay secret, so a
   cheater still faces at least 1 - (1 - p)^(1 - w/W) of the checks.

2. **An overturned accusation costs the accuser.** Every validator whose
   failed check a committee overturns forfeits its whole epoch reward and
   its reputation (``rules.forfeit_reasons``, ``rules.reputation_after_epoch``),
   while convicting honest work needs the committee majority of rule 3: for
   a coalition that is a certain loss against a chance <= 2.1e-8 per
   dispute.

3. **Committees nobody chooses, large enough.** A round's committee is
   drawn at the end of the block ``dispute_draw_delay_blocks`` after the
   round starts (:func:`dispute_draw_height`), from that block's hash -- not
   the accusing block's, which the accuser and its proposer could steer --
   as ``dispute_committee_size`` = n seats by weight, with replacement,
   over the epoch's whole validator set (:func:`draw_committee`), and
   seated by :func:`seat_committee`: the executor's seats (and anyone's
   sanctioned) are *recused* -- they count in n but never vote; the
   accuser's count as "invalid" votes already cast, since its failing
   Validation *is* its vote (it cannot vote again); everyone else votes,
   the TA included: the ledger checks the executor draw, so the TA is no
   party to the executor's work. :func:`dispute_outcome` convicts only on
   a strict majority of all n seats and clears on half of them.

   Why framing stays closed. A coalition holding c < 1/3 of the weight,
   whatever it accuses (as accuser, TA, or both), holds Bin(n, c) seats:
   c * n < n/2 in expectation. Honest members re-run the work and vote
   "valid" on honest work, so a conviction needs the coalition's own seats
   to be a strict majority of all n -- counting the accuser's seats as
   votes gives it nothing it could not vote anyway, and recused seats
   still count in the total, so recusing never raises anyone's share. The
   tail bound is therefore unchanged: P(Bin(n, c) > n/2)
   (:func:`committee_capture_probability`) is, at c = 1/3, 2.6e-1 for
   n = 3, 3.1e-3 for 63, 1.0e-6 for 191 and 2.1e-8 for the default 255.
   Symmetrically, a cheating executor's coalition of c < 1/3 cannot clear
   it: it needs half of all seats voting "valid" and its executor's seats
   vote neither way.
   Why small networks convict. With three equal participants (executor,
   TA, validator; the demo) the accuser and the TA together hold about 2/3
   of the seats, so a proven cheat is convicted; recusing the TA and the
   accuser too, as before, recused every seat and paid the cheater.
   The limit: an executor drawn to half of the seats or more can never be
   convicted (its recused seats leave a strict majority out of reach; the
   dispute ends UNDECIDED). That is why a participant's voting power must
   be capped below half -- issue 12 caps it at 1/3, where such a draw has
   the same probability 2.1e-8 -- and why a sanction, not a vote, is what
   removes a convicted executor's seats from later disputes.
   What a later proposer can still grind: the proposer of the draw block
   may try variants of its block (transaction order, time within the drift
   consensus allows) before proposing one; each try captures with
   probability <= 2.1e-8, so 48 tries stay under 1e-6 -- that margin is why
   n is 255 and not 191 -- and the draw block's proposer is a coalition
   member only in the rounds the rotation gives it. Seats are counted per
   seat, never per member, so a member holding k seats casts k: the vote
   stays weighted when the validators are few.

4. **Silence is not innocence, nor guilt.** A round that closes with
   neither majority (e.g. nobody voted) draws a fresh committee, up to
   ``dispute_max_rounds`` rounds; a member's vote counts again if it is
   redrawn (the accuser's, its failing Validation, in every round), and
   every member that left a round's seats empty is counted as
   missed (it forfeits its epoch reward). After the last round the dispute
   is UNDECIDED: the executor keeps its pay (its observation comes from the
   passing checks alone) and the accuser is not penalized. A silent
   coalition gains nothing: its seats are below half with the probability
   above, so silence makes no majority for either side; it only costs the
   silent their reward. Only a mass outage of honest validators leaves a
   dispute undecided, and then punishing either side would punish the honest.

**Sanctions move voting power slowly.** A conviction sanctions the executor
at once (``Participant.sanctioned``: it is drawn for no new client, and its
committee seats are recused), but its weight -- voting power -- falls only
at epoch settlement, by :func:`weight_cuts`: at most ``max_weight_shift_ppm``
of the total per settlement.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, NamedTuple

from gonka_p2p.ledger.records import InferenceStatus, ValidationView, ValidatorDuty
from gonka_p2p.ledger.duties import is_validation_duty
from gonka_p2p.ledger.rules import DisputeOutcome, duty_threshold, shift_budget, weighted_pick

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params
    from gonka_p2p.ledger.state import LedgerState

_COMMITTEE_DOMAIN = b"gonka-p2p/dispute-committee/v2\x00"


def draw_committee(validators: Mapping[str, int], draw_hash: bytes, inference_id: bytes, round_: int,
                   seats: int) -> tuple[tuple[str, int], ...]:
    """(peer, seats held), sorted by peer: ``seats`` seats drawn by weight with replacement; seat
    s of round r is the :func:`~gonka_p2p.ledger.rules.weighted_pick` over ``validators`` from
    H(draw hash, inference id, r, s). Parties are not removed here (:func:`seat_committee`
    seats them), so a peer's seat count is Bin(seats, w / W) and a coalition's Bin(seats, its share).
    Empty when no validator has weight."""
    held: dict[str, int] = {}
    for seat in range(seats):
        draw = hashlib.sha256(_COMMITTEE_DOMAIN + draw_hash + inference_id + round_.to_bytes(4, "big")
                              + seat.to_bytes(4, "big")).digest()
        peer = weighted_pick(validators, draw)
        if peer is None:
            return ()
        held[peer] = held.get(peer, 0) + 1
    return tuple(sorted(held.items()))


class Seating(NamedTuple):
    """A drawn committee, seated: who votes, with how many seats, and the accuser's seats."""

    voters: tuple[tuple[str, int], ...]  # (member, seats), sorted by member: they vote
    accuser_seats: int  # counted as "invalid": its failing Validation is its vote


def seat_committee(drawn: tuple[tuple[str, int], ...], executor: str, accuser: str,
                   sanctioned: Collection[str]) -> Seating:
    """Seat a :func:`draw_committee` draw (rule 3 above): the executor's and the sanctioned
    seats are recused (counted in the total, voting neither way); the accuser's count as its
    vote, "invalid"; every other member, the TA included, votes."""
    voters = tuple((peer, seats) for peer, seats in drawn
                   if peer not in (executor, accuser) and peer not in sanctioned)
    accuser_seats = 0 if accuser in sanctioned else dict(drawn).get(accuser, 0)
    return Seating(voters, accuser_seats)


def committee_capture_probability(seats: int, share: Fraction) -> Fraction:
    """P(Bin(seats, share) > seats / 2), exactly: the chance that a coalition holding ``share``
    of the weight draws a strict majority of a committee's seats."""
    assert seats >= 1 and 0 <= share <= 1
    return sum((math.comb(seats, k) * share**k * (1 - share) ** (seats - k)
                for k in range(seats // 2 + 1, seats + 1)), Fraction(0))


def dispute_outcome(invalid_seats: int, valid_seats: int, seats: int) -> DisputeOutcome:
    """INVALID needs a strict majority of all ``seats`` (the accuser's among ``invalid_seats``;
    recused and silent seats count against it); VALID needs half of them; neither (yet): UNDECIDED. Both at once is impossible."""
    assert invalid_seats >= 0 and valid_seats >= 0 and invalid_seats + valid_seats <= seats
    if 2 * invalid_seats > seats:
        return DisputeOutcome.INVALID
    if 2 * valid_seats >= seats:
        return DisputeOutcome.VALID
    return DisputeOutcome.UNDECIDED


def dispute_draw_height(round_start: int, params: Params) -> int:
    """The height at whose end a round's committee is drawn, from that block's hash: later than
    the block that started the round, so neither the accuser nor its proposer chose it."""
    return round_start + params.dispute_draw_delay_blocks


def dispute_deadline(round_start: int, params: Params) -> int:
    """The last height whose block may carry a DisputeVote of the round that started at
    ``round_start``; the round closes at its end."""
    return round_start + params.dispute_voting_blocks


def weight_cuts(power: Mapping[str, int], sanctioned: Collection[str], shift_ppm: int) -> dict[str, int]:
    """The weight (voting power) each sanctioned participant loses at one settlement.

    Sanctioned participants lose all their weight, in peer-id order, but one settlement moves
    at most ``shift_ppm`` of the total (rounded up, so a small network still moves); the rest
    waits for the next settlement (a sanctioned participant already does no work meanwhile).
    Why a bound: a Byzantine share f of the voting power is at most f / (1 - shift) after one
    settlement, so at the default 10 % a coalition below 30 % stays below 1/3 even if every
    unit moved were honest; and each change applies at one committed height on every replica."""
    budget = shift_budget(sum(power.values()), shift_ppm)
    cuts = {}
    for peer in sorted(sanctioned):
        cut = min(power.get(peer, 0), budget)
        if cut:
            cuts[peer] = cut
            budget -= cut
    return cuts


def validation_view(state: LedgerState, inference_id: bytes) -> ValidationView | None:
    """Everything the ledger knows about checking one settled inference: p, each eligible
    validator's weight, duty (once its seed is revealed) and check, and the dispute."""
    record = state.inferences.get(inference_id)
    if record is None or record.status is not InferenceStatus.SETTLED:
        return None
    epoch = state.inference_epoch(record)
    candidates = state.validation_candidates(inference_id)
    total = sum(candidates.values())
    rows = []
    for peer, weight in sorted(candidates.items()):
        commitment = state.commitments.rows[(epoch, peer)]
        duty = None
        if commitment.revealed:
            duty = is_validation_duty(commitment.seed, record.duty_point, record.validation_ppm,
                                      weight, total)
        rows.append(ValidatorDuty(peer, weight, duty_threshold(record.validation_ppm, weight, total),
                                  duty, state.checks.get((inference_id, peer)),
                                  state.votes.get((inference_id, peer))))
    return ValidationView(inference_id, epoch, record.executor, record.ta, record.validation_ppm,
                          tuple(rows), state.disputes.get(inference_id))
