"""Attack class: buying weight without the compute behind it. Weight decides who executes
(and is paid), who validates and whose vote commits blocks; on an open network it is earned
by proof of compute (``ledger/poc.py``). Each test is one way to get weight cheaply, or to
keep it, and the defence that stops it: claiming more nonces than the tree holds, opening
another nonce than the sampled one, withholding what would expose an overclaim, judging one's
own compute or judging twice, committing outside the window, joining for free, flooding a
round with newcomers, splitting one machine into many identities, and being drawn for a model
one never proved.

The network: genesis participants A, B, C (weight 10 on ``m``), newcomers without accounts;
the ledger is driven with real signed transactions (``ledger_driver``), coins conserved after
every block.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from ledger_driver import LedgerDriver, poc_genesis, poc_leaves, request_message

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import poc
from gonka_p2p.ledger.block import Receipt
from gonka_p2p.ledger.executor_draw import executor_weights, is_drawn
from gonka_p2p.ledger.poc import Phase, RoundKind
from gonka_p2p.ledger.poc_rounds import sampled
from gonka_p2p.ledger.rules import PPM, choose_executor
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.transactions import Reason
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.merkle import inclusion_proof

CHAIN = "gonka-poc-attacks"
M, M2 = "m", "m2"
REGULAR, CONFIRMATION = RoundKind.REGULAR, RoundKind.CONFIRMATION
SYBILS = tuple(f"S{i}" for i in range(10))
NEWCOMERS = ("N", "X", *SYBILS)
NAMES = ("A", "B", "C", "alice", *NEWCOMERS)
KEYS = {n: Keypair.from_seed(f"poc-attacks-{n}".encode()) for n in NAMES}
PEER = {n: k.peer_id for n, k in KEYS.items()}
L = 30
HONEST = {("A", M): 100, ("B", M): 100, ("C", M): 100}


def ledger(models: dict[str, tuple[str, ...]] | None = None, **params: object) -> LedgerDriver:
    """30-block epochs whose phases are long enough for a refused attempt and then the honest
    transaction: regular round at heights 2..13 (compute 4, secret 1, reveal 4, verdict 3),
    confirmation (compute 3) starting in 14..20."""
    genesis = poc_genesis(CHAIN, KEYS, {"A": 10, "B": 10, "C": 10}, models, funded={"alice"},
                          **{**dict(epoch_length_blocks=L, poc_compute_blocks=4, poc_reveal_blocks=4,
                                    poc_verdict_blocks=3, poc_confirm_compute_blocks=3), **params})
    return LedgerDriver(LedgerState.from_genesis(genesis), KEYS, "A")


def weight(d: LedgerDriver, who: str) -> int:
    participant = d.state.registry.get(PEER[who])
    return participant.weight if participant else 0


def refused(receipt: Receipt, reason: Reason) -> None:
    assert not receipt.ok and receipt.reason == reason, (receipt.reason, receipt.detail)


def with_reputation(d: LedgerDriver, who: str, reputation_ppm: int) -> None:
    """Earned reputation, set directly: what fraud must reset and withholding must not."""
    d.state.registry.put(PEER[who], replace(d.state.registry.rows[PEER[who]], reputation_ppm=reputation_ppm))


def commit_and_open_secrets(d: LedgerDriver, counts: dict[str, int], **leaves: list[bytes]) -> None:
    """Round 0's commitments (to ``leaves[who]`` where given) and secrets; the chain stops
    just before its reveal phase."""
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(*[d.poc_commit(who, n, 0, leaves=leaves.get(who)) for who, n in counts.items()])
    d.to_phase(0, REGULAR, Phase.SECRET)
    d.ok(*[d.poc_secret(who, 0) for who in counts])
    d.to_phase(0, REGULAR, Phase.REVEAL)


def finish_epoch_0(d: LedgerDriver, proven: dict[str, int]) -> None:
    """Reveal and judge ``proven`` (all pass), confirm each, run to the epoch's end."""
    d.ok(*[d.poc_reveal(who, 0) for who in proven])
    d.to_phase(0, REGULAR, Phase.VERDICT)
    d.ok(*[d.poc_verdict(j, who, True, 0) for j in ("A", "B", "C") for who in proven if j != who])
    d.poc_round(0, CONFIRMATION, d.confirmation_counts({(who, M): n for who, n in proven.items()}))
    d.until(L)


