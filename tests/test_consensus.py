"""Tendermint consensus core: one test per rule of Algorithm 1, then the seeded network simulation.

Unit tests look at one replica ("us", validator v0 unless said otherwise)
from the outside: they feed it signed messages from the other validators
(real secp256k1 keys) and read the actions it returns. The property tests
run whole networks in ``sim/consensus_sim.py`` over many seeds; every
failure names its seed and how to replay it.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gonka_p2p.identity import Keypair, digest, verify_signature
from gonka_p2p.ledger.commit_checks import verify_commit, verify_evidence
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import (
    Broadcast,
    Commit,
    CommitCertificate,
    ConsensusParams,
    Evidence,
    InvalidCommit,
    InvalidEvidence,
    PersistSafety,
    Proposal,
    ReportEvidence,
    RequestCommit,
    RequestProposal,
    ScheduleTimeout,
    Step,
    Timeout,
    TimeoutKind,
    UsageError,
    ValidateBlock,
    Validator,
    ValidatorSet,
    Vote,
    VoteType,
    make_proposal,
    make_vote,
)
from sim.consensus_sim import Network, Scenario, SimFailure, simulate

CHAIN = "test-chain"
T0 = 1_700_000_000_000  # every replica's clock here: only the block-time tests look at vote times
PARAMS = ConsensusParams()
PV, PC = VoteType.PREVOTE, VoteType.PRECOMMIT


class Cluster:
    """Validators v0..vn-1 with real keys; v0's ConsensusState is the replica under test."""

    def __init__(self, powers: list[int], me: int = 0, **state_kwargs: object) -> None:
        self.keys = [Keypair.from_seed(f"consensus-test-{i}".encode()) for i in range(len(powers))]
        self.addr = [k.peer_id for k in self.keys]
        self.valset = ValidatorSet(Validator(k.peer_id, k.public_key, p) for k, p in zip(self.keys, powers))
        self.me = me
        self.state = ConsensusState(chain_id=CHAIN, verify=verify_signature, address=self.addr[me],
                                    sign=self.keys[me].sign, clock_ms=lambda: T0,
                                    **state_kwargs)  # type: ignore[arg-type]

    def index_of(self, address: str) -> int:
        return self.addr.index(address)

    def proposer(self, round: int) -> int:
        return self.index_of(self.valset.proposer(round))

    def other_proposer_round(self) -> int:
        """The first round whose proposer is not us."""
        return next(r for r in range(100) if self.proposer(r) != self.me)

    def vote(self, i: int, vote_type: VoteType, round: int, block_hash: bytes | None, height: int = 1) -> Vote:
        return make_vote(CHAIN, self.keys[i].sign, self.addr[i], vote_type, height, round, block_hash, T0 + i)

    def proposal(self, round: int, block: bytes, pol_round: int = -1, height: int = 1,
                 by: int | None = None) -> Proposal:
        i = self.proposer(round) if by is None else by
        return make_proposal(CHAIN, self.keys[i].sign, self.addr[i], height, round, pol_round, block)

    def votes(self, who: list[int], vote_type: VoteType, round: int, block_hash: bytes | None) -> list:
        actions: list = []
        for i in who:
            actions += self.state.on_vote(self.vote(i, vote_type, round, block_hash))
        return actions


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: list, kind: type = Vote) -> list:
    return [a.message for a in of(actions, Broadcast) if isinstance(a.message, kind)]


def at_round_not_proposing(c: Cluster) -> int:
    """Start height 1 and move us to the first round where another validator proposes."""
    c.state.start(1, c.valset)
    r = c.other_proposer_round()
    skip_to(c, r)
    return r


def skip_to(c: Cluster, round: int) -> None:
    """Move us to ``round`` with nil precommits of others there (f+1 in a later round: line 55)."""
    for i in range(len(c.addr)):
        if c.state.round == round:
            return
        if i != c.me:
            c.state.on_vote(c.vote(i, PC, round, None))
    assert c.state.round == round


