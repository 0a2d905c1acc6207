"""Consensus data: validators, signed messages, certificates, parameters, actions.

Everything the Tendermint core (:mod:`gonka_p2p.ledger.consensus`) exchanges
with its I/O shell is defined here as plain frozen dataclasses, so that the
shell, the wire codec, the ledger and the simulator can share them without
importing the state machine.

Signing. The core never holds a key: it is given a ``sign(message) -> bytes``
callable for its own messages and a ``verify(public_key, signature, message)
-> bool`` callable for everyone else's -- the same shape as
:func:`gonka_p2p.identity.verify_signature` and :meth:`Keypair.sign`, so the
real secp256k1 pair plugs in directly and the simulator can plug in a cheap
stand-in. What is signed is :func:`vote_sign_bytes` /
:func:`proposal_sign_bytes`: a domain tag, the chain id (a signature for one
network can never be replayed on another), the step, height and round, and
the block *hash* (never the block: a proposal signature stays small and a
certificate can be checked without the block's bytes). A vote also signs its
time, the signer's clock: the precommit times of one commit decide the next
block's time (:func:`gonka_p2p.ledger.commit_checks.bft_time_ms`), so no proposer
chooses it.

Blocks are opaque bytes to consensus; a block's identity is SHA-256 of those
bytes (:func:`gonka_p2p.identity.digest`), which the core computes itself and
never takes from the sender. ``None`` is the *nil* block hash of Algorithm 1.

Proposer rotation is CometBFT's proposer-priority algorithm (weighted round
robin): each election every validator's priority grows by its power, the
highest priority proposes and pays the total power back. Over any P
consecutive elections of a fixed set of total power P, a validator of power
w proposes exactly w times. :class:`ValidatorSet` carries the priorities of
one height; round r's proposer is the (r+1)-th election from them, and the
next height's set is :meth:`ValidatorSet.next_height` (exactly one election
later, whatever round decided), so proposers depend on committed state only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from functools import cached_property
from typing import TypeGuard

import msgpack

from gonka_p2p.identity import digest

HASH_BYTES = 32
MAX_SIGNATURE_BYTES = 128
MAX_VALIDATORS = 1024  # the most validators one set (and so one commit) may hold
_DOMAIN = "gonka-p2p/consensus/v2"  # v2: votes sign their time

SignFn = Callable[[bytes], bytes]
"""Signs a message with the replica's own key (e.g. ``Keypair.sign``)."""

VerifyFn = Callable[[bytes, bytes, bytes], bool]
"""``verify(public_key, signature, message)``, e.g. ``identity.verify_signature``; must never raise."""

ClockFn = Callable[[], int]
"""The shell's clock in integer ms since the epoch: the time our votes sign (virtual in the simulator)."""


# --------------------------------------------------------------------------- errors


class ConsensusError(Exception):
    """Base of every error this package raises. ``reason`` is a stable code, ``str()`` is for people."""

    reason = "consensus_error"

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class UsageError(ConsensusError):
    """The caller drove the state machine against its contract (a bug in the shell, not remote input)."""


class InvalidCommit(ConsensusError):
    """A commit certificate does not prove that the block was committed at that height."""


class InvalidEvidence(ConsensusError):
    """An evidence record does not prove that a validator signed two conflicting messages."""


# --------------------------------------------------------------------------- enums


class VoteType(IntEnum):
    PREVOTE = 1
    PRECOMMIT = 2


class Step(IntEnum):
    """A replica's step within a round; the order is the order of signing within a round."""

    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2
    COMMIT = 3  # the height is decided; waiting for ``start(height + 1)``


STEP_OF_VOTE = {VoteType.PREVOTE: Step.PREVOTE, VoteType.PRECOMMIT: Step.PRECOMMIT}


