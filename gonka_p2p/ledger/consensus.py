"""Tendermint BFT consensus for the ledger, as a sans-I/O state machine.

Theory of operation
-------------------
This is Algorithm 1 of Buchman, Kwon and Milosevic, "The latest gossip on
BFT consensus" (2018). A :class:`ConsensusState` is one replica deciding one
height at a time. It is driven by *events* (method calls) and answers each
with a list of *actions* (dataclasses from :mod:`consensus_types`) that the
caller -- the ledger replica actor, or the simulator -- must execute **in
order**. It holds no randomness, no socket, no thread, and reads the shell's
clock only to stamp the votes it signs: the same events at the same clock
readings give the same actions, which is what lets ``sim/consensus_sim.py``
replay a whole network from one seed.

    event (call)                          typical actions (returned)
    start(height, validators)             ScheduleTimeout, RequestProposal | Broadcast
    on_proposal(proposal)                 ValidateBlock, PersistSafety + Broadcast(vote), Commit
    on_vote(vote)                         PersistSafety + Broadcast(vote), ScheduleTimeout, Commit,
                                          ReportEvidence, RequestCommit
    on_timeout(timeout)                   PersistSafety + Broadcast(vote), ScheduleTimeout
    on_proposal_value(height, round, b)   PersistSafety + Broadcast(proposal)
    on_block_validated(block_hash, ok)    PersistSafety + Broadcast(vote), Commit
    on_commit_certificate(block, cert)    Commit

After every event the replica evaluates the "upon" rules of Algorithm 1
until none fires; each rule is one short method named after its line in the
paper (``_line22_...`` to ``_line55_...``), so the code can be read side by
side with the pseudo-code. "2f+1" is *more than 2/3 of the voting power*,
"f+1" *more than 1/3* (:meth:`ValidatorSet.is_quorum`, ``is_one_third``):
power, never head count, decides.

Invariants (asserted or enforced where the state changes)
---------------------------------------------------------
* A replica signs at most one message per (height, round, step): every
  signature goes through :meth:`_signer`, which demands a position strictly
  after :class:`SafetyState`, and the new state is emitted as
  ``PersistSafety`` *before* the ``Broadcast`` that carries the signature. A
  shell that persists it and restores it (``ConsensusState(safety=...)``)
  cannot be made to equivocate by a crash. The lock is part of that state,
  and so is what keeps a height alive when every replica restarts in it
  (validValue with its proof-of-lock, our recent votes: see SafetyState).
* A validator's power counts at most once in any tally. A second, different
  signed vote for the same (height, round, type) is equivocation: it is kept
  as :class:`Evidence` and reported once; it never adds to the "any" tallies
  (lines 34, 47, 55) and counts for its own value only if somebody else
  voted that value too (see :class:`MessageLog` for why it must count).
* ``Commit`` is emitted at most once per height, and only for a block that
  either has >2/3 precommits in our own log *and* was declared valid by the
  application, or comes with a certificate that :func:`~gonka_p2p.ledger.commit_checks.verify_commit` accepts.
* Remote input never raises. Malformed, unsigned, forged, unauthorised or
  stale messages are dropped and counted in :attr:`ConsensusState.ignored`.
  Exceptions are raised only for caller bugs (:class:`UsageError`).

Where the paper leaves things to the environment
------------------------------------------------
1. ``valid(v)`` is asynchronous: a new block is handed out as
   ``ValidateBlock`` and the rules that need ``valid(v)`` wait for
   ``on_block_validated``. The core never executes transactions. A block the
   replica built itself is valid by construction.
2. ``getValue()`` is asynchronous: the proposer emits ``RequestProposal`` and
   proposes when ``on_proposal_value`` answers (the application may first have
   to apply the previous block). Because of this every replica, the proposer
   included, schedules timeoutPropose; a slow builder costs a round, not
   liveness.
3. The paper assumes gossip eventually delivers every message a correct
   replica received to every correct replica. On a lossy transport somebody
   must make that true: while a height stays open, every
   ``rebroadcast_interval_ms`` the replica re-sends its own messages, relays
   the votes of its current and previous round and the proof-of-lock of its
   validValue (:meth:`ConsensusState._rebroadcast`).
4. Catch-up. A replica that sees a message from a later height, or a
   precommit quorum for a block it never received, knows the height was
   decided without it: it emits ``RequestCommit`` (at most once per
   rebroadcast interval) and commits the block when ``on_commit_certificate``
   brings it with a certificate that :func:`~gonka_p2p.ledger.commit_checks.verify_commit` accepts (the
   >2/3 that signed it include an honest replica that validated it).
5. Only the first proposal per round is kept; a second, different one from
   the same proposer is evidence. Messages for the next height are buffered
   (a few per validator) and replayed by ``start``; bounded lookahead
   (``max_future_rounds``, ``max_round_lookahead``) keeps a byzantine
   validator from filling memory with far-future rounds.
6. One rule beyond the paper, which changes only what a replica proposes:
   a proof-of-lock learned after its round is over still updates validValue
   (:meth:`ConsensusState._late_proof_of_lock`), so a lock formed with an
   equivocator's help is released at the next honest proposer's turn rather
   than at the locked replica's own.

Driving it (the replica actor)
------------------------------
Execute actions in list order. ``PersistSafety``: write it durably, then go
on. ``Broadcast``: encode and publish (the core already applied it to its own
log; echoing it back is harmless); a re-broadcast repeats an earlier message
on purpose, so the transport must not swallow it as a duplicate (gossipsub's
seen-cache would: give each publication its own envelope). ``ScheduleTimeout``: call ``on_timeout``
after the duration, never cancel. ``RequestProposal``/``ValidateBlock``: ask
the application, answer with the matching event. ``Commit``: store the block
and certificate, apply it, compute the next height's validator set
(:meth:`ValidatorSet.next_height`, plus any power changes via ``updated``)
and call ``start(height + 1, validators)``. ``RequestCommit``: fetch the
block and certificate of that height from ``peer`` (or anyone) and call
``on_commit_certificate``. ``ReportEvidence``: submit it as a transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from gonka_p2p.identity import digest
from gonka_p2p.ledger.commit_checks import verify_commit
from gonka_p2p.ledger.consensus_admission import Ignored, Message, MessageAdmission
from gonka_p2p.ledger.consensus_log import MessageLog
from gonka_p2p.ledger.consensus_types import (
    NEVER_SIGNED,
    STEP_OF_VOTE,
    Action,
    Broadcast,
    Commit,
    DEFAULT_PARAMS,
    ClockFn,
    CommitCertificate,
    ConsensusParams,
    Evidence,
    InvalidCommit,
    PersistSafety,
    Proposal,
    RequestCommit,
    RequestProposal,
    SafetyState,
    ScheduleTimeout,
    SignFn,
    Step,
    Timeout,
    TimeoutKind,
    UsageError,
    Validator,
    ValidatorSet,
    VerifyFn,
    Vote,
    VoteType,
    make_proposal,
    make_vote,
)

# --------------------------------------------------------------------------- the state machine


class ConsensusState(MessageAdmission):
    """One replica's Tendermint state machine. See the module docstring for the contract; which
    remote messages count is :class:`~gonka_p2p.ledger.consensus_admission.MessageAdmission`'s."""

    # Algorithm 1's per-height variables, reset by _reset_height.
    _round: int
    _step: Step
    _locked_round: int
    _locked_hash: bytes | None
    _valid_round: int
    _valid_block: bytes | None
    _valid_hash: bytes | None
    _log: MessageLog
    _validity: dict[bytes, bool]  # the application's verdicts on this height's blocks
    _validation_requested: set[bytes]
    _fired: set[tuple[int, int]]  # (line, round) of the "for the first time" rules that fired
    _own: list[Message]  # what we signed at this height, for rebroadcast
    _evidenced: set[tuple[object, ...]]  # slots already reported: each offence once, every height anew
    _catchup_allowed: bool  # RequestCommit at most once per rebroadcast interval

    def __init__(self, *, chain_id: str, verify: VerifyFn, address: str | None = None, sign: SignFn | None = None,
                 clock_ms: ClockFn | None = None, params: ConsensusParams = DEFAULT_PARAMS,
                 safety: SafetyState | None = None) -> None:
        """``address``/``sign``/``clock_ms`` identify our validator key and stamp our votes; leave all
        three out to follow without voting.

        ``safety`` is the last :class:`SafetyState` this replica persisted
        (from ``PersistSafety``), or None if it never signed anything.
        """
        if not (address is None) == (sign is None) == (clock_ms is None):
            raise UsageError("bad_identity", "give address, sign and clock_ms, or none of them")
        self.chain_id = chain_id
        self.params = params
        self._verify = verify
        self._key = None if address is None or sign is None else (address, sign)
        self._clock_ms = clock_ms
        self._safety = safety or NEVER_SIGNED
        self.evidence: list[Evidence] = []
        self.ignored: Counter[str] = Counter()
        self._buffer: dict[str, list[Message]] = {}  # next-height messages by sender
        self._height = -1
        self._validators: ValidatorSet | None = None
        self._reset_height(None)

    # ---- read-only view --------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._height

    @property
    def round(self) -> int:
        return self._round

    @property
    def step(self) -> Step:
        return self._step

    @property
    def locked_round(self) -> int:
        return self._locked_round

    @property
    def valid_round(self) -> int:
        return self._valid_round

    @property
    def safety(self) -> SafetyState:
        """The last (height, round, step) this replica signed, with its lock: persist it, restore it."""
        return self._safety

    @property
    def validators(self) -> ValidatorSet | None:
        return self._validators

    @property
    def _vals(self) -> ValidatorSet:
        assert self._validators is not None, "only reached after the started-height checks"
        return self._validators

    # ---- events ----------------------------------------------------------------------

    def start(self, height: int, validators: ValidatorSet) -> list[Action]:
        """Begin ``height`` with its validator set: at boot (last committed + 1), then after each Commit."""
        if self._height >= 0 and not (self._step is Step.COMMIT and height == self._height + 1):
            raise UsageError("bad_start", f"start({height}) while at height {self._height}, step {self._step.name}")
        if height < 0 or not isinstance(validators, ValidatorSet):
            raise UsageError("bad_start", "height must be >= 0 and validators a ValidatorSet")
        self._height = height
        self._validators = validators
        restored = self._safety if self._safety.height == height else None
        self._reset_height(restored)
        actions: list[Action] = [self._schedule(TimeoutKind.REBROADCAST)]
        actions += self._start_round(restored.round if restored else 0)
        actions += self._advance()
        buffered, self._buffer = self._buffer, {}
        for messages in buffered.values():
            for m in messages:
                if m.height == height:
                    actions += self.on_proposal(m) if isinstance(m, Proposal) else self.on_vote(m)
        return actions

    def on_proposal(self, proposal: Proposal) -> list[Action]:
        """A proposal from the network (any height or round; checked here)."""
        try:
            return self._admit_proposal(proposal)
        except Ignored as e:
            self.ignored[e.reason] += 1
            return []

    def on_vote(self, vote: Vote) -> list[Action]:
        """A prevote or precommit from the network (any height or round; checked here)."""
        try:
            return self._admit_vote(vote)
        except Ignored as e:
            self.ignored[e.reason] += 1
            return []

    def on_timeout(self, timeout: Timeout) -> list[Action]:
        """A timer scheduled by ``ScheduleTimeout`` fired; stale timers do nothing (lines 57-66)."""
        if timeout.height != self._height or self._step is Step.COMMIT:
            return []
        if timeout.kind is TimeoutKind.REBROADCAST:
            return self._rebroadcast()
        if timeout.round != self._round:
            return []
        if timeout.kind is TimeoutKind.PROPOSE and self._step is Step.PROPOSE:
            return self._prevote(None) + self._advance()
        if timeout.kind is TimeoutKind.PREVOTE and self._step is Step.PREVOTE:
            return self._precommit(None) + self._advance()
        if timeout.kind is TimeoutKind.PRECOMMIT:
            return self._start_round(self._round + 1) + self._advance()
        return []

    def on_proposal_value(self, height: int, round: int, block: bytes) -> list[Action]:
        """The application's answer to ``RequestProposal``; late answers are dropped."""
        if self._validators is None or (height, round) != (self._height, self._round):
            return []
        if self._step is not Step.PROPOSE:
            return []
        if round in self._log.proposals or not self._is_proposer(round):
            return []
        if not isinstance(block, bytes) or len(block) > self.params.max_block_bytes:
            raise UsageError("bad_block", "the application built a block that is not bytes or too large")
        self._validity[digest(block)] = True  # we built it
        return self._propose(block, -1) + self._advance()

    def on_block_validated(self, block_hash: bytes, valid: bool) -> list[Action]:
        """The application's answer to ``ValidateBlock`` for this height; others are dropped."""
        if block_hash not in self._validation_requested or block_hash in self._validity:
            return []
        self._validity[block_hash] = bool(valid)
        return self._advance()

    def on_commit_certificate(self, block: bytes, certificate: CommitCertificate) -> list[Action]:
        """Catch-up: a decided block of our current height with its certificate, fetched from a peer."""
        if self._validators is None or self._step is Step.COMMIT:
            self.ignored["not_needed"] += 1
            return []
        if not isinstance(block, bytes) or not isinstance(certificate, CommitCertificate):
            self.ignored["malformed"] += 1
            return []
        try:
            verify_commit(self._validators, self._height, digest(block), certificate, self._verify,
                          chain_id=self.chain_id)
        except InvalidCommit as e:
            self.ignored[f"certificate_{e.reason}"] += 1
            return []
        return self._decide(block, certificate)

    # ---- the rules of Algorithm 1 ----------------------------------------------------

    def _advance(self) -> list[Action]:
        """Fire rules until none applies; each firing changes state so that it cannot fire again."""
        rules: tuple[Callable[[], list[Action] | None], ...] = (
            self._line49_decide, self._line55_skip_round, self._line22_prevote_fresh_proposal,
            self._line28_prevote_reproposal, self._line34_prevote_timeout, self._line36_lock,
            self._line44_precommit_nil, self._line47_precommit_timeout, self._late_proof_of_lock,
        )
        actions: list[Action] = []
        fired = True
        while fired and self._step is not Step.COMMIT:
            fired = False
            for rule in rules:
                out = rule()
                if out is not None:
                    actions += out
                    fired = True
                    break
        return actions

    def _line22_prevote_fresh_proposal(self) -> list[Action] | None:
        """Proposal with validRound -1: prevote it if valid and we are unlocked or locked on it."""
        p = self._log.proposals.get(self._round)
        if self._step is not Step.PROPOSE or p is None or p.pol_round != -1:
            return None
        valid = self._validity.get(p.block_hash)
        if valid is None:
            return None
        ok = valid and (self._locked_round == -1 or self._locked_hash == p.block_hash)
        return self._prevote(p.block_hash if ok else None)

    def _line28_prevote_reproposal(self) -> list[Action] | None:
        """Re-proposal backed by 2f+1 prevotes in its validRound: prevote it unless locked later on another."""
        p = self._log.proposals.get(self._round)
        if self._step is not Step.PROPOSE or p is None or p.pol_round < 0:
            return None
        if not self._vals.is_quorum(self._log.power_for(p.pol_round, VoteType.PREVOTE, p.block_hash)):
            return None
        valid = self._validity.get(p.block_hash)
        if valid is None:
            return None
        ok = valid and (self._locked_round <= p.pol_round or self._locked_hash == p.block_hash)
        return self._prevote(p.block_hash if ok else None)

    def _line34_prevote_timeout(self) -> list[Action] | None:
        """2f+1 prevotes for anything: give the rest timeoutPrevote to arrive."""
        if self._step is not Step.PREVOTE or (34, self._round) in self._fired:
            return None
        if not self._vals.is_quorum(self._log.power_any(self._round, VoteType.PREVOTE)):
            return None
        self._fired.add((34, self._round))
        return [self._schedule(TimeoutKind.PREVOTE)]

    def _line36_lock(self) -> list[Action] | None:
        """Valid proposal with 2f+1 prevotes this round: it is validValue; lock on it and precommit it if prevoting."""
        p = self._log.proposals.get(self._round)
        if self._step is Step.PROPOSE or p is None or (36, self._round) in self._fired:
            return None
        if self._validity.get(p.block_hash) is not True:
            return None
        if not self._vals.is_quorum(self._log.power_for(self._round, VoteType.PREVOTE, p.block_hash)):
            return None
        self._fired.add((36, self._round))
        self._valid_round, self._valid_block, self._valid_hash = self._round, p.block, p.block_hash
        if self._step is not Step.PREVOTE:
            return []
        self._locked_round, self._locked_hash = self._round, p.block_hash
        return self._precommit(p.block_hash)  # persists the lock with the validValue that justifies it

    def _line44_precommit_nil(self) -> list[Action] | None:
        """2f+1 nil prevotes: precommit nil."""
        if self._step is not Step.PREVOTE:
            return None
        if not self._vals.is_quorum(self._log.power_for(self._round, VoteType.PREVOTE, None)):
            return None
        return self._precommit(None)

    def _line47_precommit_timeout(self) -> list[Action] | None:
        """2f+1 precommits for anything: give the rest timeoutPrecommit, then move to the next round."""
        if (47, self._round) in self._fired:
            return None
        if not self._vals.is_quorum(self._log.power_any(self._round, VoteType.PRECOMMIT)):
            return None
        self._fired.add((47, self._round))
        return [self._schedule(TimeoutKind.PRECOMMIT)]

    def _line49_decide(self) -> list[Action] | None:
        """A valid proposal of any round with 2f+1 precommits for it: decide it."""
        for round, p in self._log.proposals.items():
            if self._validity.get(p.block_hash) is True and self._vals.is_quorum(
                    self._log.power_for(round, VoteType.PRECOMMIT, p.block_hash)):
                return self._decide(p.block, self._certificate(round, p.block_hash))
        return None

    def _late_proof_of_lock(self) -> list[Action] | None:
        """Not in Algorithm 1: a proof-of-lock for a past round newer than validRound also updates validValue.

        Line 36 only looks at the current round, so a replica shown a
        split prevote by an equivocator learns of the quorum (relayed) after
        the round is over, and keeps proposing fresh blocks that a replica
        locked in that round must reject; the lock then holds until the
        locked replica itself proposes. validValue only decides what we
        propose (line 16), never how we vote, and others check the proof
        themselves (line 28), so following a newer proof is always safe.
        """
        for round, p in self._log.proposals.items():
            if (self._valid_round < round < self._round and self._validity.get(p.block_hash) is True
                    and self._vals.is_quorum(self._log.power_for(round, VoteType.PREVOTE, p.block_hash))):
                self._valid_round, self._valid_block, self._valid_hash = round, p.block, p.block_hash
                return []
        return None

    def _line55_skip_round(self) -> list[Action] | None:
        """f+1 of the power is already in a later round: join the latest such round."""
        later = [r for r, who in self._log.senders.items()
                 if r > self._round and self._vals.is_one_third(sum(who.values()))]
        return self._start_round(max(later)) if later else None

    # ---- transitions -----------------------------------------------------------------

    def _start_round(self, round: int) -> list[Action]:
        """StartRound (line 11): propose validValue or a fresh block if it is our turn; arm timeoutPropose."""
        self._round, self._step = round, Step.PROPOSE
        actions: list[Action] = []
        if self._is_proposer(round) and self._signer(Step.PROPOSE) is not None:
            if self._valid_block is not None:
                actions += self._propose(self._valid_block, self._valid_round)
            else:
                actions.append(RequestProposal(self._height, round))
        actions.append(self._schedule(TimeoutKind.PROPOSE))
        return actions

    def _propose(self, block: bytes, pol_round: int) -> list[Action]:
        signer = self._signer(Step.PROPOSE)
        if signer is None:
            return []
        me, sign = signer
        proposal = make_proposal(self.chain_id, sign, me.address, self._height, self._round, pol_round, block)
        actions = self._signed(Step.PROPOSE, proposal)
        self._log.add_proposal(proposal, me.power)
        if pol_round >= 0:  # hand out the proof-of-lock with the re-proposal (line 28 needs it)
            actions += [Broadcast(v) for v in self._log.votes_for(pol_round, VoteType.PREVOTE, proposal.block_hash)
                        if v.validator != me.address]
        return actions

    def _prevote(self, block_hash: bytes | None) -> list[Action]:
        self._step = Step.PREVOTE
        return self._vote(VoteType.PREVOTE, block_hash)

    def _precommit(self, block_hash: bytes | None) -> list[Action]:
        self._step = Step.PRECOMMIT
        return self._vote(VoteType.PRECOMMIT, block_hash)

    def _vote(self, vote_type: VoteType, block_hash: bytes | None) -> list[Action]:
        signer = self._signer(STEP_OF_VOTE[vote_type])
        if signer is None:
            return []
        me, sign = signer
        assert self._clock_ms is not None, "a replica with a key has a clock"
        vote = make_vote(self.chain_id, sign, me.address, vote_type, self._height, self._round, block_hash,
                         self._clock_ms())
        actions = self._signed(STEP_OF_VOTE[vote_type], vote)
        self._log.add_vote(vote, me.power)
        return actions

    def _signer(self, step: Step) -> tuple[Validator, SignFn] | None:
        """Our entry and key if we may sign ``step`` here: a validator of this height, never signed at or after it."""
        if self._key is None or not self._safety.allows(self._height, self._round, step):
            return None
        me = self._vals.get(self._key[0])
        return None if me is None else (me, self._key[1])

    def _signed(self, step: Step, message: Message) -> list[Action]:
        """Record the signature in the safety state (persisted first), remember and send the message."""
        assert self._safety.allows(self._height, self._round, step), "never sign twice at one position"
        self._own.append(message)
        proof = self._log.votes_for(self._valid_round, VoteType.PREVOTE, self._valid_hash) if self._valid_hash else []
        recent = [m for m in self._own if isinstance(m, Vote) and m.round >= self._round - 1]
        self._safety = SafetyState(self._height, self._round, step, self._locked_round, self._locked_hash,
                                   self._valid_round, self._valid_block, tuple(proof), tuple(recent))
        return [PersistSafety(self._safety), Broadcast(message)]

    def _decide(self, block: bytes, certificate: CommitCertificate) -> list[Action]:
        assert self._step is not Step.COMMIT, "one decision per height"
        self._step = Step.COMMIT
        return [Commit(self._height, block, certificate)]

    def _certificate(self, round: int, block_hash: bytes) -> CommitCertificate:
        precommits = sorted(self._log.votes_for(round, VoteType.PRECOMMIT, block_hash), key=lambda v: v.validator)
        return CommitCertificate(self._height, round, block_hash, tuple(precommits))

    def _rebroadcast(self) -> list[Action]:
        """The height is open for a whole interval: re-send what others may lack, fetch what we lack.

        Re-sent: our own votes of the height and our proposal of this round;
        every vote we hold for this round and the previous one (the messages
        that moved us here, which a replica left behind needs to follow: a
        byzantine validator may have shown them to us alone); and the
        prevotes that justify our validValue (the proof-of-lock line 28
        needs). The timer is per height, so a height that decides within one
        interval costs no extra traffic.
        """
        self._catchup_allowed = True
        messages: list[Message] = [m for m in self._own if isinstance(m, Vote) or m.round == self._round]
        for round in (self._round - 1, self._round):
            messages += self._log.votes_in_round(round)
        if self._valid_hash is not None:
            messages += self._log.votes_for(self._valid_round, VoteType.PREVOTE, self._valid_hash)
        actions: list[Action] = [Broadcast(m) for m in dict.fromkeys(messages)]
        missed = self._missed_decision()
        if missed is not None:
            self._catchup_allowed = False
            actions.append(RequestCommit(self._height, missed))
        actions.append(self._schedule(TimeoutKind.REBROADCAST))
        return actions

    def _missed_decision(self) -> str | None:
        """A precommitter of a block that has 2f+1 precommits here but whose proposal we never got."""
        for round, block_hash, voter in self._log.precommit_quorums(self._vals.is_quorum):
            held = self._log.proposals.get(round)
            if held is None or held.block_hash != block_hash:
                return voter
        return None

    def _schedule(self, kind: TimeoutKind) -> ScheduleTimeout:
        return ScheduleTimeout(Timeout(kind, self._height, self._round), self.params.timeout_ms(kind, self._round))

    def _is_proposer(self, round: int) -> bool:
        return self._key is not None and self._vals.proposer(round) == self._key[0]

    def _reset_height(self, restored: SafetyState | None) -> None:
        """Initial values of Algorithm 1 for a new height.

        A restart in the middle of a height keeps its lock and resumes in the
        round it last signed in: locks only ever move to later rounds. It also
        gets back its validValue with the proof-of-lock, to re-propose at its
        turn (line 16), and its recent votes, to re-send (``_rebroadcast``):
        see :class:`SafetyState` for why the height would stall without them.
        Both were admitted (or signed) at this height before the crash.
        """
        self._round = 0
        self._step = Step.PROPOSE
        self._locked_round = restored.locked_round if restored else -1
        self._locked_hash = restored.locked_hash if restored else None
        self._valid_round = -1
        self._valid_block = None
        self._valid_hash = None
        self._log = MessageLog()
        self._validity = {}
        self._validation_requested = set()
        self._fired = set()
        self._own = []
        self._evidenced = set()
        self._catchup_allowed = True
        if restored is None:
            return
        if restored.valid_block is not None:
            self._valid_round, self._valid_block = restored.valid_round, restored.valid_block
            self._valid_hash = digest(restored.valid_block)
            self._validity[self._valid_hash] = True
        for vote in (*restored.proof_of_lock, *restored.votes):
            member = self._vals.get(vote.validator)
            if member is not None and not self._log.has_vote(vote):
                self._log.add_vote(vote, member.power)
        self._own = list(restored.votes)