def valid_proposal(c: Cluster, round: int, block: bytes = b"block-A") -> list:
    actions = c.state.on_proposal(c.proposal(round, block))
    return actions + c.state.on_block_validated(digest(block), True)


# --------------------------------------------------------------------------- validator set


def test_proposer_rotation_is_weighted_round_robin():
    vals = [Validator(f"v{i}", b"k", p) for i, p in enumerate([1, 2, 3])]
    vs = ValidatorSet(vals)
    sequence = []
    for _ in range(600):  # 100 periods of total power 6, one election per height
        sequence.append(vs.proposer(0))
        vs = vs.next_height()
    for start in range(0, 600, 6):
        window = sequence[start:start + 6]
        assert (window.count("v0"), window.count("v1"), window.count("v2")) == (1, 2, 3)
    # within a height, round r is the (r+1)-th election: the same sequence
    genesis = ValidatorSet(vals)
    assert [genesis.proposer(r) for r in range(12)] == sequence[:12]


def test_proposer_depends_on_the_set_only():
    vals = [Validator(f"v{i}", b"k", p) for i, p in enumerate([5, 1, 4, 2])]
    a, b = ValidatorSet(vals), ValidatorSet(reversed(vals))
    assert [a.proposer(r) for r in range(50)] == [b.proposer(r) for r in range(50)]


def test_newcomer_does_not_propose_at_once_even_with_most_power():
    vs = ValidatorSet(Validator(f"v{i}", b"k", 10) for i in range(3))
    grown = vs.updated([Validator("big", b"k", 100)])
    assert grown.priorities["big"] < min(p for a, p in grown.priorities.items() if a != "big")
    assert grown.proposer(0) != "big"
    assert abs(sum(grown.proposer(r) == "big" for r in range(1300)) - 1000) <= 1  # its share, give or take one
    assert vs.updated([Validator("v1", b"k", 0)]).get("v1") is None


def test_quorum_thresholds_are_strict_fractions_of_power():
    vs = ValidatorSet(Validator(f"v{i}", b"k", p) for i, p in enumerate([3, 3, 3]))
    assert not vs.is_quorum(6) and vs.is_quorum(7)  # exactly 2/3 is not enough
    assert not vs.is_one_third(3) and vs.is_one_third(4)


# --------------------------------------------------------------------------- the rules


def test_happy_path_commits_with_a_verifiable_certificate():
    c = Cluster([1, 1, 1, 1])
    while c.proposer(0) != 0:  # advance the set until we propose round 0
        c.valset = c.valset.next_height()
    actions = c.state.start(1, c.valset)
    assert RequestProposal(1, 0) in actions
    assert ScheduleTimeout(Timeout(TimeoutKind.PROPOSE, 1, 0), PARAMS.timeout_propose_ms) in actions
    actions = c.state.on_proposal_value(1, 0, b"block-A")
    kinds = [type(a) for a in actions]
    assert kinds == [PersistSafety, Broadcast, PersistSafety, Broadcast]  # persist before each send
    proposal, prevote = sent(actions, Proposal)[0], sent(actions)[0]
    h = digest(b"block-A")
    assert (proposal.block, proposal.pol_round) == (b"block-A", -1)
    assert (prevote.type, prevote.block_hash) == (PV, h)
    actions = c.votes([1, 2], PV, 0, h)
    precommit = sent(actions)[0]
    assert (precommit.type, precommit.block_hash) == (PC, h) and c.state.locked_round == 0
    assert of(actions, PersistSafety)[0].state.locked_hash == h
    actions = c.votes([1, 2], PC, 0, h)
    (commit,) = of(actions, Commit)
    assert (commit.height, commit.block) == (1, b"block-A") and c.state.step is Step.COMMIT
    verify_commit(c.valset, 1, h, commit.certificate, verify_signature, chain_id=CHAIN)
    assert c.state.on_vote(c.vote(3, PC, 0, h)) == []  # decided: nothing more for this height


