"""The ledger's records: the immutable values its tables hold, and the views its queries return.

Every record is a frozen dataclass; a rule changes state only by putting a
new record in place of the old (``dataclasses.replace``), never by mutating
one, so a record read before a block is still true of that moment after it,
and the tables (:mod:`gonka_p2p.ledger.tables`) see every change. Coin
amounts are integers in coin units, rates integers in parts per million.

Lifecycles::

    inference status:  STARTED --Finish--> SETTLED (payout PENDING --settlement--> PAID | REFUNDED)
                       STARTED --deadline passes--> EXPIRED
                       (FINISHED: a Finish is held, its Start not yet committed)
    dispute:           OPEN (round r: draw pending --draw height--> voting) --a majority of all
                       seats--> INVALID | VALID; --round closes undecided--> round r+1, or
                       UNDECIDED after the last round

:class:`EpochSummary` (with a :class:`ParticipantOutcome` per participant) is
what settlement decided; :class:`ValidationView` and :class:`ValidatorDuty` are
query results, never stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType

from gonka_p2p.ledger.rules import DisputeOutcome
from gonka_p2p.ledger.transactions import VerdictStats


class InferenceStatus(StrEnum):
    STARTED = "started"
    FINISHED = "finished"  # only reported by queries: a Finish is held, its Start not committed
    SETTLED = "settled"
    EXPIRED = "expired"


class Payout(StrEnum):
    """Where a settled inference's fee goes: decided when its epoch settles."""

    NONE = "none"  # no fee: running, or expired (refunded in full)
    PENDING = "pending"  # charged; waits in the executor's pending fees for the epoch's settlement
    PAID = "paid"  # paid to the executor
    REFUNDED = "refunded"  # returned to the client: the executor was caught this epoch


@dataclass(frozen=True, slots=True)
class Account:
    balance: int  # coin units, spendable
    sequence: int  # the sequence this account's next transaction must carry


@dataclass(frozen=True, slots=True)
class Participant:
    pubkey: bytes
    weight: int  # voting power and executor-draw weight (from genesis for now)
    addrs: tuple[str, ...]
    models: tuple[str, ...]  # sorted, unique, each priced in genesis
    completed: int  # inferences this participant settled as executor
    missed: int  # inferences that expired in its hands
    reputation_ppm: int = 0  # r in [0, PPM]: lowers how often its work is checked
    caught: int = 0  # epochs in which it was caught cheating (work proven invalid or SPRT)
    overturned: int = 0  # its failed verdicts that a dispute majority overturned
    sanctioned: bool = False  # its work was proven invalid: never drawn again; weight falls at settlement
    model_weights: tuple[tuple[str, int], ...] = ()  # proof of compute's weight per model, sorted; () = unsplit
    sprt_carry: tuple[int, int, int] = (0, 0, 0)  # micro-nats: its epoch test, carried to the next (epoch_test.py)

    def weight_for(self, model: str) -> int:
        """Its executor-draw weight for ``model``: proven compute on it. An empty split means
        weight no round has split: on a network without proof of compute, or genesis weight
        before its holder proves anything -- weight that bootstraps every model it lists. Once a
        round splits a weight it stays split (``poc_rounds.split_basis``,
        ``poc.scaled_model_weights``), so proof on one model never becomes weight on another."""
        if not self.model_weights:
            return self.weight if model in self.models else 0
        return dict(self.model_weights).get(model, 0)


@dataclass(frozen=True, slots=True)
class Inference:
    client: str
    ta: str
    executor: str
    model: str
    price: int  # coin units per token, fixed at Start
    max_tokens: int
    prompt_bound: int  # tokens, see rules.prompt_token_bound
    escrow: int  # coin units locked at Start
    request_ms: int  # the client's signed timestamp
    start_height: int
    deadline: int  # last height at which a Finish is accepted
    status: InferenceStatus
    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_hash: bytes = b""
    artifact_commitment: bytes = b""
    cost: int = 0  # coin units charged to the client (paid to the executor at epoch end)
    closed_height: int = 0  # height at which it settled or expired
    validation_ppm: int = 0  # p: the probability it is checked, fixed when it settled
    payout: Payout = Payout.NONE
    attempt: int = 0  # the executor draw it was started at (rules.choose_executor): skips are attributable
    duty_point: int = 0  # its point on the duty ring (duties.duty_point), fixed when it settles

    @property
    def billable_tokens(self) -> int:
        """The tokens the client paid for (the claim, capped at the escrow): the work it counts as."""
        return self.cost // self.price if self.price else 0

    @property
    def locked(self) -> int:
        """Coins this record holds out of every balance: its escrow while it runs."""
        return self.escrow if self.status is InferenceStatus.STARTED else 0