# --------------------------------------------------------------------------- overclaiming


def test_a_tree_of_fewer_leaves_than_claimed_cannot_open_its_sample() -> None:
    """C computes 10 nonces and claims 1000: whatever it opens for the sampled nonces (here
    its real leaves and proofs, index modulo 10) is refused, and it earns nothing."""
    d = ledger()
    small = poc_leaves(PEER["C"], M, 0, REGULAR, 10)
    commit_and_open_secrets(d, {"A": 100, "B": 100, "C": 1000}, C=small)
    indices = sampled(d.state, 0, REGULAR, PEER["C"], M)
    assert any(i >= 10 for i in indices)
    (receipt,) = d.block(d.poc_reveal("C", 0, leaves=[small[i % 10] for i in indices],
                                      proofs=[inclusion_proof(small, i % 10) for i in indices]))
    refused(receipt, Reason.BAD_OPENING)
    finish_epoch_0(d, {"A": 100, "B": 100})
    assert (weight(d, "A"), weight(d, "B"), weight(d, "C")) == (100, 100, 0)


def test_only_the_sampled_nonces_open_a_commitment() -> None:
    """C's tree is real, but it opens nonces it chose (the next ones, say, whose results it
    has), or too few of them: refused."""
    d = ledger()
    commit_and_open_secrets(d, {"C": 100})
    indices, leaves, proofs = d.poc_opening("C", 0)
    tree = d.trees[("C", 0, REGULAR, M)]
    shifted = [(i + 1) % 100 for i in indices]
    for bad_leaves, bad_proofs in (([tree[j] for j in shifted], [inclusion_proof(tree, j) for j in shifted]),
                                   ([tree[j] for j in shifted], proofs),  # another nonce's result, this proof
                                   (leaves[:-1], proofs[:-1])):  # one nonce fewer
        (receipt,) = d.block(d.poc_reveal("C", 0, leaves=bad_leaves, proofs=bad_proofs))
        refused(receipt, Reason.BAD_OPENING)
    d.ok(d.poc_reveal("C", 0, leaves=leaves, proofs=proofs))  # the honest opening still lands


# --------------------------------------------------------------------------- withholding and fraud


@pytest.mark.parametrize("withheld", ["secret", "opening"])
def test_withholding_the_secret_or_the_opening_earns_nothing_but_is_no_fraud(withheld: str) -> None:
    """C, which cannot open its sample, stays silent: weight 0 (as for one that left), but its
    reputation is untouched -- it proved nothing, and nothing proved it lied."""
    d = ledger()
    with_reputation(d, "C", 500_000)
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(*[d.poc_commit(who, n, 0) for (who, _), n in HONEST.items()])
    d.to_phase(0, REGULAR, Phase.SECRET)
    d.ok(*[d.poc_secret(who, 0) for who in ("A", "B", "C") if withheld != "secret" or who != "C"])
    d.to_phase(0, REGULAR, Phase.REVEAL)
    if withheld == "secret":
        (receipt,) = d.block(d.poc_reveal("C", 0, leaves=[b"x"], proofs=[[]]))
        refused(receipt, Reason.NO_COMMITMENT)
    d.ok(d.poc_reveal("A", 0), d.poc_reveal("B", 0))
    d.to_phase(0, REGULAR, Phase.VERDICT)
    (receipt,) = d.block(d.poc_verdict("A", "C", True, 0))
    refused(receipt, Reason.NOT_VALIDATABLE)  # nothing to recompute, so nothing to vouch for
    d.ok(*[d.poc_verdict(j, who, True, 0) for j in ("A", "B", "C") for who in ("A", "B") if j != who])
    d.poc_round(0, CONFIRMATION, d.confirmation_counts(HONEST, skip={"C"}))
    d.until(L)
    assert (weight(d, "A"), weight(d, "B"), weight(d, "C")) == (100, 100, 0)
    assert d.state.registry.rows[PEER["C"]].reputation_ppm == 500_000