def test_prevote_waits_for_validation_and_is_nil_for_an_invalid_block():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    actions = c.state.on_proposal(c.proposal(r, b"bad block"))
    assert actions == [ValidateBlock(1, digest(b"bad block"), b"bad block")]
    assert c.state.step is Step.PROPOSE  # no prevote before the application answers
    actions = c.state.on_block_validated(digest(b"bad block"), False)
    assert [(v.type, v.block_hash) for v in sent(actions)] == [(PV, None)]


def test_prevote_for_a_valid_fresh_proposal():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    actions = valid_proposal(c, r)
    assert [(v.round, v.block_hash) for v in sent(actions)] == [(r, digest(b"block-A"))]


def test_locked_replica_prevotes_nil_for_another_block_but_accepts_a_newer_proof_of_lock():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    a, b = digest(b"block-A"), digest(b"block-B")
    valid_proposal(c, r, b"block-A")
    c.votes([1, 2, 3], PV, r, a)  # lock on A in round r
    assert (c.state.locked_round, c.state.valid_round) == (r, r)
    c.votes([1, 2, 3], PC, r, None)  # no decision: 2f+1 precommits for nil -> timeoutPrecommit
    c.state.on_timeout(Timeout(TimeoutKind.PRECOMMIT, 1, r))
    r2 = next(x for x in range(r + 1, 100) if c.proposer(x) != 0)
    skip_to(c, r2)
    # a fresh proposal of B: locked on A, so nil (line 22)
    actions = valid_proposal(c, r2, b"block-B")
    assert [v.block_hash for v in sent(actions)] == [None]
    # B re-proposed later, justified by 2f+1 prevotes for B from a round after our lock (line 28)
    r3 = next(x for x in range(r2 + 1, 100) if c.proposer(x) != 0)
    skip_to(c, r3)
    actions = c.state.on_proposal(c.proposal(r3, b"block-B", pol_round=r2))
    assert sent(actions) == []  # waits for the proof-of-lock (or timeoutPropose)
    actions = c.votes([1, 2, 3], PV, r2, b)  # arriving late: r2 is over, so no lock moved yet
    assert c.state.locked_round == r
    assert [(v.round, v.block_hash) for v in sent(actions)] == [(r3, b)]


def test_a_proof_of_lock_learned_late_becomes_what_we_propose():
    """Extension to Algorithm 1 (see _late_proof_of_lock): validValue follows newer proofs from past rounds."""
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    a = digest(b"block-A")
    valid_proposal(c, r)
    c.state.on_timeout(Timeout(TimeoutKind.PREVOTE, 1, r))  # we never saw the quorum in round r
    c.votes([1, 2, 3], PC, r, None)
    c.state.on_timeout(Timeout(TimeoutKind.PRECOMMIT, 1, r))
    assert (c.state.round, c.state.valid_round) == (r + 1, -1)
    c.votes([1, 2], PV, r, a)  # the round-r quorum for A reaches us late (relayed)
    assert (c.state.valid_round, c.state.locked_round) == (r, -1)  # a better proposal, no new lock
    mine = next(x for x in range(r + 1, 100) if c.proposer(x) == 0)
    actions = c.votes([1, 2], PC, mine, None)  # f+1 in our round: we start it and re-propose A
    (proposal,) = sent(actions, Proposal)
    assert (proposal.round, proposal.block, proposal.pol_round) == (mine, b"block-A", r)


def test_quorum_is_counted_by_power_not_by_head_count():
    c = Cluster([1, 1, 1, 10])  # v1..v2 + us are 3 of 4 heads but 3/13 of the power
    r = at_round_not_proposing(c)
    h = digest(b"block-A")
    valid_proposal(c, r)
    actions = c.votes([1, 2], PV, r, h)
    assert sent(actions) == [] and not of(actions, ScheduleTimeout)
    actions = c.votes([3], PV, r, h)  # 13/13 with the big one
    assert [(v.type, v.block_hash) for v in sent(actions)] == [(PC, h)]


