"""Attack class: framing. A coalition below 1/3 of the weight accuses honest work, to have the
honest executors convicted -- their weight, which is also consensus voting power, zeroed -- and
so to become the whole validator set. On the ledger before issue 11 it worked: any committed
validator could fail any inference at no cost, a three-seat committee drawn from the accusing
block's hash convicted on a majority of the votes cast, and a conviction zeroed the weight at once.

The rules that stop it are in ``ledger/disputes.py`` (its docstring gives the probability
argument); here each is attacked. The ledger is driven directly with real signed transactions,
as tests/test_ledger_economics.py does.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from ledger_driver import BAD, OK, LedgerDriver, request_message

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import disputes, rules
from gonka_p2p.ledger.block import Receipt
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.records import EpochSummary
from gonka_p2p.ledger.rules import DisputeOutcome, Forfeit
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.transactions import Reason
from gonka_p2p.ledger.executor_draw import executor_weights, may_execute
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import InferenceRequest, inference_id

CHAIN = "gonka-framing"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10  # epoch e: heights 10e+1 .. 10e+10; checks until 10e+13; two dispute rounds of 2; settles at 10e+17
HONEST = tuple(f"h{k}" for k in range(7))
COALITION = ("c0", "c1", "c2")  # 30 % of the weight: 3 of 10 equal participants
EVERYONE = HONEST + COALITION
KEYS = {n: Keypair.from_seed(f"framing-{n}".encode()) for n in (*EVERYONE, "alice")}
PEER = {n: k.peer_id for n, k in KEYS.items()}
NAME = {p: n for n, p in PEER.items()}
EPOCHS = 10


def genesis(**overrides: int) -> Genesis:
    params = Params(**{  # type: ignore[arg-type]
        "epoch_length_blocks": L, "inference_deadline_blocks": 3, "request_window_ms": 10**9,
        "max_tx_bytes": 64 * 1024, "price_per_token": {MODEL: 1}, "validation_window_blocks": 3,
        "dispute_voting_blocks": 2, "epoch_reward": 100_000, **overrides})
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params,
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, 10, models=(MODEL,))
                                      for n in EVERYONE),
                   allocations={PEER["alice"]: 10**9})


class Ledger(LedgerDriver):
    """A ledger, the participants around it, and what the coalition does: ``attack`` makes it
    fail every honest inference and vote "invalid" on every committee it sits on."""

    def __init__(self, attack: bool) -> None:
        super().__init__(LedgerState.from_genesis(genesis()), KEYS, "h0", MODEL)
        self.attack = attack
        self.summaries: dict[int, EpochSummary] = {}
        self.refused: list[Receipt] = []  # the coalition's refused accusations

    def infer(self, ta: str) -> list[bytes]:
        """A client request routed by ``ta`` to the executor the ledger draws, started and finished."""
        self.nonce += 1
        request = seal(request_message(self.state, self.nonce.to_bytes(16, "big"), MODEL), KEYS["alice"])
        iid = inference_id(open_envelope(request, InferenceRequest))
        executor = NAME[rules.choose_executor(executor_weights(self.state, MODEL), frozenset({PEER[ta]}), iid, 0)]
        return [self.start(request, executor, ta, attempt=0), self.finish(request, executor)]

    def checks(self, epoch: int) -> list[bytes]:
        """Every committed validator checks its duties (honest work passes). The attacking
        coalition fails every honest inference it has a duty on, and tries one it has none on
        (last, as a refused transaction does not use up its sequence)."""
        txs: list[bytes] = []
        off_duty: dict[str, tuple[bytes, bytes]] = {}
        for who in EVERYONE:
            seed = self.seed(who, epoch)
            duties = set(self.state.validation_duties(epoch, PEER[who], seed))
            for iid in self.state.epoch_inferences(epoch):
                record = self.state.inferences.rows[iid]
                if PEER[who] in (record.executor, record.ta):
                    continue
                framed = self.attack and who in COALITION and NAME[record.executor] in HONEST
                if iid in duties:
                    txs.append(self.validate(who, iid, BAD if framed else OK, seed if framed else b""))
                elif framed:
                    off_duty[who] = (iid, seed)
        return txs + [self.validate(who, iid, BAD, seed) for who, (iid, seed) in off_duty.items()]

    def votes(self) -> list[bytes]:
        """Every member of every drawn committee votes (the coalition "invalid" when attacking),
        up to the vote that decides it: a vote after that would be refused."""
        txs = []
        for iid, dispute in sorted(self.state.disputes.rows.items()):
            if dispute.outcome is not DisputeOutcome.OPEN:
                continue
            tally = {True: 0, False: dispute.accuser_seats}  # the accuser's failing check is its vote
            for member, seats in zip(dispute.committee, dispute.seats, strict=True):
                if disputes.dispute_outcome(tally[False], tally[True], 255) is not DisputeOutcome.UNDECIDED:
                    break
                if (iid, member) not in self.state.votes:
                    valid = not (self.attack and NAME[member] in COALITION)
                    txs.append(self.vote(NAME[member], iid, OK if valid else BAD))
                    tally[valid] += seats
        return txs

    def run(self, epochs: int) -> None:
        """Epoch e: seeds for e+1 committed at its first block, nine inferences (TAs in turn),
        checks at its sixth block, the seed of e-1 revealed at its fourth; votes whenever due."""
        ta = 0
        for height in range(1, (epochs + 1) * L + 1):
            epoch, position = divmod(height - 1, L)
            txs = self.votes()
            if position == 0:
                txs += [self.commit(who, epoch + 1) for who in EVERYONE]
            if 1 <= epoch <= epochs and position in (1, 2, 3):
                for _ in range(3):
                    txs += self.infer(EVERYONE[ta % len(EVERYONE)])
                    ta += 1
            if position == 3 and epoch >= 2:
                txs += [self.reveal(who, epoch - 1) for who in EVERYONE]
            if position == 5 and epoch >= 1:
                txs += self.checks(epoch)
            receipts = self.block(*txs)
            for receipt in receipts:
                if not receipt.ok and self.attack and NAME.get(receipt.signer) in COALITION:
                    self.refused.append(receipt)
                else:
                    assert receipt.ok, (height, receipt.kind, receipt.reason, receipt.detail)
            if (settled := rules.epoch_settled_at(height, self.state.params)) is not None:
                self.summaries[settled] = self.state.epoch_summary(settled)


def reward(summary: EpochSummary, who: str) -> int:
    row = summary.participant(PEER[who])
    assert row is not None
    return row.executor_reward + row.validator_reward


def test_a_30_percent_coalition_accusing_every_honest_inference_for_10_epochs_frames_nobody() -> None:
    honest, attacked = Ledger(attack=False), Ledger(attack=True)
    honest.run(EPOCHS)
    attacked.run(EPOCHS)
    settled = sorted(set(attacked.summaries) & set(range(1, EPOCHS)))
    assert len(settled) == EPOCHS - 1
    disputes_opened = sum(attacked.summaries[e].disputes for e in settled)
    assert disputes_opened >= 30, "the coalition accused honest work throughout"
    assert sum(attacked.summaries[e].disputes_invalid for e in settled) == 0
    assert {r.reason for r in attacked.refused} == {Reason.NOT_A_DUTY}  # accusations off its duties
    for who in HONEST:
        before, after = honest.state.participant(PEER[who]), attacked.state.participant(PEER[who])
        assert after.weight == before.weight == 10 and not after.sanctioned
        assert after.reputation_ppm == before.reputation_ppm
        for e in settled:
            row = attacked.summaries[e].participant(PEER[who])
            assert not row.caught and not row.forfeit, (who, e, row)
            # Paid as without the attack: the same executor reward (duty points hash the settling
            # blocks, which the accusations change, so which honest work it checked may differ).
            was = honest.summaries[e].participant(PEER[who])
            assert row.executor_reward == was.executor_reward and (row.validator_reward > 0) == (row.work > 0), \
                (who, e, row, was)
    for who in COALITION:
        assert attacked.state.participant(PEER[who]).reputation_ppm == 0
        assert honest.state.participant(PEER[who]).reputation_ppm > 0
        for e in settled:
            row = attacked.summaries[e].participant(PEER[who])
            if row.overturned:
                assert reward(attacked.summaries[e], who) == 0 and Forfeit.OVERTURNED in row.forfeit
        assert sum(reward(attacked.summaries[e], who) for e in settled) < \
            sum(reward(honest.summaries[e], who) for e in settled) // 2


def epoch_one(**overrides: int) -> tuple[Ledger, list[bytes]]:
    """A ledger in epoch 1 with seeds committed and nine settled inferences; their ids."""
    ledger = Ledger(attack=True)
    ledger.state = LedgerState.from_genesis(genesis(**overrides))
    ledger.block(*[ledger.commit(who, 1) for who in EVERYONE])
    ledger.block()
    while ledger.state.height < L:
        ledger.block()
    txs = []
    for k in range(9):
        txs += ledger.infer(EVERYONE[k])
    assert all(r.ok for r in ledger.block(*txs))
    return ledger, ledger.state.epoch_inferences(1)


def test_an_accusation_without_a_duty_is_refused() -> None:
    ledger, iids = epoch_one()
    c0 = PEER["c0"]
    seed = ledger.seed("c0", 1)
    mine = set(ledger.state.validation_duties(1, c0, seed))
    others = [i for i in iids if i not in mine and c0 not in (ledger.state.inferences.rows[i].executor,
                                                               ledger.state.inferences.rows[i].ta)]
    duty = next(iter(mine))
    assert others and duty
    for iid, verdict, proof, reason in ((others[0], BAD, seed, Reason.NOT_A_DUTY),
                                        (duty, BAD, b"", Reason.SEED_MISMATCH),
                                        (duty, BAD, ledger.seed("c1", 1), Reason.SEED_MISMATCH),
                                        (duty, OK, seed, Reason.MALFORMED)):
        (receipt,) = ledger.block(ledger.validate("c0", iid, verdict, proof))
        assert receipt.reason is reason, receipt.detail
    (accused,) = ledger.block(ledger.validate("c0", duty, BAD, seed))
    assert accused.ok and ledger.state.dispute(duty) is not None


def test_a_dispute_nobody_votes_on_is_redrawn_then_undecided_not_clean() -> None:
    ledger, _ = epoch_one()
    seed = ledger.seed("c0", 1)
    duty = ledger.state.validation_duties(1, PEER["c0"], seed)[0]
    ledger.block(ledger.validate("c0", duty, BAD, seed))
    opened = ledger.state.dispute(duty)
    assert opened.committee == () and not opened.voting  # drawn later
    ledger.block()  # the draw block
    first = ledger.state.dispute(duty)
    assert first.voting and first.committee and first.rounds == 1
    ledger.block()  # round 1 closes with no vote: not clean, a fresh round
    second = ledger.state.dispute(duty)
    assert second.outcome is DisputeOutcome.OPEN and second.rounds == 2 and second.committee == ()
    assert sorted(second.silent) == sorted(first.committee)
    ledger.block()  # round 2's draw, from this block's hash
    assert ledger.state.dispute(duty).voting and ledger.state.dispute(duty).draw_height == ledger.state.height
    ledger.block()
    final = ledger.state.dispute(duty)
    assert final.outcome is DisputeOutcome.UNDECIDED and final.rounds == 2
    assert set(final.silent) == set(first.committee) | set(final.committee)
    assert rules.inference_observation(final.outcome, []) is None  # no evidence of clean work


def test_the_committee_is_drawn_from_a_later_block_not_the_accusing_one() -> None:
    """The accusing block (its proposer, its time, the accuser's transaction) fixes nothing: the
    committee is a draw from the hash of the block after it, by weight over the epoch's set."""
    committees = set()
    for grind in range(3):
        ledger, _ = epoch_one()
        seed = ledger.seed("c0", 1)
        duty = ledger.state.validation_duties(1, PEER["c0"], seed)[0]
        ledger.block(ledger.validate("c0", duty, BAD, seed), time_ms=ledger.state.time_ms + 1 + grind)
        accusing_hash = ledger.state.last_block_hash
        assert ledger.state.dispute(duty).committee == ()
        ledger.block(time_ms=ledger.state.time_ms + 1)
        dispute = ledger.state.dispute(duty)
        validators, seats = ledger.state.epoch_validators(1), ledger.state.params.dispute_committee_size
        drawn = disputes.draw_committee(validators, ledger.state.last_block_hash, duty, 0, seats)
        held = dict(drawn)
        assert tuple(zip(dispute.committee, dispute.seats, strict=True)) == \
            tuple((p, k) for p, k in drawn if p not in (dispute.executor, dispute.accuser))  # the TA votes
        assert dispute.accuser_seats == held.get(dispute.accuser, 0)  # its failing check is its vote
        assert disputes.draw_committee(validators, accusing_hash, duty, 0, seats) != drawn
        assert sum(dispute.seats) + dispute.accuser_seats + held.get(dispute.executor, 0) == seats
        committees.add(dispute.committee + tuple(dispute.seats))
    assert len(committees) > 1  # the draw block's hash moved it, not anything the accuser chose


def test_the_committee_size_keeps_a_third_of_the_weight_from_deciding_a_dispute() -> None:
    """P(a coalition with 1/3 of the weight draws a strict majority of the seats) <= 1e-6, exactly,
    with room for a proposer that grinds 48 variants of the draw block."""
    n = Params().dispute_committee_size
    capture = disputes.committee_capture_probability(n, Fraction(1, 3))
    assert capture * 48 <= Fraction(1, 10**6)
    assert float(disputes.committee_capture_probability(3, Fraction(1, 3))) == pytest.approx(0.259, abs=1e-3)
    one_in_a_million = disputes.committee_capture_probability(191, Fraction(1, 3))
    assert float(one_in_a_million) == pytest.approx(1.0e-6, rel=0.05)
    assert float(capture) == pytest.approx(2.1e-8, rel=0.05)


def test_a_conviction_sanctions_at_once_and_moves_weight_only_at_settlement_by_bounded_steps() -> None:
    ledger, _ = epoch_one()
    seed = ledger.seed("h1", 1)
    duty = next(i for i in ledger.state.validation_duties(1, PEER["h1"], seed))
    executor = ledger.state.inferences.rows[duty].executor
    ledger.block(ledger.validate("h1", duty, BAD, seed))
    ledger.block()  # drawn
    dispute, txs = ledger.state.dispute(duty), []
    invalid = dispute.accuser_seats
    for member, seats in zip(dispute.committee, dispute.seats, strict=True):
        if 2 * invalid <= ledger.state.params.dispute_committee_size:  # all judge it invalid
            txs.append(ledger.vote(NAME[member], duty, BAD))
            invalid += seats
    assert all(r.ok for r in ledger.block(*txs))
    assert ledger.state.dispute(duty).outcome is DisputeOutcome.INVALID
    convicted = ledger.state.participant(executor)
    assert convicted.sanctioned and convicted.weight == 10  # voting power unchanged until settlement
    assert not may_execute(ledger.state, executor)  # TAs route around it; the draw table stays frozen
    while ledger.state.height < rules.settlement_height(1, ledger.state.params):
        ledger.block()
    assert ledger.state.participant(executor).weight == 0  # 10 of 100: within one step's 10 %
    assert ledger.state.epoch_summary(1).participant(executor).weight_after == 0
    # A bigger conviction moves in steps of at most 10 % of the total voting power:
    assert disputes.weight_cuts({"a": 30, "b": 60, "c": 10}, {"a"}, 100_000) == {"a": 10}
    assert disputes.weight_cuts({"a": 5, "b": 10, "c": 85}, {"a", "b"}, 100_000) == {"a": 5, "b": 5}