def test_fraud_found_by_a_majority_of_power_zeroes_weight_and_reputation() -> None:
    d = ledger()
    with_reputation(d, "C", 500_000)
    d.poc_epoch(0, HONEST, fail={"C"})
    assert (weight(d, "A"), weight(d, "B"), weight(d, "C")) == (100, 100, 0)
    assert d.state.registry.rows[PEER["C"]].reputation_ppm == 0


def test_one_accuser_short_of_a_majority_does_not_make_fraud() -> None:
    """A alone fails C (10 of 30): C is unproven, not convicted -- one validator cannot strip
    another's reputation."""
    d = ledger()
    with_reputation(d, "C", 500_000)
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(*[d.poc_commit(who, n, 0) for (who, _), n in HONEST.items()])
    d.to_phase(0, REGULAR, Phase.SECRET)
    d.ok(*[d.poc_secret(who, 0) for who in ("A", "B", "C")])
    d.to_phase(0, REGULAR, Phase.REVEAL)
    d.ok(*[d.poc_reveal(who, 0) for who in ("A", "B", "C")])
    d.to_phase(0, REGULAR, Phase.VERDICT)
    d.ok(*[d.poc_verdict(j, who, (j, who) != ("A", "C"), 0) for j in ("A", "B", "C") for who in ("A", "B", "C")
           if j != who])
    d.poc_round(0, CONFIRMATION, d.confirmation_counts(HONEST))
    d.until(L)
    assert (weight(d, "A"), weight(d, "B"), weight(d, "C")) == (100, 100, 0)
    assert d.state.registry.rows[PEER["C"]].reputation_ppm == 500_000


def test_fraud_is_punished_even_in_a_round_where_nothing_else_is_proven() -> None:
    """Only C commits, and A and B find its leaves wrong. Nothing is proven, so the weights stay
    (the network does not vote itself away) -- but not the convicted cheat's."""
    d = ledger()
    with_reputation(d, "C", 500_000)
    d.poc_epoch(0, {("C", M): 100}, fail={"C"})
    assert (weight(d, "A"), weight(d, "B"), weight(d, "C")) == (10, 10, 0)
    assert d.state.registry.rows[PEER["C"]].reputation_ppm == 0
    info = d.state.epoch_info(1)
    assert info is not None and PEER["C"] not in info.weights and PEER["C"] not in executor_weights(d.state, M, 1)


# --------------------------------------------------------------------------- who may judge


def test_only_the_epochs_validators_judge_others_once() -> None:
    d = ledger()
    commit_and_open_secrets(d, {"A": 100, "B": 100, "N": 50})
    d.ok(*[d.poc_reveal(who, 0) for who in ("A", "B", "N")])
    d.to_phase(0, REGULAR, Phase.VERDICT)
    receipts = d.block(d.poc_verdict("N", "A", True, 0),  # joined this round: no power in epoch 0
                       d.poc_verdict("alice", "A", True, 0),  # an account, no participant
                       d.poc_verdict("A", "A", True, 0),  # the prover itself
                       d.poc_verdict("B", "A", True, 0),
                       d.poc_verdict("B", "A", True, 0))  # twice
    for receipt, reason in zip(receipts, (Reason.NOT_A_VALIDATOR, Reason.NOT_A_VALIDATOR,
                                          Reason.CONFLICT_OF_INTEREST, Reason.OK, Reason.DUPLICATE_VOTE),
                               strict=True):
        assert receipt.reason == reason, (receipt.reason, receipt.detail)
    (receipt,) = d.block(d.poc_verdict("B", "A", False, 0))  # changing its mind later: still once
    refused(receipt, Reason.DUPLICATE_VOTE)
    entry = d.state.poc_entries.rows[(0, REGULAR, PEER["A"], M)]
    assert entry.voters == (PEER["B"],) and (entry.passed, entry.failed) == (10, 0)


# --------------------------------------------------------------------------- commitments


def test_commitments_land_only_in_the_compute_window_once_per_model() -> None:
    d = ledger(models={"A": (M, M2)})
    (receipt,) = d.block(d.poc_commit("A", 100, 0))  # height 1: the round opens at the end of it
    refused(receipt, Reason.NOT_IN_PHASE)
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(d.poc_commit("A", 100, 0))
    (second,) = d.block(d.poc_commit("A", 200, 0))
    refused(second, Reason.ALREADY_COMMITTED)  # no second, larger claim once the first is in
    d.ok(d.poc_commit("A", 50, 0, model=M2))  # another model is another commitment
    (wrong_epoch,) = d.block(d.poc_commit("B", 100, 1))
    refused(wrong_epoch, Reason.NOT_IN_PHASE)
    d.to_phase(0, REGULAR, Phase.SECRET)
    (late,) = d.block(d.poc_commit("B", 100, 0))
    refused(late, Reason.NOT_IN_PHASE)