def test_two_thirds_prevotes_for_anything_schedule_timeout_prevote_then_precommit_nil():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 1, r))  # no proposal: prevote nil
    actions = c.votes([1], PV, r, digest(b"x")) + c.votes([2], PV, r, digest(b"y"))
    assert of(actions, ScheduleTimeout) == [
        ScheduleTimeout(Timeout(TimeoutKind.PREVOTE, 1, r), PARAMS.timeout_ms(TimeoutKind.PREVOTE, r))]
    actions = c.state.on_timeout(Timeout(TimeoutKind.PREVOTE, 1, r))
    assert [(v.type, v.block_hash) for v in sent(actions)] == [(PC, None)]


def test_two_thirds_nil_prevotes_precommit_nil_at_once():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 1, r))
    actions = c.votes([1, 2], PV, r, None)
    assert (PC, None) in [(v.type, v.block_hash) for v in sent(actions)]


def test_two_thirds_precommits_for_anything_lead_to_the_next_round_with_longer_timeouts():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    actions = c.votes([1, 2, 3], PC, r, None)
    assert ScheduleTimeout(Timeout(TimeoutKind.PRECOMMIT, 1, r), PARAMS.timeout_ms(TimeoutKind.PRECOMMIT, r)) in actions
    actions = c.state.on_timeout(Timeout(TimeoutKind.PRECOMMIT, 1, r))
    assert c.state.round == r + 1
    (propose,) = [a for a in of(actions, ScheduleTimeout) if a.timeout.kind is TimeoutKind.PROPOSE]
    assert propose.duration_ms == PARAMS.timeout_propose_ms + (r + 1) * PARAMS.timeout_propose_delta_ms


def test_timeouts_grow_with_the_round():
    for kind in (TimeoutKind.PROPOSE, TimeoutKind.PREVOTE, TimeoutKind.PRECOMMIT):
        durations = [PARAMS.timeout_ms(kind, r) for r in range(5)]
        assert durations == sorted(set(durations))
    assert PARAMS.timeout_ms(TimeoutKind.REBROADCAST, 9) == PARAMS.rebroadcast_interval_ms


def test_more_than_a_third_in_a_later_round_skips_to_it_less_does_not():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    c.votes([1], PV, 7, None)  # 1/4: stay
    assert c.state.round == 0
    actions = c.votes([2], PC, 7, None)  # 2/4 > 1/3: skip
    assert c.state.round == 7
    assert ScheduleTimeout(Timeout(TimeoutKind.PROPOSE, 1, 7), PARAMS.timeout_ms(TimeoutKind.PROPOSE, 7)) in actions


def test_one_validator_cannot_fill_our_log_with_future_rounds():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    for round in (5, 9, 1000):
        c.state.on_vote(c.vote(1, PV, round, None))
    assert c.state.ignored["too_many_future_rounds"] == 1 and c.state.round == 0
    assert c.state.on_vote(c.vote(1, PC, 9, None)) == []  # a round it already occupies is fine
    assert c.state.ignored["too_many_future_rounds"] == 1


def test_stale_timeouts_do_nothing():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    assert c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 1, r + 3)) == []
    assert c.state.on_timeout(Timeout(TimeoutKind.PREVOTE, 1, r)) == []  # we are not prevoting yet
    assert c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 0, r)) == []


# --------------------------------------------------------------------------- equivocation and bad input