@dataclass(frozen=True, slots=True)
class HeldFinish:
    """A FinishInference accepted before its StartInference; keyed by (inference id, executor)."""

    prompt_tokens: int
    completion_tokens: int
    response_hash: bytes
    artifact_commitment: bytes
    deadline: int  # dropped at the end of this height if its Start has not come

    def as_inference(self, executor: str) -> Inference:
        """What queries show of an inference whose Start has not committed: its executor's claims."""
        return Inference(client="", ta="", executor=executor, model="", price=0, max_tokens=0,
                         prompt_bound=0, escrow=0, request_ms=0, start_height=0,
                         deadline=self.deadline, status=InferenceStatus.FINISHED,
                         prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                         response_hash=self.response_hash, artifact_commitment=self.artifact_commitment)


@lru_cache(maxsize=64)
def _weight_map(validators: tuple[tuple[str, int], ...]) -> Mapping[str, int]:
    return MappingProxyType(dict(validators))


@dataclass(frozen=True, slots=True)
class EpochInfo:
    """What an epoch froze when it began: its validator set and its validation floor."""

    traffic: int  # inferences settled in the previous epoch, capped per executor (rules.floor_traffic)
    floor_ppm: int  # m = validation_floor_ppm(traffic)
    validators: tuple[tuple[str, int], ...]  # (peer, voting power > 0), sorted: at its start
    draw_weights: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # model -> ((peer, weight > 0))

    @property
    def weights(self) -> Mapping[str, int]:
        return _weight_map(self.validators)

    def model_weights(self, model: str) -> Mapping[str, int]:
        """The executor draw's table for ``model``: weights proven on it, frozen at its start."""
        for name, table in self.draw_weights:
            if name == model:
                return _weight_map(table)
        return _weight_map(())


@dataclass(frozen=True, slots=True)
class PocRound:
    """One proof-of-compute round of an epoch; keyed by (epoch, poc.RoundKind)."""

    start: int  # its first compute height
    work_seed: bytes  # fixed by the block before ``start``
    sample_seed: bytes = b""  # fixed at the end of its secret phase
    newcomers: int = 0  # commitments that registered a new key


@dataclass(frozen=True, slots=True)
class PocEntry:
    """One commitment of a round; keyed by (epoch, round kind, prover, model)."""

    root: bytes
    count: int
    secret_hash: bytes
    secret: bytes = b""  # empty until opened
    leaves: tuple[bytes, ...] = ()  # the sampled leaves, once opened (proofs checked)
    passed: int = 0  # voting power of the validators that recomputed them and agree
    failed: int = 0  # ... and that disagree
    voters: tuple[str, ...] = ()  # sorted

    @property
    def opened(self) -> bool:
        return bool(self.leaves)


@dataclass(frozen=True, slots=True)
class SeedCommitment:
    """A validator's commitment to its secret seed for one epoch; keyed by (epoch, validator)."""

    commitment: bytes
    height: int  # where it was committed
    seed: bytes = b""  # empty until revealed
    revealed_height: int = 0
    duties: int = 0  # counted at reveal: the inferences the seed made it check
    done: int = 0  # of those, checked (by a Validation or a DisputeVote)

    @property
    def revealed(self) -> bool:
        return bool(self.seed)

    @property
    def skipped(self) -> int:
        return self.duties - self.done


@dataclass(frozen=True, slots=True)
class Check:
    """A validator's verdict on an inference (a Validation or a DisputeVote); keyed by (id, validator).

    Distances are in nano-nats (1e-9 natural-log units), capped at
    ``transactions.MAX_DISTANCE_NANO`` (which also stands for "could not compare").
    """

    height: int
    valid: bool
    suspicious: bool
    failure_flags: int  # transactions.FailureFlag bits; 0 iff valid
    n_tokens: int
    mean_distance_nano: int
    max_distance_nano: int
    top_k_misses: int
    sampling_mismatches: int

    @classmethod
    def of(cls, verdict: VerdictStats, height: int) -> Check:
        return cls(height, verdict.valid, verdict.suspicious, verdict.failure_flags, verdict.n_tokens,
                   verdict.mean_distance_nano, verdict.max_distance_nano, verdict.top_k_misses,
                   verdict.sampling_mismatches)


