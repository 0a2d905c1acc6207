"""The epoch test carried across epochs (``ledger/epoch_test.py``), rule by rule: what is
carried, what resets it, and that it catches a cheat too subtle for one epoch while an honest
executor stays unaccused. Deterministic: synthetic outcome streams from fixed seeds."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gonka_p2p.ledger.end_of_block import EpochTally, PeerTally, settle_epoch
from gonka_p2p.ledger.epoch_test import NO_CARRY, Carry, run_epoch_test
from gonka_p2p.ledger.genesis import Params
from gonka_p2p.ledger.rules import Observation

P = Params()
CLEAN, SUSPICIOUS, FAILED = Observation.CLEAN, Observation.SUSPICIOUS, Observation.FAILED
BOUND = P.sprt_cheating_bound_micro


def wald(llr: int, hit: bool, hit_llr: int, miss_llr: int) -> tuple[int, bool]:
    """The Wald step as its specification states it (rules.wald_step_micro's docstring)."""
    llr += hit_llr if hit else -miss_llr
    if llr >= BOUND:
        return llr, True
    return (0, False) if llr <= -P.sprt_honest_bound_micro else (llr, False)


def reference(observations: list[Observation], carried: Carry,
              distances: list[int] = ()) -> tuple[bool, tuple[int, int, int]]:
    """The three runs, unclamped: (accused, the llrs where the epoch ended). The runs are
    independent, so the distance run may follow the other two."""
    failures, flags, distance = carried
    for o in observations:
        failures, a = wald(failures, o is FAILED, P.sprt_failed_hit_llr_micro, P.sprt_failed_miss_llr_micro)
        flags, b = wald(flags, o is not CLEAN, P.sprt_far_hit_llr_micro, P.sprt_far_miss_llr_micro)
        if a or b:
            return True, (failures, flags, distance)
    for step in distances:
        distance, c = wald(distance, step > 0, step, -step)
        if c:
            return True, (failures, flags, distance)
    return False, (failures, flags, distance)


observations = st.lists(st.sampled_from(list(Observation)), max_size=80)
distance_steps = st.lists(st.integers(-3 * P.sprt_far_miss_llr_micro, 3 * P.sprt_far_miss_llr_micro), max_size=60)
carries = st.tuples(st.integers(0, BOUND - 1), st.integers(0, BOUND - 1), st.integers(0, BOUND - 1))


@settings(max_examples=300, deadline=None)
@given(observations, carries, distance_steps)
def test_the_carry_is_the_unclamped_runs_floored_at_zero_and_an_accusation_resets_it(
        epoch: list[Observation], carried: Carry, distances: list[int]) -> None:
    test = run_epoch_test(epoch, carried, P, distances)
    accused, ends = reference(epoch, carried, distances)
    assert test.accused == accused
    assert test.carry == (NO_CARRY if accused else tuple(max(0, x) for x in ends))
    assert all(0 <= x < BOUND for x in test.carry)


@settings(max_examples=300, deadline=None)
@given(observations, observations, carries, distance_steps, distance_steps)
def test_two_epochs_carried_are_one_run_when_the_first_ends_above_zero(
        first: list[Observation], second: list[Observation], carried: Carry,
        first_distances: list[int], second_distances: list[int]) -> None:
    accused, ends = reference(first, carried, first_distances)
    if accused or min(ends) < 0:  # an accusation decides; a negative end is clamped (a restart)
        return
    after = run_epoch_test(first, carried, P, first_distances)
    assert (run_epoch_test(second, after.carry, P, second_distances)
            == run_epoch_test(first + second, carried, P, first_distances + second_distances))


@settings(max_examples=200, deadline=None)
@given(carries, st.integers(0, 60))
def test_clean_outputs_wear_carried_suspicion_down_and_never_build_credit(carried: Carry, clean: int) -> None:
    test = run_epoch_test([CLEAN] * clean, carried, P, [-P.sprt_far_miss_llr_micro] * clean)
    assert not test.accused
    assert test.carry[0] <= max(0, carried[0] - clean * P.sprt_failed_miss_llr_micro)
    assert test.carry[1] <= max(0, carried[1] - clean * P.sprt_far_miss_llr_micro)
    assert test.carry[2] <= max(0, carried[2] - clean * P.sprt_far_miss_llr_micro)


def test_evidence_left_at_an_epoch_boundary_counts_in_the_next() -> None:
    two = run_epoch_test([SUSPICIOUS, SUSPICIOUS], NO_CARRY, P)
    assert not two.accused and two.carry[1] == 2 * P.sprt_far_hit_llr_micro
    assert run_epoch_test([SUSPICIOUS], two.carry, P).accused  # three in a row, across the boundary
    assert not run_epoch_test([SUSPICIOUS], NO_CARRY, P).accused  # one alone is noise


def epochs(rate: float, size: int, count: int, seed: int) -> list[list[Observation]]:
    rng = random.Random(seed)
    return [[SUSPICIOUS if rng.random() < rate else CLEAN for _ in range(size)] for _ in range(count)]


def carried_run(chain: list[list[Observation]]) -> list[bool]:
    carry, accused = NO_CARRY, []
    for epoch in chain:
        test = run_epoch_test(epoch, carry, P)
        carry = test.carry
        accused.append(test.accused)
    return accused


def test_a_cheat_too_subtle_for_one_epoch_is_caught_within_twenty() -> None:
    # 15 % suspicious outputs: the distance test's drift is positive (> 9.25 %) but one epoch
    # of 10 checks rarely reaches the accusing bound.
    chains = [epochs(0.15, 10, 20, seed) for seed in range(300)]
    one_epoch = sum(run_epoch_test(chain[0], NO_CARRY, P).accused for chain in chains) / len(chains)
    within = sum(any(carried_run(chain)) for chain in chains) / len(chains)
    assert one_epoch < 0.5
    assert within >= 0.99


def test_an_honest_executor_is_accused_in_at_most_one_epoch_in_a_thousand_when_carried() -> None:
    accused = [a for seed in range(100) for a in carried_run(epochs(0.01, 30, 50, 1000 + seed))]
    assert sum(accused) / len(accused) <= 0.001


def tally(observations: list[Observation], carried: Carry, distances: list[int] = ()) -> EpochTally:
    return EpochTally(epoch=1, floor_ppm=0, fees=[], peers={
        "cheat": PeerTally(weight=1, power=1, inferences=len(observations), checked=len(observations),
                           observations=observations, distance_llrs=list(distances), sprt_carry=carried)})


def test_settlement_carries_an_undecided_test_and_accuses_when_the_evidence_adds_up() -> None:
    """The ledger side: a cheat that keeps each epoch's evidence under the bound (two suspicious
    outputs per epoch, then clean) is caught at the settlement where the sum crosses it."""
    first = settle_epoch(tally([SUSPICIOUS, SUSPICIOUS, CLEAN], NO_CARRY), P, height=10).participants[0]
    assert first.caught == "" and first.sprt_carry != NO_CARRY
    second = settle_epoch(tally([SUSPICIOUS, CLEAN], first.sprt_carry), P, height=20).participants[0]
    assert second.caught == "sprt" and second.sprt_carry == NO_CARRY


def test_a_dispute_decides_and_clears_the_carry() -> None:
    t = tally([SUSPICIOUS], (0, P.sprt_far_hit_llr_micro, 0))
    t.peers["cheat"].proven_invalid = True
    row = settle_epoch(t, P, height=10).participants[0]
    assert row.caught == "dispute" and row.sprt_carry == NO_CARRY


def test_distance_steps_under_the_bound_in_each_epoch_accuse_when_their_sum_crosses_it() -> None:
    """The distance run: outputs each a little above the honest mean, never suspicious, add up
    across settlements; a clean observation stream does not clear them."""
    step = BOUND // 5
    first = settle_epoch(tally([CLEAN] * 3, NO_CARRY, [step] * 3), P, height=10).participants[0]
    assert first.caught == "" and first.sprt_carry == (0, 0, 3 * step)
    second = settle_epoch(tally([CLEAN] * 2, first.sprt_carry, [step] * 2), P, height=20).participants[0]
    assert second.caught == "sprt" and second.sprt_carry == NO_CARRY