def test_equivocating_vote_is_evidence_and_never_counted_twice():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 1, r))  # we prevote nil
    first, second = c.vote(1, PV, r, digest(b"x")), c.vote(1, PV, r, digest(b"y"))
    assert c.state.on_vote(first) == []
    assert c.state.on_vote(first) == []  # a duplicate is not equivocation
    actions = c.state.on_vote(second)
    assert actions == [ReportEvidence(Evidence(first, second))]
    assert c.state.evidence == [Evidence(first, second)]
    verify_evidence(c.valset, c.state.evidence[0], verify_signature, chain_id=CHAIN)
    # us + v1 = 2 of 4: had v1 counted twice, 3/4 would have scheduled timeoutPrevote
    assert not of(actions, ScheduleTimeout)
    assert c.state.on_vote(c.vote(1, PV, r, digest(b"z"))) == []  # reported once per slot


def test_equivocation_at_a_later_height_is_reported_again():
    """Attack: a validator that equivocated in a (type, round) once could equivocate in the same (type, round)
    of every later height unreported, while the core remembered reported slots across heights without
    their height; the ledger, which punishes once per epoch, never heard of the next offence."""
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    a1, b1 = c.vote(1, PV, 0, digest(b"a1")), c.vote(1, PV, 0, digest(b"b1"))
    c.state.on_vote(a1)
    assert c.state.on_vote(b1) == [ReportEvidence(Evidence(a1, b1))]
    assert c.state.on_commit_certificate(b"block-1", _certificate(c, [1, 2, 3], block=b"block-1"))
    c.state.start(2, c.valset.next_height())
    a2, b2 = c.vote(1, PV, 0, digest(b"a2"), height=2), c.vote(1, PV, 0, digest(b"b2"), height=2)
    c.state.on_vote(a2)
    assert c.state.on_vote(b2) == [ReportEvidence(Evidence(a2, b2))]


def test_equivocating_vote_counts_for_its_own_value_once_somebody_else_backs_it():
    """As in the paper, support for id(v) is the set of distinct signers of a vote for v."""
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    h = digest(b"block-A")
    valid_proposal(c, r)  # we prevote A
    c.votes([1], PV, r, digest(b"twin"))  # v1 shows us a twin first
    actions = c.votes([2], PV, r, h) + c.votes([1], PV, r, h)
    assert of(actions, ReportEvidence)
    assert [(v.type, v.block_hash) for v in sent(actions)] == [(PC, h)]  # us + v2 + v1 for A


def test_conflicting_proposals_are_evidence_and_the_first_is_kept():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    p1, p2 = c.proposal(r, b"one"), c.proposal(r, b"two")
    c.state.on_proposal(p1)
    assert c.state.on_proposal(p2) == [ReportEvidence(Evidence(p1, p2))]
    verify_evidence(c.valset, Evidence(p1, p2), verify_signature, chain_id=CHAIN)


def test_evidence_verification_rejects_non_conflicts_and_forgeries():
    c = Cluster([1, 1, 1, 1])
    v = c.vote(1, PV, 0, digest(b"x"))
    with pytest.raises(InvalidEvidence, match="not_conflicting"):
        verify_evidence(c.valset, Evidence(v, v), verify_signature, chain_id=CHAIN)
    with pytest.raises(InvalidEvidence, match="different_slot"):
        verify_evidence(c.valset, Evidence(v, c.vote(2, PV, 0, None)), verify_signature, chain_id=CHAIN)
    forged = dataclasses.replace(c.vote(1, PV, 0, None), signature=c.vote(2, PV, 0, None).signature)
    with pytest.raises(InvalidEvidence, match="bad_signature"):
        verify_evidence(c.valset, Evidence(v, forged), verify_signature, chain_id=CHAIN)


def test_non_validators_forgeries_and_wrong_proposers_are_ignored_and_counted():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    outsider = Keypair.from_seed(b"outsider")
    assert c.state.on_vote(make_vote(CHAIN, outsider.sign, outsider.peer_id, PV, 1, r, None, T0)) == []
    forged = dataclasses.replace(c.vote(1, PV, r, None), signature=c.vote(2, PV, r, None).signature)
    assert c.state.on_vote(forged) == []
    wrong_proposer = next(i for i in range(1, 4) if i != c.proposer(r))
    assert c.state.on_proposal(c.proposal(r, b"blk", by=wrong_proposer)) == []
    other_chain = make_vote("other-chain", c.keys[1].sign, c.addr[1], PV, 1, r, None, T0)
    assert c.state.on_vote(other_chain) == []
    assert c.state.ignored == {"not_a_validator": 1, "bad_signature": 2, "not_proposer": 1}