@dataclass(frozen=True, slots=True)
class Dispute:
    """A failed check under review by a committee, in rounds; keyed by inference id.

    Each round draws its committee at the end of ``draw_height`` from that block's hash
    (``disputes.draw_committee``), then takes votes until ``deadline``. The committee lists only
    the members who may vote; the accuser's seats count as its "invalid" vote (``accuser_seats``);
    the executor's and the sanctioned are recused: ``params.dispute_committee_size - sum(seats)
    - accuser_seats``, counted in the total, voting neither way (``disputes.seat_committee``)."""

    epoch: int  # the inference's epoch
    executor: str
    ta: str
    accuser: str  # the validator whose failed verdict opened it
    opened_height: int
    draw_height: int  # the current round's committee is drawn at the end of this height, from its hash
    deadline: int  # the end of this height is its next step: the draw (== draw_height), or the round's close
    rounds: int = 1  # rounds started so far, the current one included
    committee: tuple[str, ...] = ()  # the current round's voting members, sorted; () until drawn
    seats: tuple[int, ...] = ()  # seats held by each committee member, in the same order
    accuser_seats: int = 0  # the current round's seats drawn for the accuser: "invalid" votes
    members: tuple[str, ...] = ()  # everyone seated in any round, sorted (whose votes it may hold)
    silent: tuple[str, ...] = ()  # one entry per member and round in which it left its seats empty
    outcome: DisputeOutcome = DisputeOutcome.OPEN
    invalid_seats: int = 0  # seats whose holder voted "invalid", when it resolved
    valid_seats: int = 0
    resolved_height: int = 0

    @property
    def voting(self) -> bool:
        """Is the current round's committee drawn (its votes accepted until ``deadline``)?"""
        return self.deadline > self.draw_height


@dataclass(frozen=True, slots=True)
class ParticipantOutcome:
    """One participant's line in an epoch's settlement. Coin amounts in coin units."""

    peer: str
    weight: int  # in the epoch's validator set (0: not in it)
    inferences: int  # settled as executor in the epoch
    expired: int  # expired in its hands
    tokens: int  # billable tokens of its settled inferences
    checked: int  # of its settled inferences, those at least one validator checked
    fees_paid: int  # fees paid to it
    fees_refunded: int  # fees of its inferences returned to the clients (it was caught)
    committed: bool  # committed a seed for the epoch
    revealed: bool
    duties: int  # the checks its revealed seed required
    done: int  # of those, done
    checks: int  # Validations it submitted for the epoch (duties or not)
    votes: int  # DisputeVotes it cast
    missed_votes: int  # committee seats it left empty
    overturned: int  # its failed verdicts overturned by a committee majority
    work: int  # validation work: tokens of the duties it did (its share is paid unless it forfeits)
    executor_reward: int  # minted to it for executing
    validator_reward: int  # minted to it for validating
    forfeited: int  # the reward it would have had, not minted
    forfeit: tuple[str, ...]  # rules.Forfeit values: why
    caught: str  # "" | "dispute" | "sprt"
    reputation_before: int  # ppm
    reputation_after: int  # ppm
    weight_after: int  # in the participants table after this settlement (rules.weight_cuts)
    sprt_carry: tuple[int, int, int] = (0, 0, 0)  # micro-nats: its epoch test carried to the next epoch


@dataclass(frozen=True, slots=True)
class EpochSummary:
    """The outcome of one epoch's settlement: who was paid what, who forfeited, who was caught."""

    epoch: int
    height: int  # where it settled
    floor_ppm: int  # the epoch's validation floor m
    inferences: int  # settled in the epoch
    expired: int
    checked: int  # settled inferences at least one validator checked
    disputes: int
    disputes_invalid: int
    reward: int  # the epoch's reward (both pools)
    minted: int  # of it, minted (paid)
    forfeited: int  # shares not minted because of forfeits (the rest of reward - minted is dust)
    fees_paid: int
    fees_refunded: int
    refunds: tuple[tuple[str, int], ...]  # (client, coins refunded), sorted
    participants: tuple[ParticipantOutcome, ...]  # sorted by peer

    def participant(self, peer: str) -> ParticipantOutcome | None:
        return next((row for row in self.participants if row.peer == peer), None)


@dataclass(frozen=True)
class ValidatorDuty:
    """One eligible validator of an inference, as :meth:`LedgerState.validation_view` shows it."""

    peer: str
    weight: int
    threshold: int  # duty iff its 64-bit draw H(seed || id) is below; threshold / 2^64 = q_v
    duty: bool | None  # None while its seed is secret
    check: Check | None
    vote: Check | None

    @property
    def q(self) -> float:
        return self.threshold / 2**64


@dataclass(frozen=True)
class ValidationView:
    inference_id: bytes
    epoch: int
    executor: str
    ta: str
    p_ppm: int
    validators: tuple[ValidatorDuty, ...]
    dispute: Dispute | None