def test_a_newcomer_pays_a_join_stamp_and_rounds_take_few_newcomers() -> None:
    d = ledger(poc_max_newcomers=2)
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    bits = d.state.params.poc_join_pow_bits
    key = KEYS["N"].public_key
    bad = next(s for s in itertools.count() if not poc.join_stamp_ok(CHAIN, 0, key, s, bits))
    stale = next(s for s in itertools.count()  # made for the next epoch: not for this one
                 if poc.join_stamp_ok(CHAIN, 1, key, s, bits) and not poc.join_stamp_ok(CHAIN, 0, key, s, bits))
    for stamp in (bad, stale):
        (receipt,) = d.block(d.poc_commit("N", 10, 0, stamp=stamp))
        refused(receipt, Reason.BAD_JOIN_STAMP)
    assert d.state.account(PEER["N"]) is None and PEER["N"] not in d.state.registry.rows
    receipts = d.block(*[d.poc_commit(n, 10, 0) for n in ("N", "X", "S0")])
    assert [r.reason for r in receipts] == [Reason.OK, Reason.OK, Reason.ROUND_FULL]
    assert d.state.poc_rounds.rows[(0, REGULAR)].newcomers == 2
    assert d.state.account(PEER["S0"]) is None


def test_a_confirmation_needs_a_regular_commitment_to_confirm() -> None:
    """A confirmation confirms the epoch's regular commitment for the same model: N, which
    joined in the regular round, must confirm; A, which committed nothing regular, has nothing
    to confirm (on any model), and a stranger cannot join through a confirmation."""
    d = ledger()
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(d.poc_commit("N", 50, 0))
    d.to_phase(0, CONFIRMATION, Phase.COMPUTE)
    refusals = d.block(d.poc_commit("A", 50, 0, CONFIRMATION), d.poc_commit("N", 50, 0, CONFIRMATION, model=M2),
                       d.poc_commit("X", 50, 0, CONFIRMATION))
    for receipt in refusals:
        refused(receipt, Reason.NOTHING_TO_CONFIRM)
    assert d.state.account(PEER["X"]) is None
    d.ok(d.poc_commit("N", 50, 0, CONFIRMATION))


# --------------------------------------------------------------------------- many identities


def test_a_burst_of_newcomers_cannot_take_a_third_of_the_voting_power_in_one_round() -> None:
    """After a first round of 100 each, ten newcomers (stamps paid) prove 1000 nonces each --
    33 times the network. Growth is bounded: they get at most g / (1 + g) of the weight, and no
    one holds more than the cap."""
    d = ledger()
    d.poc_epoch(0, HONEST)
    d.poc_epoch(1, {**HONEST, **{(s, M): 1000 for s in SYBILS}})
    weights = {n: weight(d, n) for n in ("A", "B", "C", *SYBILS)}
    assert weights["A"] == weights["B"] == weights["C"] == 100
    growth = d.state.params.max_weight_growth_ppm
    newcomers = sum(weights[s] for s in SYBILS)
    assert newcomers > 0 and newcomers * (PPM + growth) <= growth * sum(weights.values())
    power = d.state.weights()
    assert 3 * sum(power[PEER[s]] for s in SYBILS) < sum(power.values())
    info = d.state.epoch_info(2)
    assert info is not None and dict(info.weights) == power
    assert all(p * PPM <= d.state.params.voting_power_cap_ppm * sum(power.values()) for p in power.values())


def test_one_huge_newcomer_holds_no_more_than_the_cap() -> None:
    """A newcomer proving 100 times the rest in the first round grows only by the bound of what
    the genesis set proved (the first round rebases on it), and holds no more than the cap."""
    d = ledger()
    d.poc_epoch(0, {**HONEST, ("X", M): 30_000})
    assert weight(d, "X") == 300 * d.state.params.max_weight_growth_ppm // PPM
    power = d.state.weights()
    assert power[PEER["X"]] * PPM <= d.state.params.voting_power_cap_ppm * sum(power.values())
    assert power[PEER["X"]] == max(power.values())


