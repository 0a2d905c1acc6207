"""The epoch test's distance run (``ledger/distance_test.py``): each rule against its
specification, what a lying validator can make it do, the genesis pin that carries it, and a
ledger that catches an executor whose outputs all pass, none suspicious, but sit above the
honest mean distance."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_driver import OK
from test_ledger_economics import L, MODEL, PEER, Net, genesis

from gonka_p2p.inference.verification_params import CHEAT_DISTANCE_EXCESS, load_verification_params
from gonka_p2p.ledger.devnet import distance_test_of, distance_tests
from gonka_p2p.ledger.distance_test import (
    DistanceTest,
    distance_test_from_noise,
    failed_llr_micro,
    inference_llr_micro,
    output_llr_micro,
    weighted_median,
)
from gonka_p2p.ledger.genesis import GenesisError, Params, genesis_from_obj, genesis_to_toml
from gonka_p2p.ledger.model_pins import ModelPin
from gonka_p2p.ledger.state import LedgerState

TEST = DistanceTest(mid_nano=12_000_000, spread_nano=2_000_000, llr_per_token_micro=20_000, max_tokens=32)
P = Params()


def test_an_output_steps_by_its_tokens_times_its_clamped_offset_from_the_midpoint() -> None:
    assert output_llr_micro(TEST, 10, TEST.mid_nano) == 0
    assert output_llr_micro(TEST, 10, TEST.mid_nano + TEST.spread_nano // 2) == 10 * 20_000 // 2
    assert output_llr_micro(TEST, 10, TEST.mid_nano - TEST.spread_nano // 2) == -10 * 20_000 // 2
    assert output_llr_micro(TEST, 10, 10**12) == 10 * 20_000  # clamped: a near-tie flip counts no more
    assert output_llr_micro(TEST, 10, 0) == -10 * 20_000
    assert output_llr_micro(TEST, 1000, 10**12) == TEST.max_tokens * 20_000  # longer than measured: capped
    assert failed_llr_micro(TEST, 10) == output_llr_micro(TEST, 10, 10**12)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**10))
def test_no_report_moves_the_run_further_than_the_clamp_allows(tokens: int, distance: int) -> None:
    """The framing bound: whatever a validator reports, one output moves the run by at most
    ``max_tokens x llr_per_token``. With the shipped bf16 pins that is a fraction of one
    suspicious verdict's step in the flag run, so a liar gains nothing the flag run did not
    already give it."""
    assert abs(output_llr_micro(TEST, tokens, distance)) <= TEST.max_tokens * TEST.llr_per_token_micro
    for model, test in distance_tests_shipped().items():
        assert test.max_tokens * test.llr_per_token_micro < P.sprt_far_hit_llr_micro, model


def distance_tests_shipped() -> dict[str, DistanceTest]:
    from gonka_p2p.inference.verification_params import thresholds_table

    return distance_tests(thresholds_table(), {"tiny-llama": "bfloat16", "smollm2-135m": "bfloat16"})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 100), st.integers(0, 10**9)), min_size=1, max_size=9))
def test_the_weighted_median_is_held_by_a_weighted_majority_on_each_side(reports: list[tuple[int, int]]) -> None:
    median, total = weighted_median(reports), sum(w for w, _ in reports)
    assert 2 * sum(w for w, v in reports if v <= median) >= total
    assert 2 * sum(w for w, v in reports if v >= median) >= total


def test_a_minority_of_passing_weight_cannot_move_an_inference_past_every_honest_report() -> None:
    honest = [(10, TEST.mid_nano - TEST.spread_nano)] * 2
    liar = (15, 10**12)  # less than half of 35
    assert inference_llr_micro(TEST, 20, proven_invalid=False, passes=[*honest, liar]) < 0
    assert inference_llr_micro(TEST, 20, proven_invalid=False, passes=[]) is None
    assert inference_llr_micro(TEST, 20, proven_invalid=False, passes=[(0, 10**12)]) is None
    assert inference_llr_micro(TEST, 20, proven_invalid=True, passes=honest) == failed_llr_micro(TEST, 20)


def test_the_gaussian_ratio_at_the_clamp_is_delta_squared_over_the_token_variance() -> None:
    test = distance_test_from_noise(honest_mean=0.010, cheat_mean=0.012, token_sd=0.015, max_tokens=32)
    assert test.mid_nano == 11_000_000 and test.spread_nano == 2_000_000
    assert test.llr_per_token_micro == round(0.002**2 / 0.015**2 * 1e6)


@pytest.mark.parametrize("obj", [
    {"mid_nano": 1, "spread_nano": 1, "llr_per_token_micro": 1},
    {"mid_nano": 1, "spread_nano": 0, "llr_per_token_micro": 1, "max_tokens": 1},
    {"mid_nano": 1, "spread_nano": 1, "llr_per_token_micro": 10**9, "max_tokens": 1},
    {"mid_nano": 1, "spread_nano": 1, "llr_per_token_micro": True, "max_tokens": 1},
    {"mid_nano": 2**70, "spread_nano": 1, "llr_per_token_micro": 1, "max_tokens": 1},  # would not pack
    {"mid_nano": 1, "spread_nano": 1, "llr_per_token_micro": 1, "max_tokens": 2**40},
    [1, 2, 3, 4],
])
def test_a_malformed_distance_test_in_a_genesis_is_refused_with_its_name(obj: object) -> None:
    tree = pinned_genesis().to_obj()
    tree["models"][MODEL]["distance_test"] = obj
    with pytest.raises(GenesisError, match=f"models.{MODEL}"):
        genesis_from_obj(tree)


def pinned_genesis(test: DistanceTest | None = TEST):
    return dataclasses.replace(genesis(), models={MODEL: ModelPin("c" * 64, "bfloat16", test)})


def test_a_pin_round_trips_with_its_distance_test_and_a_pin_without_one_hashes_as_before() -> None:
    import tomllib

    with_test = pinned_genesis()
    assert genesis_from_obj(tomllib.loads(genesis_to_toml(with_test))) == with_test
    without = pinned_genesis(None)
    assert "distance_test" not in without.to_obj()["models"][MODEL]
    assert with_test.hash() != without.hash()


def test_the_shipped_bf16_thresholds_pin_a_distance_run_and_float32_pins_none() -> None:
    """What ``gonka-p2p init`` writes: a run for each bf16 model (the midpoint between the
    honest mean and a design cheat CHEAT_DISTANCE_EXCESS above it), none at float32, where the
    per-output rules reject subtle cheats."""
    tests = distance_tests_shipped()
    assert set(tests) == {"tiny-llama", "smollm2-135m"}
    for model, test in tests.items():
        honest = load_verification_params(dtypes={model: "bfloat16"}).for_model(model).honest_distance
        assert math.isclose(test.mid_nano / 1e9, (1 + CHEAT_DISTANCE_EXCESS / 2) * honest, rel_tol=1e-3), model
        assert distance_test_of(load_verification_params().for_model(model)) is None


def cheat_net(test: DistanceTest) -> Net:
    net = Net(state=LedgerState.from_genesis(pinned_genesis(test)))
    net.ok(*[net.commit(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
    net.until(L)
    return net


def test_the_ledger_catches_passing_unsuspicious_work_that_sits_above_the_honest_distance() -> None:
    """Every output of the cheat passes and none is suspicious -- the failure and flag runs see
    nothing -- but each sits at the cheat's side of the midpoint; the honest executor's at the
    other. Four outputs of five tokens cross the bound with a step of 0.5 nats per token."""
    test = DistanceTest(mid_nano=10_000, spread_nano=5_000, llr_per_token_micro=500_000, max_tokens=32)
    net = cheat_net(test)
    subtle = [net.infer("cheat") for _ in range(4)]
    honest = [net.infer("ex") for _ in range(4)]
    above = dataclasses.replace(OK, mean_distance_nano=test.mid_nano + test.spread_nano)
    summary = net.settle_epoch_1(verdict_of=lambda iid, who: above if iid in subtle else OK)
    cheat, ex = summary.participant(PEER["cheat"]), summary.participant(PEER["ex"])
    assert summary.disputes == 0
    assert cheat.caught == "sprt" and cheat.fees_refunded == 60 and cheat.sprt_carry == (0, 0, 0)
    assert ex.caught == "" and ex.fees_paid == 60 and len(honest) == ex.checked
    assert ex.sprt_carry[2] == 0  # below the midpoint: the run restarts, nothing carried


def test_a_model_without_a_pinned_distance_run_steps_no_run() -> None:
    net = cheat_net(None)
    subtle = [net.infer("cheat") for _ in range(4)]
    above = dataclasses.replace(OK, mean_distance_nano=10**9)
    summary = net.settle_epoch_1(verdict_of=lambda iid, who: above if iid in subtle else OK)
    assert summary.participant(PEER["cheat"]).caught == ""