class TimeoutKind(Enum):
    PROPOSE = "propose"
    PREVOTE = "prevote"
    PRECOMMIT = "precommit"
    REBROADCAST = "rebroadcast"  # periodic re-send of this height's messages (lossy transports)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ConsensusParams:
    """Every tunable of the core, with units. Durations are integer milliseconds of shell time.

    Timeouts grow linearly with the round (``base + round * delta``), so after
    the network stabilises some round is long enough for all honest replicas
    to hear each other (the eventual-synchrony argument of the paper).
    """

    timeout_propose_ms: int = 3000
    timeout_propose_delta_ms: int = 500
    timeout_prevote_ms: int = 1000
    timeout_prevote_delta_ms: int = 500
    timeout_precommit_ms: int = 1000
    timeout_precommit_delta_ms: int = 500
    rebroadcast_interval_ms: int = 2000  # how often own messages are re-sent while a height is open
    max_block_bytes: int = 4 * 1024 * 1024  # proposals with a larger block are malformed
    max_future_rounds: int = 2  # distinct rounds above ours one validator may occupy in our log
    max_round_lookahead: int = 1000  # proposals further ahead than this are dropped (bounds proposer work)
    max_buffered_per_validator: int = 8  # next-height messages kept per sender until we get there

    def timeout_ms(self, kind: TimeoutKind, round: int) -> int:
        """Duration of ``kind`` in ``round``; rebroadcast does not grow."""
        if kind is TimeoutKind.PROPOSE:
            return self.timeout_propose_ms + round * self.timeout_propose_delta_ms
        if kind is TimeoutKind.PREVOTE:
            return self.timeout_prevote_ms + round * self.timeout_prevote_delta_ms
        if kind is TimeoutKind.PRECOMMIT:
            return self.timeout_precommit_ms + round * self.timeout_precommit_delta_ms
        return self.rebroadcast_interval_ms


DEFAULT_PARAMS = ConsensusParams()


# --------------------------------------------------------------------------- validators


@dataclass(frozen=True)
class Validator:
    address: str  # the peer id derived from ``public_key``
    public_key: bytes
    power: int