@settings(max_examples=150, deadline=None)
@given(
    vote_type=st.sampled_from([PV, PC, 0, 3, "x", None]),
    height=st.one_of(st.integers(-2, 3), st.text(max_size=2), st.none()),
    round=st.one_of(st.integers(-2, 10**12), st.floats(allow_nan=True)),
    block_hash=st.one_of(st.none(), st.binary(max_size=40), st.integers()),
    validator=st.one_of(st.text(max_size=5), st.integers()),
    time_ms=st.one_of(st.integers(-2, 2**70), st.floats(allow_nan=True), st.none()),
    signature=st.one_of(st.binary(max_size=200), st.none()),
    block=st.one_of(st.binary(max_size=64), st.text(max_size=4)),
    pol_round=st.integers(-3, 12),
)
def test_garbage_from_the_network_never_raises(vote_type, height, round, block_hash, validator, time_ms, signature,
                                               block, pol_round):
    c = _garbage_cluster()
    vote = Vote(vote_type, height, round, block_hash, validator, time_ms, signature)  # type: ignore[arg-type]
    proposal = Proposal(height, round, pol_round, block, validator, signature)  # type: ignore[arg-type]
    assert isinstance(c.state.on_vote(vote), list)
    assert isinstance(c.state.on_proposal(proposal), list)
    cert = CommitCertificate(height, round, block_hash, (vote,))  # type: ignore[arg-type]
    assert isinstance(c.state.on_commit_certificate(block, cert), list)  # type: ignore[arg-type]


_GARBAGE: list[Cluster] = []


def _garbage_cluster() -> Cluster:
    if not _GARBAGE:
        _GARBAGE.append(Cluster([1, 1, 1, 1]))
        _GARBAGE[0].state.start(1, _GARBAGE[0].valset)
    return _GARBAGE[0]


# --------------------------------------------------------------------------- commit certificates


def _certificate(c: Cluster, signers: list[int], height: int = 1, block: bytes = b"block-A") -> CommitCertificate:
    h = digest(block)
    return CommitCertificate(height, 0, h, tuple(c.vote(i, PC, 0, h, height=height) for i in signers))


def test_verify_commit_accepts_a_quorum_of_power():
    c = Cluster([5, 1, 1, 1])
    verify_commit(c.valset, 1, digest(b"block-A"), _certificate(c, [0, 1]), verify_signature, chain_id=CHAIN)


def test_verify_commit_rejects_what_does_not_prove_a_commit():
    c = Cluster([5, 1, 1, 1])
    h = digest(b"block-A")

    def reason(cert: object, height: int = 1, block_hash: bytes = h) -> str:
        with pytest.raises(InvalidCommit) as e:
            verify_commit(c.valset, height, block_hash, cert, verify_signature, chain_id=CHAIN)  # type: ignore[arg-type]
        return e.value.reason

    assert reason(_certificate(c, [1, 2, 3])) == "short_of_quorum"  # 3 of 4 heads, 3/8 of the power
    assert reason(_certificate(c, [0, 1]), height=2) == "wrong_height"
    cert = _certificate(c, [0, 1])
    assert reason(dataclasses.replace(cert, height=2), height=2) == "vote_mismatch"  # votes say height 1
    assert reason(cert, block_hash=digest(b"other")) == "wrong_block"
    forged = dataclasses.replace(cert.precommits[0], signature=cert.precommits[1].signature)
    assert reason(dataclasses.replace(cert, precommits=(forged, cert.precommits[1]))) == "bad_signature"
    assert reason(dataclasses.replace(cert, precommits=cert.precommits + cert.precommits[:1])) == "duplicate_validator"
    prevote = c.vote(0, PV, 0, h)
    assert reason(dataclasses.replace(cert, precommits=(prevote, cert.precommits[1]))) == "vote_mismatch"
    outsider = Keypair.from_seed(b"outsider")
    stranger = make_vote(CHAIN, outsider.sign, outsider.peer_id, PC, 1, 0, h, T0)
    assert reason(dataclasses.replace(cert, precommits=(*cert.precommits, stranger))) == "unknown_validator"
    assert reason("not a certificate") == "malformed"


