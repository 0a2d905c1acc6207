"""Admission of remote messages to the consensus core: which proposals and votes count.

Part of :class:`~gonka_p2p.ledger.consensus.ConsensusState` (its base class), kept apart
because it is the one place a peer's bytes meet the state machine: every check an
attacker's message must pass before it is stored, counted or acted on, in the order that
keeps the costly ones last -- well-formed, this height (else buffered, dropped or a sign
that we are behind), not yet decided, within the round lookahead, from a member (and the
round's proposer), new, within the sender's room for future rounds, and only then the
signature. A second message for one slot is equivocation: reported once per height, kept
only while someone else supports its value. A dropped message raises :class:`Ignored`,
counted by reason in ``ConsensusState.ignored``.

The per-height state it reads and writes is the state machine's (``_reset_height``), and an
admitted message makes the rules of Algorithm 1 run (``_advance``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from gonka_p2p.ledger.commit_checks import verified
from gonka_p2p.ledger.consensus_log import MessageLog
from gonka_p2p.ledger.consensus_types import (
    Action,
    ConsensusError,
    ConsensusParams,
    Evidence,
    Proposal,
    ReportEvidence,
    RequestCommit,
    Step,
    ValidateBlock,
    Validator,
    ValidatorSet,
    VerifyFn,
    Vote,
    well_formed_proposal,
    well_formed_vote,
)

Message = Proposal | Vote


class Ignored(ConsensusError):
    """A remote message was dropped; ``reason`` names why (counted in ``ConsensusState.ignored``)."""


class MessageAdmission:
    """The admission half of :class:`~gonka_p2p.ledger.consensus.ConsensusState` (module docstring)."""

    # The state machine's, read and written here (see ConsensusState).
    chain_id: str
    params: ConsensusParams
    evidence: list[Evidence]
    _verify: VerifyFn
    _height: int
    _round: int
    _step: Step
    _validators: ValidatorSet | None
    _buffer: dict[str, list[Message]]
    _log: MessageLog
    _validity: dict[bytes, bool]
    _validation_requested: set[bytes]
    _evidenced: set[tuple[object, ...]]
    _catchup_allowed: bool
    _vals: ValidatorSet
    _advance: Callable[[], list[Action]]
    ignored: Counter[str]

    def _admit_proposal(self, p: Proposal) -> list[Action]:
        if not well_formed_proposal(p, self.params.max_block_bytes):
            raise Ignored("malformed")
        if p.height != self._height:
            return self._other_height(p, p.proposer)
        if self._step is Step.COMMIT:
            raise Ignored("decided")
        if p.round > self._round + self.params.max_round_lookahead:
            raise Ignored("round_too_far")
        proposer = self._member(p.proposer)
        if p.proposer != self._vals.proposer(p.round):
            raise Ignored("not_proposer")
        existing = self._log.proposals.get(p.round)
        if existing is not None and (existing.block, existing.pol_round) == (p.block, p.pol_round):
            raise Ignored("duplicate")
        self._check_round_room(p.proposer, p.round)
        if not verified(self._verify, proposer, p.sign_bytes(self.chain_id), p.signature):
            raise Ignored("bad_signature")
        if existing is not None:
            return self._equivocation(existing, p, ("proposal", p.round, p.proposer))
        self._log.add_proposal(p, proposer.power)
        return self._request_validation(p) + self._advance()

    def _admit_vote(self, v: Vote) -> list[Action]:
        if not well_formed_vote(v):
            raise Ignored("malformed")
        if v.height != self._height:
            return self._other_height(v, v.validator)
        if self._step is Step.COMMIT:
            raise Ignored("decided")
        validator = self._member(v.validator)
        if self._log.has_vote(v):
            raise Ignored("duplicate")
        self._check_round_room(v.validator, v.round)
        first = self._log.first_vote(v.round, v.type, v.validator)
        slot = (v.type, v.round, v.validator)
        if first is not None and slot in self._evidenced and not self._log.supported(v):
            raise Ignored("equivocation")  # already reported, and for a value nobody else wants
        if not verified(self._verify, validator, v.sign_bytes(self.chain_id), v.signature):
            raise Ignored("bad_signature")
        actions = self._equivocation(first, v, slot) if first is not None else []
        if first is not None and not self._log.supported(v):
            return actions
        self._log.add_vote(v, validator.power)
        return actions + self._advance()

    def _member(self, address: str) -> Validator:
        if self._validators is None:
            raise Ignored("not_started")
        validator = self._vals.get(address)
        if validator is None:
            raise Ignored("not_a_validator")
        return validator

    def _check_round_room(self, sender: str, round: int) -> None:
        """Bound what one validator can make us store about rounds ahead of ours."""
        if round <= self._round:
            return
        future = self._log.future_rounds(sender, self._round)
        if round not in future and len(future) >= self.params.max_future_rounds:
            raise Ignored("too_many_future_rounds")

    def _other_height(self, m: Message, sender: str) -> list[Action]:
        """Stale messages are dropped; next-height ones are buffered; any later one means we are behind."""
        if self._validators is None:
            raise Ignored("not_started")
        if m.height < self._height:
            raise Ignored("old_height")
        if self._vals.get(sender) is None:
            raise Ignored("not_a_validator")
        if m.height == self._height + 1:
            queue = self._buffer.setdefault(sender, [])
            if len(queue) < self.params.max_buffered_per_validator:
                queue.append(m)
        if self._step is Step.COMMIT or not self._catchup_allowed:
            return []
        self._catchup_allowed = False
        return [RequestCommit(self._height, sender)]

    def _equivocation(self, first: Message, second: Message, slot: tuple[object, ...]) -> list[Action]:
        if slot in self._evidenced:
            return []
        self._evidenced.add(slot)
        evidence = Evidence(first, second)
        self.evidence.append(evidence)
        return [ReportEvidence(evidence)]

    def _request_validation(self, p: Proposal) -> list[Action]:
        if p.block_hash in self._validity or p.block_hash in self._validation_requested:
            return []
        self._validation_requested.add(p.block_hash)
        return [ValidateBlock(self._height, p.block_hash, p.block)]
