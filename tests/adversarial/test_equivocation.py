"""Attack class: equivocation. A validator signs two votes for different blocks at one
(height, round, type) -- the one act that can fork consensus. Anyone who holds both votes
proves it with a ``SubmitEvidence`` transaction that every replica checks the same way; the
offender's reputation resets at once and it loses its weight and epoch reward at settlement.
Evidence that is forged, mismatched, stale or already punished is refused.

The ledger is driven directly with real signed transactions; that replicas submit the
evidence on their own is tests/test_replica.py's."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import pytest

from ledger_driver import OK, LedgerDriver, request_message

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import rules
from gonka_p2p.ledger.consensus_types import Evidence, Vote, VoteType, make_vote
from gonka_p2p.ledger.consensus_wire import evidence_transaction
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.state import LedgerState, check_tx
from gonka_p2p.ledger.transactions import Reason, StartInference, SubmitEvidence
from gonka_p2p.wire.envelope import seal

CHAIN = "gonka-equivocation"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10  # epoch e ends at 10e + 10; it settles at rules.settlement_height(e)
VALIDATORS = ("ta", "ex", "byz", "v1", "v2", "v3")
KEYS = {n: Keypair.from_seed(f"equivocation-{n}".encode()) for n in (*VALIDATORS, "alice")}
PEER = {n: k.peer_id for n, k in KEYS.items()}
BLOCK_A, BLOCK_B = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()


def genesis() -> Genesis:
    params = Params(epoch_length_blocks=L, inference_deadline_blocks=3, request_window_ms=10**9,
                    max_tx_bytes=64 * 1024, price_per_token={MODEL: 1}, validation_window_blocks=3,
                    dispute_voting_blocks=2, epoch_reward=100_000, validation_cap_ppm=rules.PPM,
                    evidence_max_age_blocks=5)
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params,
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, 10, models=(MODEL,))
                                      for n in VALIDATORS),
                   allocations={PEER["alice"]: 1_000_000})


def vote(who: str, height: int, block_hash: bytes | None, *, round: int = 0,
         vote_type: VoteType = VoteType.PRECOMMIT, chain_id: str = CHAIN) -> Vote:
    return make_vote(chain_id, KEYS[who].sign, PEER[who], vote_type, height, round, block_hash, T0 + height)


class Ledger(LedgerDriver):
    def __init__(self) -> None:
        super().__init__(LedgerState.from_genesis(genesis()), KEYS, "ta", MODEL)

    def evidence(self, first: Vote, second: Vote, *, by: str = "alice", offender: str | None = None) -> bytes:
        """The transaction as an honest replica writes it (``offender`` overrides the named signer)."""
        def make(n: int) -> SubmitEvidence:
            tx = evidence_transaction(Evidence(first, second), CHAIN, n)
            assert tx is not None
            return replace(tx, offender=offender or tx.offender)
        return self.sign(by, make)

    def infer(self) -> None:
        """One inference, executed by whichever participant the ledger's draw names."""
        self.nonce += 1
        request = seal(request_message(self.state, self.nonce.to_bytes(16, "big"), MODEL), KEYS["alice"])
        n = self.state.account(PEER["ta"]).sequence  # type: ignore[union-attr]
        starts = {e: seal(StartInference(chain_id=CHAIN, request=request, executor=PEER[e], attempt=0, sequence=n),
                          KEYS["ta"]) for e in VALIDATORS}
        executor = next(e for e, tx in starts.items() if check_tx(self.state, tx).ok)
        self.ok(starts[executor], self.finish(request, executor))

    def run_epoch_1(self, during: Callable[[], None]) -> None:
        """Everyone commits, executes and checks its duties in epoch 1 and reveals; ``during``
        runs in the middle of the epoch; blocks run to its settlement."""
        self.until(1)
        self.ok(*[self.commit(w, 1) for w in VALIDATORS])
        self.until(L)
        for _ in range(6):
            self.infer()
        during()
        self.ok(*[self.validate(w, iid, OK)
                  for w in VALIDATORS for iid in self.state.validation_duties(1, PEER[w], self.seed(w, 1))])
        self.until(2 * L)
        self.ok(*[self.reveal(w, 1) for w in VALIDATORS])
        self.until(rules.settlement_height(1, self.state.params))

def rejected(ledger: Ledger, tx: bytes, reason: Reason) -> None:
    assert check_tx(ledger.state, tx).reason is reason
    (receipt,) = ledger.block(tx)
    assert receipt.reason is reason, (receipt.reason, receipt.detail)