@pytest.mark.parametrize("epoch", [0, 1])
def test_ten_identities_splitting_one_budget_weigh_what_one_would(epoch: int) -> None:
    """X proves 1000 nonces alone; ten Sybils split another 1000. Together they never weigh more
    than X (within rounding): the growth bound scales every newcomer down alike."""
    d = ledger()
    if epoch:
        d.poc_epoch(0, HONEST)
    d.poc_epoch(epoch, {**HONEST, ("X", M): 1000, **{(s, M): 100 for s in SYBILS}})
    together = sum(weight(d, s) for s in SYBILS)
    assert 0 < together <= weight(d, "X") < together + len(SYBILS)


def test_a_burst_of_newcomers_in_the_first_round_cannot_take_a_third_of_the_voting_power() -> None:
    d = ledger()
    d.poc_epoch(0, {**HONEST, **{(s, M): 1000 for s in SYBILS}})
    power = d.state.weights()
    assert 3 * sum(power[PEER[s]] for s in SYBILS) < sum(power.values())


def test_throwaway_newcomers_withholding_secrets_cannot_choose_the_sample() -> None:
    """X claims 1000 nonces but computed only the first 900; four throwaway newcomers commit one
    nonce each, to open or withhold their secrets once the honest ones are in -- 16 samples to
    choose from, were their secrets mixed in. Only the secrets of committers holding voting
    power this epoch seed the sample, so whichever subset they open, X's sample is the same."""
    d = ledger(poc_secret_blocks=2)  # the honest secrets land in its first block, the coalition's in its last
    throwaways = SYBILS[:4]
    d.to_phase(0, REGULAR, Phase.COMPUTE)
    d.ok(*[d.poc_commit(who, n, 0) for who, n in (("A", 100), ("B", 100), ("X", 1000), *((t, 1) for t in throwaways))])
    d.to_phase(0, REGULAR, Phase.SECRET)
    d.ok(*[d.poc_secret(who, 0) for who in ("A", "B", "X")])
    work, size = d.state.poc_rounds.rows[(0, REGULAR)].work_seed, d.state.params.poc_sample_size
    weighted = {(PEER[w], M): d.poc_secret_of(w, 0, REGULAR, M) for w in ("A", "B")}  # X holds no weight yet
    d.ok(*[d.poc_secret(t, 0) for t in throwaways[:2]])  # the coalition's pick: open two, withhold two
    d.to_phase(0, REGULAR, Phase.REVEAL)
    unsteered = poc.sample_indices(poc.sample_seed(work, weighted), PEER["X"], M, 1000, size)
    assert sampled(d.state, 0, REGULAR, PEER["X"], M) == unsteered


# --------------------------------------------------------------------------- draws per model


def test_a_participant_proven_only_on_one_model_is_never_drawn_for_another() -> None:
    """A serves m and m2 but proves compute on m only: its weight is no ticket for m2 work."""
    models = {n: (M, M2) for n in ("A", "B", "C")}
    d = ledger(models=models)
    d.poc_epoch(0, {("A", M): 300, ("B", M2): 100, ("C", M): 50, ("C", M2): 50})
    d.until(L + d.state.params.inference_deadline_blocks + 1)  # epoch 0's table no longer applies
    assert M2 in d.state.registry.rows[PEER["A"]].models
    assert executor_weights(d.state, M2) == {PEER["B"]: 100, PEER["C"]: 50}
    assert PEER["A"] in executor_weights(d.state, M)
    for k in range(200):
        iid = bytes([k]) * 32
        assert choose_executor(executor_weights(d.state, M2), frozenset(), iid, 0) != PEER["A"]
        assert not is_drawn(d.state, M2, PEER["B"], iid, k % 3, PEER["A"], d.state.height + 1)
    request = seal(request_message(d.state, b"n" * 16, M2), KEYS["alice"])
    (receipt,) = d.block(d.start(request, "A", ta="B", attempt=0))
    refused(receipt, Reason.EXECUTOR_NOT_ELIGIBLE)