def test_catch_up_commits_from_a_verified_certificate_only():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    assert c.state.on_commit_certificate(b"block-A", _certificate(c, [1, 2])) == []  # 2/4 is not > 2/3
    assert c.state.on_commit_certificate(b"block-B", _certificate(c, [1, 2, 3])) == []  # wrong block
    actions = c.state.on_commit_certificate(b"block-A", _certificate(c, [1, 2, 3]))
    assert [type(a) for a in actions] == [Commit] and actions[0].block == b"block-A"


def test_a_message_from_a_later_height_asks_for_the_commit_once_per_interval():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    assert c.state.on_vote(c.vote(1, PV, 0, None, height=3)) == [RequestCommit(1, c.addr[1])]
    assert c.state.on_vote(c.vote(2, PV, 0, None, height=3)) == []
    actions = c.state.on_timeout(Timeout(TimeoutKind.REBROADCAST, 1, 0))
    assert of(actions, ScheduleTimeout)  # the interval re-arms
    assert c.state.on_vote(c.vote(2, PC, 0, None, height=3)) == [RequestCommit(1, c.addr[2])]


def test_next_height_messages_are_buffered_and_replayed_on_start():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    early = c.vote(1, PV, 0, None, height=2)
    c.state.on_vote(early)
    c.state.on_commit_certificate(b"block-A", _certificate(c, [1, 2, 3]))
    c.state.start(2, c.valset.next_height())
    assert c.state._log.first_vote(0, PV, c.addr[1]) == early


def test_rebroadcast_resends_own_votes_of_the_open_height():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    (own,) = sent(c.state.on_timeout(Timeout(TimeoutKind.PROPOSE, 1, r)))
    actions = c.state.on_timeout(Timeout(TimeoutKind.REBROADCAST, 1, 0))
    assert own in sent(actions)
    assert c.state.on_timeout(Timeout(TimeoutKind.REBROADCAST, 0, 0)) == []  # an old height's timer is stale


# --------------------------------------------------------------------------- the replica's own safety


def test_restarted_replica_never_signs_again_at_a_signed_position_and_keeps_its_lock():
    c = Cluster([1, 1, 1, 1])
    r = at_round_not_proposing(c)
    a = digest(b"block-A")
    valid_proposal(c, r)
    actions = c.votes([1, 2], PV, r, a)
    persisted = of(actions, PersistSafety)[-1].state
    assert (persisted.height, persisted.round, persisted.step, persisted.locked_round) == (1, r, Step.PRECOMMIT, r)
    assert c.state.safety == persisted

    restarted = ConsensusState(chain_id=CHAIN, verify=verify_signature, address=c.addr[0], sign=c.keys[0].sign,
                               clock_ms=lambda: T0, safety=persisted)
    c.state = restarted
    actions = restarted.start(1, c.valset)
    assert restarted.round == r and restarted.locked_round == r  # resumes where it signed, still locked
    actions += valid_proposal(c, r)
    actions += c.votes([1, 2, 3], PV, r, a)
    assert sent(actions) == [] and not of(actions, PersistSafety)  # everything here was already signed
    c.votes([1, 2, 3], PC, r, None)
    c.state.on_timeout(Timeout(TimeoutKind.PRECOMMIT, 1, r))
    r2 = next(x for x in range(r + 1, 100) if c.proposer(x) != 0)
    skip_to(c, r2)
    actions = valid_proposal(c, r2, b"block-B")
    assert [v.block_hash for v in sent(actions)] == [None]  # the restored lock on A holds