def test_two_conflicting_votes_cost_the_offender_its_weight_and_reward_at_settlement() -> None:
    ledger = Ledger()
    honest_before: dict[str, int] = {}

    def equivocate() -> None:
        height = ledger.state.height
        ledger.ok(ledger.evidence(vote("byz", height, BLOCK_A), vote("byz", height, BLOCK_B)))
        byz = ledger.state.participant(PEER["byz"])
        assert byz is not None and byz.reputation_ppm == 0  # at once
        assert ledger.state.weights()[PEER["byz"]] == 10  # voting power changes only at settlement
        honest_before.update(ledger.state.weights())

    ledger.run_epoch_1(equivocate)
    summary = ledger.state.epoch_summary(1)
    assert summary is not None
    byz = summary.participant(PEER["byz"])
    # Caught: it loses weight as any caught participant does (at most the per-epoch cut of voting power).
    assert byz.caught == "equivocation" and byz.weight_after < byz.weight == 10
    assert byz.executor_reward + byz.validator_reward == 0 and byz.forfeited > 0
    assert ledger.state.weights().get(PEER["byz"], 0) == byz.weight_after
    for who in ("ta", "ex", "v1", "v2", "v3"):
        row = summary.participant(PEER[who])
        assert not row.caught and not row.forfeit and row.weight_after == honest_before[PEER[who]] == 10
    assert sum(summary.participant(PEER[w]).validator_reward for w in ("v2", "v3")) > 0


def test_a_nil_vote_against_a_block_vote_is_equivocation_too_and_any_account_may_submit_it() -> None:
    ledger = Ledger()
    ledger.until(3)
    ledger.ok(ledger.evidence(vote("byz", 2, None, vote_type=VoteType.PREVOTE, round=1),
                              vote("byz", 2, BLOCK_A, vote_type=VoteType.PREVOTE, round=1), by="v2"))
    assert ledger.state.equivocations.get(PEER["byz"]) == 0


@pytest.mark.parametrize("make, reason", [
    pytest.param(lambda: (vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_A)), Reason.NOT_CONFLICTING,
                 id="same block twice"),
    pytest.param(lambda: (vote("byz", 2, BLOCK_A), vote("v1", 2, BLOCK_B)), Reason.BAD_EVIDENCE_SIGNATURE,
                 id="second vote by another validator"),
    pytest.param(lambda: (vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B, round=1)),
                 Reason.BAD_EVIDENCE_SIGNATURE, id="votes of two rounds"),
    pytest.param(lambda: (vote("byz", 2, BLOCK_A), vote("byz", 3, BLOCK_B)), Reason.BAD_EVIDENCE_SIGNATURE,
                 id="votes of two heights"),
    pytest.param(lambda: (vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B, vote_type=VoteType.PREVOTE)),
                 Reason.BAD_EVIDENCE_SIGNATURE, id="a prevote and a precommit"),
    pytest.param(lambda: (vote("byz", 2, BLOCK_A, chain_id="other"), vote("byz", 2, BLOCK_B, chain_id="other")),
                 Reason.BAD_EVIDENCE_SIGNATURE, id="votes of another chain"),
    pytest.param(lambda: (vote("alice", 2, BLOCK_A), vote("alice", 2, BLOCK_B)), Reason.NOT_A_VALIDATOR,
                 id="signer holds no weight"),
    pytest.param(lambda: (vote("byz", 9, BLOCK_A), vote("byz", 9, BLOCK_B)), Reason.EVIDENCE_TOO_OLD,
                 id="a future height"),
])
def test_forged_or_mismatched_evidence_is_refused(make: Callable[[], tuple[Vote, Vote]], reason: Reason) -> None:
    ledger = Ledger()
    ledger.until(3)
    rejected(ledger, ledger.evidence(*make()), reason)
    assert PEER["byz"] not in ledger.state.equivocations


def test_evidence_naming_someone_else_than_the_signer_is_refused() -> None:
    ledger = Ledger()
    ledger.until(3)
    rejected(ledger, ledger.evidence(vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B), offender=PEER["v1"]),
             Reason.BAD_EVIDENCE_SIGNATURE)
    assert len(ledger.state.equivocations) == 0


def test_evidence_older_than_the_bound_is_refused() -> None:
    ledger = Ledger()
    ledger.until(8)  # evidence_max_age_blocks = 5: height 2 is evidence up to height 7
    rejected(ledger, ledger.evidence(vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B)), Reason.EVIDENCE_TOO_OLD)


def test_an_offender_is_punished_once_per_epoch_whatever_pair_of_its_votes_is_shown() -> None:
    ledger = Ledger()
    ledger.until(3)
    ledger.ok(ledger.evidence(vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B)))
    rejected(ledger, ledger.evidence(vote("byz", 2, BLOCK_A), vote("byz", 2, BLOCK_B), by="v1"),
             Reason.ALREADY_PUNISHED)
    rejected(ledger, ledger.evidence(vote("byz", 2, BLOCK_B), vote("byz", 2, BLOCK_A)), Reason.ALREADY_PUNISHED)
    rejected(ledger, ledger.evidence(vote("byz", 4, BLOCK_A, round=2), vote("byz", 4, None, round=2)),
             Reason.ALREADY_PUNISHED)