class ValidatorSet:
    """The validators of one height, their voting power and proposer priorities.

    Immutable to its users; proposers for successive rounds are computed
    lazily and cached. Validators are kept sorted by address, which also
    breaks priority ties (smaller address first), so every replica holding
    the same set computes the same proposers.
    """

    def __init__(self, validators: Iterable[Validator], priorities: Mapping[str, int] | None = None) -> None:
        vals = tuple(sorted(validators, key=lambda v: v.address))
        if not vals:
            raise ValueError("a validator set needs at least one validator")
        for v in vals:
            if not isinstance(v.power, int) or isinstance(v.power, bool) or v.power <= 0:
                raise ValueError(f"validator {v.address} has non-positive power {v.power!r}")
        self._validators = vals
        self._index = {v.address: i for i, v in enumerate(vals)}
        if len(self._index) != len(vals):
            raise ValueError("duplicate validator address")
        self.total_power = sum(v.power for v in vals)
        prio = priorities or {}
        self._priorities = tuple(prio.get(v.address, 0) for v in vals)
        self._proposers: list[int] = []  # proposer index of round r, filled on demand
        self._cursor = list(self._priorities)  # priorities after len(_proposers) elections

    @property
    def validators(self) -> tuple[Validator, ...]:
        return self._validators

    @property
    def priorities(self) -> dict[str, int]:
        """Priorities at the start of this height: what the ledger persists with the set."""
        return {v.address: p for v, p in zip(self._validators, self._priorities)}

    def __len__(self) -> int:
        return len(self._validators)

    def get(self, address: str) -> Validator | None:
        i = self._index.get(address) if isinstance(address, str) else None
        return None if i is None else self._validators[i]

    def is_quorum(self, power: int) -> bool:
        """"2f+1" of the paper: strictly more than two thirds of the total power."""
        return 3 * power > 2 * self.total_power

    def is_one_third(self, power: int) -> bool:
        """"f+1" of the paper: strictly more than one third, so at least one honest validator."""
        return 3 * power > self.total_power

    def proposer(self, round: int) -> str:
        """Address of the proposer of ``round`` at this height (the (round+1)-th election)."""
        while len(self._proposers) <= round:
            self._proposers.append(_elect(self._cursor, self._validators, self.total_power))
        return self._validators[self._proposers[round]].address

    def next_height(self) -> ValidatorSet:
        """The same validators one election later: the set of the next height."""
        cursor = list(self._priorities)
        _elect(cursor, self._validators, self.total_power)
        return ValidatorSet(self._validators, dict(zip((v.address for v in self._validators), cursor)))

    def updated(self, changes: Iterable[Validator]) -> ValidatorSet:
        """Apply power changes (power 0 removes a validator), as CometBFT does.

        A newcomer starts at priority -1.125 x the new total power, so it
        cannot propose at once by joining or re-joining; then priorities are
        rescaled to a window of 2 x total power and centred on zero, so a big
        power change cannot starve or flood anybody for long.
        """
        current = {v.address: v for v in self._validators}
        prio = self.priorities
        for v in changes:
            if v.power == 0:
                current.pop(v.address, None)
                prio.pop(v.address, None)
            else:
                current[v.address] = v
        total = sum(v.power for v in current.values())
        for address in current:
            prio.setdefault(address, -(total + total // 8))
        return ValidatorSet(current.values(), _centre(_rescale(prio, 2 * total)))


def _elect(priorities: list[int], validators: tuple[Validator, ...], total: int) -> int:
    """One election in place: everyone gains its power, the highest (ties: lowest address) pays ``total``."""
    for i, v in enumerate(validators):
        priorities[i] += v.power
    best = max(range(len(priorities)), key=lambda i: (priorities[i], -i))
    priorities[best] -= total
    return best


def _rescale(prio: dict[str, int], window: int) -> dict[str, int]:
    spread = max(prio.values()) - min(prio.values()) if prio else 0
    if spread <= window:
        return prio
    ratio = -(-spread // window)  # ceil
    return {a: _div_toward_zero(p, ratio) for a, p in prio.items()}


def _centre(prio: dict[str, int]) -> dict[str, int]:
    avg = sum(prio.values()) // len(prio) if prio else 0
    return {a: p - avg for a, p in prio.items()}


def _div_toward_zero(a: int, b: int) -> int:
    return -((-a) // b) if a < 0 else a // b


# --------------------------------------------------------------------------- messages


def vote_sign_bytes(chain_id: str, vote_type: int, height: int, round: int, block_hash: bytes | None,
                    time_ms: int) -> bytes:
    return msgpack.packb([_DOMAIN, chain_id, "vote", int(vote_type), height, round, block_hash, time_ms])


def proposal_sign_bytes(chain_id: str, height: int, round: int, pol_round: int, block_hash: bytes) -> bytes:
    return msgpack.packb([_DOMAIN, chain_id, "proposal", height, round, pol_round, block_hash])


@dataclass(frozen=True)
class Vote:
    """⟨PREVOTE|PRECOMMIT, height, round, id(v) or nil⟩ signed by ``validator``."""

    type: VoteType
    height: int
    round: int
    block_hash: bytes | None  # None is nil
    validator: str
    time_ms: int  # the signer's clock when it signed (ms since the epoch)
    signature: bytes = b""

    def sign_bytes(self, chain_id: str) -> bytes:
        return vote_sign_bytes(chain_id, self.type, self.height, self.round, self.block_hash, self.time_ms)


@dataclass(frozen=True)
class Proposal:
    """⟨PROPOSAL, height, round, v, validRound⟩ signed by the round's proposer."""

    height: int
    round: int
    pol_round: int  # the proposer's validRound: -1, or the round whose prevotes justify re-proposing
    block: bytes
    proposer: str
    signature: bytes = b""

    @cached_property
    def block_hash(self) -> bytes:
        return digest(self.block)

    def sign_bytes(self, chain_id: str) -> bytes:
        return proposal_sign_bytes(chain_id, self.height, self.round, self.pol_round, self.block_hash)


def make_vote(chain_id: str, sign: SignFn, validator: str, vote_type: VoteType, height: int, round: int,
              block_hash: bytes | None, time_ms: int) -> Vote:
    unsigned = Vote(vote_type, height, round, block_hash, validator, time_ms)
    return Vote(vote_type, height, round, block_hash, validator, time_ms, sign(unsigned.sign_bytes(chain_id)))


def make_proposal(chain_id: str, sign: SignFn, proposer: str, height: int, round: int, pol_round: int,
                  block: bytes) -> Proposal:
    unsigned = Proposal(height, round, pol_round, block, proposer)
    return Proposal(height, round, pol_round, block, proposer, sign(unsigned.sign_bytes(chain_id)))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def well_formed_vote(v: object) -> TypeGuard[Vote]:
    """Type and range checks a remote vote must pass before anything else looks at it."""
    return (
        isinstance(v, Vote)
        and isinstance(v.type, VoteType)
        and _is_int(v.height) and v.height >= 0
        and _is_int(v.round) and v.round >= 0
        and (v.block_hash is None or (isinstance(v.block_hash, bytes) and len(v.block_hash) == HASH_BYTES))
        and isinstance(v.validator, str)
        and _is_int(v.time_ms) and v.time_ms >= 0
        and isinstance(v.signature, bytes) and len(v.signature) <= MAX_SIGNATURE_BYTES
    )


def well_formed_proposal(p: object, max_block_bytes: int) -> TypeGuard[Proposal]:
    return (
        isinstance(p, Proposal)
        and _is_int(p.height) and p.height >= 0
        and _is_int(p.round) and p.round >= 0
        and _is_int(p.pol_round) and -1 <= p.pol_round < p.round
        and isinstance(p.block, bytes) and len(p.block) <= max_block_bytes
        and isinstance(p.proposer, str)
        and isinstance(p.signature, bytes) and len(p.signature) <= MAX_SIGNATURE_BYTES
    )


@dataclass(frozen=True)
class CommitCertificate:
    """More than 2/3 of the power precommitted ``block_hash`` in one round of ``height``."""

    height: int
    round: int
    block_hash: bytes
    precommits: tuple[Vote, ...]


@dataclass(frozen=True)
class Evidence:
    """Two different messages one validator signed for the same (height, round, step): equivocation."""

    first: Vote | Proposal
    second: Vote | Proposal

    @property
    def validator(self) -> str:
        return self.first.validator if isinstance(self.first, Vote) else self.first.proposer

    @property
    def height(self) -> int:
        return self.first.height


@dataclass(frozen=True)
class SafetyState:
    """What must survive a crash so that the replica never equivocates, and the height still ends.

    Safety: (``height``, ``round``, ``step``) is the last thing it signed: it
    will sign only strictly later positions. ``locked_round``/``locked_hash``
    is its lock at that height (Algorithm 1's lockedRound/lockedValue),
    without which a restarted replica could prevote against a block it
    helped commit.

    Liveness (what Tendermint's write-ahead log replays): a lock alone would
    make a restarted replica refuse every block but one whose body and
    proof nobody may hold any more -- if every replica restarts, a height
    with two locked replicas never commits. So the state also carries
    ``valid_block`` (validValue, whose round is never before the lock's) with
    ``proof_of_lock``, the prevotes for it in ``valid_round``, so that the
    replica can re-propose it at its turn and the others can check the proof
    (line 28); and ``votes``, its own votes of its last two rounds, which it
    re-sends after a restart (it may not sign them again, and without them
    nobody could finish the round every replica crashed in).
    """

    height: int
    round: int
    step: Step
    locked_round: int = -1
    locked_hash: bytes | None = None
    valid_round: int = -1
    valid_block: bytes | None = None
    proof_of_lock: tuple[Vote, ...] = ()
    votes: tuple[Vote, ...] = ()

    def allows(self, height: int, round: int, step: Step) -> bool:
        return (height, round, int(step)) > (self.height, self.round, int(self.step))


NEVER_SIGNED = SafetyState(height=-1, round=-1, step=Step.PROPOSE)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Timeout:
    kind: TimeoutKind
    height: int
    round: int


@dataclass(frozen=True)
class Broadcast:
    """Send a signed message to every other validator (it is already applied locally)."""

    message: Vote | Proposal


@dataclass(frozen=True)
class ScheduleTimeout:
    """Call ``on_timeout(timeout)`` after ``duration_ms``. Timers are never cancelled; stale ones are ignored."""

    timeout: Timeout
    duration_ms: int


@dataclass(frozen=True)
class PersistSafety:
    """Make ``state`` durable *before* executing any later action of the same list."""

    state: SafetyState


@dataclass(frozen=True)
class RequestProposal:
    """We propose in (height, round): build a block and answer ``on_proposal_value(height, round, block)``."""

    height: int
    round: int


@dataclass(frozen=True)
class ValidateBlock:
    """Check the block against application state; answer ``on_block_validated(block_hash, ok)``."""

    height: int
    block_hash: bytes
    block: bytes


@dataclass(frozen=True)
class Commit:
    """``block`` is decided at ``height``. Persist it with its certificate, apply it, then ``start(height+1)``."""

    height: int
    block: bytes
    certificate: CommitCertificate


@dataclass(frozen=True)
class RequestCommit:
    """``height`` was decided without us (``peer`` showed it): fetch block and certificate for
    ``on_commit_certificate``."""

    height: int
    peer: str


@dataclass(frozen=True)
class ReportEvidence:
    """A validator equivocated; submit the evidence to the ledger."""

    evidence: Evidence


Action = (Broadcast | ScheduleTimeout | PersistSafety | RequestProposal | ValidateBlock | Commit | RequestCommit
          | ReportEvidence)