def test_driving_the_state_machine_out_of_order_is_a_usage_error():
    c = Cluster([1, 1, 1, 1])
    c.state.start(1, c.valset)
    with pytest.raises(UsageError):
        c.state.start(2, c.valset)  # height 1 is not decided
    with pytest.raises(UsageError):
        ConsensusState(chain_id=CHAIN, verify=verify_signature, address="x")  # address without a key
    with pytest.raises(UsageError):
        ConsensusState(chain_id=CHAIN, verify=verify_signature, address=c.addr[0], sign=c.keys[0].sign)  # no clock


def test_a_follower_without_a_key_commits_but_never_signs():
    c = Cluster([1, 1, 1, 1])
    follower = ConsensusState(chain_id=CHAIN, verify=verify_signature)
    actions = follower.start(1, c.valset)
    r = 0
    h = digest(b"block-A")
    actions += follower.on_proposal(c.proposal(r, b"block-A"))
    actions += follower.on_block_validated(h, True)
    for i in range(3):
        actions += follower.on_vote(c.vote(i, PV, r, h))
    for i in range(3):
        actions += follower.on_vote(c.vote(i, PC, r, h))
    assert not of(actions, Broadcast) and not of(actions, PersistSafety)
    assert [a.block for a in of(actions, Commit)] == [b"block-A"]


# --------------------------------------------------------------------------- the simulated network

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def _check_seed(seed: int, n: int) -> None:
    """Safety and liveness of one seeded run; any failure names the seed and how to replay it."""
    try:
        result = simulate(Scenario.random(seed, n))
        result.check_safety()
        result.check_liveness()
    except SimFailure as e:
        raise SimFailure(f"{e}\nreplay: python -m sim.consensus_sim --seed {seed} --validators {n}") from None


@pytest.mark.parametrize("n, examples", [(4, 500), (7, 300)])
def test_simulated_networks_are_safe_and_live(n, examples, capsys):
    seeds: list[int] = []

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking a seed means nothing
    @given(seed=SEEDS)
    def run(seed: int) -> None:
        seeds.append(seed)
        _check_seed(seed, n)

    run()
    with capsys.disabled():
        print(f"\nconsensus sim: {len(set(seeds))} seeds, {n} validators: no fork, and every honest replica "
              f"committed >= 5 heights within 20 s (virtual) after the network stabilised")


def test_simulation_replays_bit_for_bit_from_its_seed():
    a, b = simulate(Scenario.random(2024, 7)), simulate(Scenario.random(2024, 7))
    assert a.commits == b.commits and a.commit_times == b.commit_times and a.stats == b.stats


def test_simulation_with_real_signatures_and_an_equivocator():
    scenario = Scenario(seed=0, powers=(1, 1, 1, 1), byzantine=(3,), real_signatures=True, target_heights=4,
                        network=Network(max_delay_ms=20, drop_rate=0.3, stabilize_ms=1000))
    result = simulate(scenario)
    result.check_safety()
    result.check_liveness()
    assert result.evidence and {e.validator for e in result.evidence} == {
        Keypair.from_seed(b"sim-3").peer_id}


def test_partition_without_quorum_on_either_side_heals():
    network = Network(max_delay_ms=30, drop_rate=0.1, partitions=((0, 3000),), partition_sides=(0, 1, 0, 1, 0, 1),
                      stabilize_ms=3000)
    for seed in range(5):
        result = simulate(Scenario(seed=seed, powers=(1, 1, 1, 1, 1, 1), network=network))
        result.check_safety()
        result.check_liveness()
        assert min(max(b) for b in result.commits.values()) >= 5
