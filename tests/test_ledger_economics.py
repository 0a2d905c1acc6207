"""Verification economics on the ledger: each rule against its specification, the state
machine's handling of seeds, checks, disputes and settlement, a cheater caught in a
scenario, and random epochs under the invariants.

Every random test derives all its choices from one integer seed, printed (and noted for
hypothesis); replay a failure with ``ECONOMICS_SEED=<seed> pytest tests/test_ledger_economics.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections import Counter
from dataclasses import replace
from fractions import Fraction
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from ledger_driver import BAD, OK, LedgerDriver

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import disputes, duties, rules
from gonka_p2p.ledger.genesis import (
    Genesis,
    GenesisError,
    GenesisParticipant,
    Params,
    genesis_from_obj,
    sprt_params_from_rates,
)
from gonka_p2p.ledger.rules import PPM, DisputeOutcome, Forfeit, Observation
from gonka_p2p.ledger.block import Block
from gonka_p2p.ledger.end_of_block import format_epoch_summary
from gonka_p2p.ledger.epoch_test import NO_CARRY, run_epoch_test
from gonka_p2p.ledger.records import EpochSummary, Payout
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants, check_tx
from gonka_p2p.ledger.transactions import (
    MAX_DISTANCE_NANO,
    FailureFlag,
    Reason,
    VerdictStats,
    derive_validation_seed,
    to_nano,
    verdict_stats,
    withheld_verdict,
)
from gonka_p2p.ledger.executor_draw import executor_weights, may_execute
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id

CHAIN = "gonka-econ"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10  # epoch length; window 3, voting 2: epoch e ends at 10e + 10, settles at 10e + 15
NAMES = ("ta", "ex", "cheat", "v1", "v2", "v3", "alice", "bob", "newbie")
KEYS = {n: Keypair.from_seed(f"econ-{n}".encode()) for n in NAMES}
PEER = {n: k.peer_id for n, k in KEYS.items()}
NAME_OF = {p: n for n, p in PEER.items()}
WEIGHTS = {"ta": 10, "ex": 10, "cheat": 10, "v1": 10, "v2": 10, "v3": 10}


def params(**overrides: object) -> Params:
    base = dict(epoch_length_blocks=L, inference_deadline_blocks=3, request_window_ms=10**9,
                max_tx_bytes=64 * 1024, price_per_token={MODEL: 1},
                validation_window_blocks=3, dispute_voting_blocks=2, dispute_max_rounds=1,
                epoch_reward=100_000, validator_share_ppm=200_000,
                validation_cap_ppm=PPM)  # p = 1 checks everything: the scenarios below count on it
    base.update(overrides)
    return Params(**base)  # type: ignore[arg-type]


def genesis(weights: dict[str, int] = WEIGHTS, **overrides: object) -> Genesis:
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params(**overrides),
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, w, models=(MODEL,))
                                      for n, w in weights.items()),
                   allocations={PEER["alice"]: 1_000_000, PEER["bob"]: 1_000_000})


SUSPICIOUS = replace(OK, suspicious=True, mean_distance_nano=60_000_000)


class Net(LedgerDriver):
    """The economics ledger (``genesis()`` unless ``state`` is given) and its signers."""

    def __init__(self, state: LedgerState | None = None) -> None:
        super().__init__(state or LedgerState.from_genesis(genesis()), KEYS, "ta", MODEL)

    @property
    def height(self) -> int:
        return self.state.height

    def validate(self, who: str, iid: bytes, verdict: VerdictStats = OK, seed: bytes | None = None) -> bytes:
        """A check; a failing one carries the validator's seed for the inference's epoch (its duty's proof)."""
        if seed is None:
            record = self.state.inference(iid)
            epoch = self.state.inference_epoch(record) if record and record.closed_height else self.state.epoch
            seed = b"" if verdict.valid else self.seed(who, epoch)
        return super().validate(who, iid, verdict, seed)

    def infer(self, executor: str, client: str = "alice", ta: str = "ta",
              prompt: int = 10, completion: int = 5) -> bytes:
        """Start and finish an inference in one block; its id."""
        req = self.request(client, executor, ta)
        self.ok(self.start(req, executor, ta), self.finish(req, executor, prompt, completion))
        return inference_id(open_envelope(req, InferenceRequest))

    def settle_epoch_1(self, **check_duties) -> EpochSummary:
        """Every validator checks its epoch-1 duties and reveals; blocks run to settlement."""
        self.check_duties(1, **check_duties)
        self.until(20)
        self.ok(*[self.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
        self.until(25)
        return self.state.epoch_summary(1)

    def check_duties(self, epoch: int, verdict_of=lambda iid, who: OK,
                     who_all=("ta", "ex", "cheat", "v1", "v2", "v3")) -> None:
        """Every committed validator checks exactly its duties (what a diligent actor does)."""
        txs = []
        for who in who_all:
            if self.state.commitment(epoch, PEER[who]) is None:
                continue
            for iid in self.state.validation_duties(epoch, PEER[who], self.seed(who, epoch)):
                if (iid, PEER[who]) not in self.state.checks:
                    txs.append(self.validate(who, iid, verdict_of(iid, who)))
        self.ok(*txs)


def rejected(net: Net, tx: bytes, reason: Reason) -> None:
    assert check_tx(net.state, tx).reason is reason
    (r,) = net.block(tx)
    assert r.reason is reason, (r.reason, r.detail)


def committed_net(*, everyone: tuple[str, ...] = ("ta", "ex", "cheat", "v1", "v2", "v3"),
                  epoch: int = 1, **overrides: object) -> Net:
    """A network at the start of ``epoch`` whose listed participants committed seeds for it."""
    net = Net(state=LedgerState.from_genesis(genesis(**overrides)))
    net.until((epoch - 1) * L + 1)
    net.ok(*[net.commit(w, epoch) for w in everyone])
    net.until(epoch * L)
    return net


# =========================================================================== rules


def test_floor_is_100pct_to_100_inferences_then_linear_to_5pct_at_5000_and_1pct_from_10000() -> None:
    p = params()
    assert [rules.validation_floor_ppm(t, p) for t in (0, 50, 100)] == [PPM] * 3
    assert rules.validation_floor_ppm(5_000, p) == 50_000
    assert rules.validation_floor_ppm(2_550, p) == (PPM + 50_000) // 2  # halfway from 100 to 5,000
    assert rules.validation_floor_ppm(7_500, p) == 30_000  # halfway from 5,000 to 10,000
    assert rules.validation_floor_ppm(10_000, p) == rules.validation_floor_ppm(10**9, p) == 10_000
    floors = [rules.validation_floor_ppm(t, p) for t in range(0, 12_000, 7)]
    assert floors == sorted(floors, reverse=True)  # never rises with traffic


def test_p_validate_is_m_plus_one_minus_m_times_one_minus_r() -> None:
    assert rules.p_validate_ppm(reputation_ppm=0, floor_ppm=10_000) == PPM  # newcomer: always
    assert rules.p_validate_ppm(reputation_ppm=PPM, floor_ppm=10_000) == 10_000  # trusted: the floor
    assert rules.p_validate_ppm(reputation_ppm=500_000, floor_ppm=10_000) == 10_000 + 990_000 // 2
    assert rules.p_validate_ppm(reputation_ppm=PPM, floor_ppm=PPM) == PPM  # low traffic: always
    for r, m in [(333_333, 3), (1, 1), (999_999, 12_345)]:  # rounded up: never checks less than p
        assert rules.p_validate_ppm(r, m) == math.ceil(m + Fraction((PPM - m) * (PPM - r), PPM))


def test_the_validation_rate_is_capped_so_a_newcomer_is_not_checked_by_every_validator() -> None:
    p = params(validation_cap_ppm=990_000)
    assert rules.validation_ppm(0, PPM, p) == 990_000  # newcomer at low traffic: capped
    assert rules.validation_ppm(PPM, 10_000, p) == 10_000  # below the cap: p itself
    # Expected checks per inference with 40 validators of equal weight: all 40 at p = 1,
    # 4.35 at the cap (-ln(1 - 0.99) = 4.6 for many small ones), while at least one checks
    # with probability 0.99.
    q = rules.duty_threshold(990_000, 1, 40) / rules.DUTY_SCALE
    assert 4.3 < 40 * q < -math.log(0.01) and 1 - (1 - q) ** 40 == pytest.approx(0.99)
    assert rules.duty_threshold(PPM, 1, 40) == rules.DUTY_SCALE
    net = Net(state=LedgerState.from_genesis(genesis(validation_cap_ppm=990_000)))
    iid = net.infer("ex")
    assert net.state.inference(iid).validation_ppm == 990_000


@pytest.mark.parametrize("p_ppm", [1, 10_000, 333_333, 900_000, 999_999])
@pytest.mark.parametrize("weights", [[1, 1], [10, 1, 1], [5, 7, 11, 13, 2], [1] * 40])
def test_duty_thresholds_make_at_least_one_check_exactly_p(p_ppm, weights) -> None:
    """P(nobody checks) = prod_v (1 - q_v) = (1 - p)^(sum w_v / W) = 1 - p."""
    total = sum(weights)
    nobody = math.prod(Fraction(rules.DUTY_SCALE - rules.duty_threshold(p_ppm, w, total), rules.DUTY_SCALE)
                       for w in weights)
    assert abs(float(1 - nobody) - p_ppm / PPM) < 1e-15 * len(weights)


def test_duty_threshold_grows_with_weight_and_is_p_for_a_lone_validator_all_or_none_at_the_ends() -> None:
    assert rules.duty_threshold(250_000, 3, 3) == rules.DUTY_SCALE // 4
    assert rules.duty_threshold(PPM, 1, 100) == rules.DUTY_SCALE  # p = 1: every validator checks
    assert rules.duty_threshold(0, 50, 100) == 0
    assert rules.duty_threshold(500_000, 1, 10) < rules.duty_threshold(500_000, 2, 10)


def test_duties_drawn_from_independent_seeds_check_about_p_of_inferences() -> None:
    """Over the validators' secret seeds, an inference lies on at least one arc with probability p
    (each epoch's seeds are fresh: one trial is one epoch's seeds and one inference's point)."""
    seed = 20_260_301
    print(f"duty draw seed={seed}")
    rng = random.Random(seed)
    weights = [3, 1, 1, 5]
    p_ppm, n = 300_000, 6_000
    checked = sum(any(duties.is_validation_duty(rng.randbytes(32), point, p_ppm, w, sum(weights)) for w in weights)
                  for point in (rng.getrandbits(64) for _ in range(n)))
    assert abs(checked / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


def test_a_seed_commitment_binds_the_epoch_and_the_validator() -> None:
    seed = b"s" * 32
    c = rules.seed_commitment(3, PEER["v1"], seed)
    assert c == rules.seed_commitment(3, PEER["v1"], seed) and len(c) == 32
    assert c != rules.seed_commitment(4, PEER["v1"], seed)
    assert c != rules.seed_commitment(3, PEER["v2"], seed)
    assert c != rules.seed_commitment(3, PEER["v1"], b"t" * 32)


def test_seeds_are_committed_in_the_epoch_before_and_revealed_between_its_end_and_settlement() -> None:
    p = params()
    assert [h for h in range(1, 40) if rules.seed_commit_open(2, h, p)] == list(range(11, 21))
    assert not any(rules.seed_commit_open(0, h, p) for h in range(1, 40))  # the bootstrap epoch
    assert [h for h in range(1, 60) if rules.seed_reveal_open(2, h, p)] == list(range(31, 36))


def test_an_epoch_is_checked_for_a_window_after_it_ends_then_disputed_then_settled() -> None:
    p = params()
    assert [rules.epoch_of(h, p) for h in (1, 10, 11, 20)] == [0, 0, 1, 1]
    assert rules.validation_deadline(1, p) == 23 and rules.settlement_height(1, p) == 25
    assert disputes.dispute_draw_height(23, p) == 24 and disputes.dispute_deadline(23, p) == 25
    # the last possible dispute's last round (one here) ends as the epoch settles
    assert [h for h in range(1, 50) if rules.epoch_settled_at(h, p) is not None] == [15, 25, 35, 45]
    assert all(rules.epoch_settled_at(rules.settlement_height(e, p), p) == e for e in range(6))


def test_genesis_refuses_an_epoch_that_would_settle_after_the_next_one_ends() -> None:
    with pytest.raises(GenesisError, match="must not exceed epoch_length_blocks"):
        genesis(epoch_length_blocks=4)  # window 3 + voting 2 > 4


@pytest.mark.parametrize("change, message", [
    (dict(floor_mid_ppm=2_000_000), "at most"),
    (dict(floor_low_ppm=60_000), "only falls"),
    (dict(floor_mid_inferences=50), "floor schedule"),
    (dict(dispute_committee_size=0), "positive"),
    (dict(validator_share_ppm=PPM + 1), "at most"),
])
def test_genesis_refuses_inconsistent_verification_params(change, message) -> None:
    obj = genesis().to_obj()
    obj["params"].update(change)
    with pytest.raises(GenesisError, match=message):
        genesis_from_obj(obj)


def test_a_committee_is_seats_drawn_by_weight_with_replacement_deterministic() -> None:
    candidates = {"a": 1, "b": 1, "c": 8, "zero": 0}
    draw = disputes.draw_committee(candidates, b"h" * 32, b"i" * 32, 0, 255)
    assert draw == disputes.draw_committee(candidates, b"h" * 32, b"i" * 32, 0, 255)
    assert [peer for peer, _ in draw] == ["a", "b", "c"] and sum(seats for _, seats in draw) == 255
    assert dict(draw)["c"] > 2 * (dict(draw)["a"] + dict(draw)["b"])  # ~80 % of the seats
    assert draw != disputes.draw_committee(candidates, b"h" * 32, b"i" * 32, 1, 255)  # a new round
    assert disputes.draw_committee({}, b"h" * 32, b"i" * 32, 0, 3) == ()


def test_a_strict_majority_of_all_seats_convicts_half_of_them_clears() -> None:
    assert disputes.dispute_outcome(invalid_seats=128, valid_seats=0, seats=255) is DisputeOutcome.INVALID
    assert disputes.dispute_outcome(invalid_seats=127, valid_seats=0, seats=255) is DisputeOutcome.UNDECIDED
    assert disputes.dispute_outcome(invalid_seats=0, valid_seats=128, seats=255) is DisputeOutcome.VALID
    assert disputes.dispute_outcome(invalid_seats=2, valid_seats=2, seats=4) is DisputeOutcome.VALID
    assert disputes.dispute_outcome(invalid_seats=100, valid_seats=100, seats=255) is DisputeOutcome.UNDECIDED
    assert disputes.dispute_outcome(invalid_seats=0, valid_seats=0, seats=255) is DisputeOutcome.UNDECIDED


def test_a_verdict_is_valid_exactly_when_it_names_no_failure() -> None:
    assert rules.verdict_is_consistent(True, False, 0) and rules.verdict_is_consistent(True, True, 0)
    assert rules.verdict_is_consistent(False, False, 16)
    assert not rules.verdict_is_consistent(True, False, 16)
    assert not rules.verdict_is_consistent(False, False, 0)
    assert not rules.verdict_is_consistent(False, True, 16)


def test_one_observation_per_checked_inference_disputes_decide_majorities_judge_suspicion() -> None:
    assert rules.inference_observation(DisputeOutcome.INVALID, []) is Observation.FAILED
    assert rules.inference_observation(DisputeOutcome.VALID, [(1, True)]) is Observation.CLEAN
    assert rules.inference_observation(DisputeOutcome.UNDECIDED, []) is None  # not clean: no evidence
    assert rules.inference_observation(DisputeOutcome.UNDECIDED, [(2, True), (1, False)]) is Observation.SUSPICIOUS
    assert rules.inference_observation(None, []) is None
    assert rules.inference_observation(None, [(3, True), (2, False)]) is Observation.SUSPICIOUS
    assert rules.inference_observation(None, [(2, True), (3, False)]) is Observation.CLEAN
    assert rules.inference_observation(None, [(2, True), (2, False)]) is Observation.CLEAN


def test_sprt_accepts_honest_after_a_clean_run_and_restarts_so_late_cheating_is_caught() -> None:
    p = params()
    clean, sus, fail = Observation.CLEAN, Observation.SUSPICIOUS, Observation.FAILED
    assert rules.wald_step_micro(0, False, 7, 5, p) == (-5, False)
    assert rules.wald_step_micro(0, True, p.sprt_cheating_bound_micro, 5, p) == (p.sprt_cheating_bound_micro, True)
    assert rules.wald_step_micro(1 - p.sprt_honest_bound_micro, False, 7, 5, p) == (0, False)  # restarts
    assert not run_epoch_test([clean] * 1000, NO_CARRY, p).accused
    assert not run_epoch_test([clean] * 20 + [sus] + [clean] * 20 + [sus], NO_CARRY, p).accused  # honest noise
    assert run_epoch_test([sus] * 3, NO_CARRY, p).accused
    # Early good behaviour buys nothing: a run never sits below the honest bound, so after any
    # clean prefix five suspicious outputs in a row accuse (5 x ln 30 > both bounds together).
    for prefix in range(40):
        assert run_epoch_test([clean] * (500 + prefix) + [sus] * 5, NO_CARRY, p).accused
    assert run_epoch_test([fail, sus, fail, sus], NO_CARRY, p).accused


def test_sprt_params_come_from_the_metrics_rates_and_the_defaults_are_its_defaults() -> None:
    verification_params = pytest.importorskip("gonka_p2p.inference.verification_params")
    derived = sprt_params_from_rates(**dataclasses.asdict(verification_params.SprtParams()))
    assert derived == {k: getattr(Params(), k) for k in derived}
    assert set(derived) == {f.name for f in dataclasses.fields(Params) if f.name.startswith("sprt_")}


def test_the_miss_rate_limit_is_a_share_of_the_executors_inferences() -> None:
    p = params(miss_rate_limit_ppm=100_000)
    assert not rules.miss_rate_exceeded(missed=1, completed=9, params=p)  # exactly 10 %
    assert rules.miss_rate_exceeded(missed=2, completed=9, params=p)
    assert not rules.miss_rate_exceeded(missed=0, completed=0, params=p)


def test_reputation_grows_1_over_n_per_clean_epoch_reaching_1_after_exactly_n_and_resets_on_cheating() -> None:
    p = params(reputation_growth_epochs=30)

    def after(r: int, caught: bool = False, missed_too_many: bool = False, overturned: bool = False,
              clean: bool = True) -> int:
        return rules.reputation_after_epoch(r, caught=caught, missed_too_many=missed_too_many,
                                            overturned=overturned, clean=clean, params=p)
    r = 0
    for epoch in range(1, 31):
        r = after(r)
        assert (r == PPM) == (epoch == 30)
    assert after(r) == PPM and after(r, clean=False) == r
    assert after(r, caught=True) == after(r, missed_too_many=True) == after(r, overturned=True) == 0


def test_forfeit_reasons_name_every_failure_to_earn_the_reward() -> None:
    def reasons(**kw):
        base = dict(in_validator_set=True, committed=True, revealed=True, skipped=0, missed_votes=0,
                    caught=False)
        return rules.forfeit_reasons(**{**base, **kw})
    assert reasons() == ()
    assert reasons(caught=True) == (Forfeit.CAUGHT,)
    assert reasons(skipped=2) == (Forfeit.SKIPPED_DUTIES,)
    assert reasons(missed_votes=1) == (Forfeit.MISSED_VOTES,)
    assert reasons(revealed=False) == (Forfeit.NO_REVEAL,)
    assert reasons(committed=False, revealed=False) == (Forfeit.NO_COMMIT,)
    assert reasons(in_validator_set=False, committed=False, revealed=False) == ()
    assert reasons(vouched_invalid=1) == (Forfeit.VOUCHED_INVALID,)


def test_the_epoch_reward_splits_validator_share_and_epoch_0_has_none() -> None:
    p = params(epoch_reward=1_000, validator_share_ppm=250_000)
    assert rules.epoch_reward_pools(1, p) == (750, 250)
    assert rules.epoch_reward_pools(0, p) == (0, 0)


def test_pro_rata_rounds_each_share_down_and_never_exceeds_the_pool() -> None:
    assert rules.pro_rata(100, {"a": 1, "b": 1, "c": 1}) == {"a": 33, "b": 33, "c": 33}
    assert rules.pro_rata(100, {"a": 3, "b": 1, "z": 0}) == {"a": 75, "b": 25}
    assert rules.pro_rata(100, {}) == {} and rules.pro_rata(100, {"a": 0}) == {}


def test_a_metric_verdict_is_encoded_as_integers() -> None:
    v = SimpleNamespace(valid=False, reasons=("distance: mean 3 nats", "sampling: 2 tokens"),
                        evidence=SimpleNamespace(value="failed"), n_tokens=17, mean_distance=math.inf,
                        max_distance=2.5e-6, top_k_misses=0, sampling_mismatches=2, near_ties=0)
    stats = verdict_stats(v)
    assert stats.failure_flags == FailureFlag.DISTANCE | FailureFlag.SAMPLING and not stats.valid
    assert stats.mean_distance_nano == MAX_DISTANCE_NANO and stats.max_distance_nano == 2_500
    ok = verdict_stats(SimpleNamespace(**{**v.__dict__, "valid": True, "reasons": (),
                                          "evidence": SimpleNamespace(value="suspicious"),
                                          "mean_distance": 1e-6}))
    assert ok.valid and ok.suspicious and ok.failure_flags == 0 and ok.mean_distance_nano == 1_000
    assert VerdictStats.decode(stats.encode()) == stats
    assert to_nano(float("nan")) == MAX_DISTANCE_NANO and to_nano(-1e-12) == 0
    assert withheld_verdict().failure_flags == FailureFlag.WITHHELD


# =========================================================================== seeds on the ledger


def test_a_seed_is_committed_once_in_the_epoch_before_by_a_participant_with_weight() -> None:
    net = Net()
    net.ok(net.commit("v1", 1))
    assert net.state.commitment(1, PEER["v1"]).height == 1
    rejected(net, net.commit("v1", 1), Reason.ALREADY_COMMITTED)
    rejected(net, net.commit("v2", 2), Reason.WRONG_EPOCH)  # epoch 2 is committed during epoch 1
    rejected(net, net.commit("alice", 1), Reason.NOT_A_VALIDATOR)
    net.until(10)
    rejected(net, net.commit("v2", 1), Reason.WRONG_EPOCH)  # epoch 1 has begun
    net.ok(net.commit("v2", 2))


def test_a_seed_is_revealed_after_its_epoch_ends_and_must_open_the_commitment() -> None:
    net = committed_net(everyone=("v1", "v2"))
    rejected(net, net.reveal("v1", 1), Reason.WRONG_EPOCH)  # epoch 1 still running
    net.until(20)
    rejected(net, net.reveal("v1", 1, seed=b"x" * 32), Reason.SEED_MISMATCH)
    rejected(net, net.reveal("v1", 1, seed=b"x" * 5), Reason.MALFORMED)
    rejected(net, net.reveal("v3", 1), Reason.NO_COMMITMENT)
    (r,) = net.ok(net.reveal("v1", 1))
    assert "0 duties" in r.detail and net.state.commitment(1, PEER["v1"]).revealed
    rejected(net, net.reveal("v1", 1), Reason.ALREADY_REVEALED)
    net.until(25)
    rejected(net, net.reveal("v2", 1), Reason.WRONG_EPOCH)  # settled: too late


# =========================================================================== checks on the ledger


def test_p_is_fixed_when_an_inference_settles_from_the_executors_reputation_and_the_floor() -> None:
    net = Net()
    participant = net.state.registry.rows[PEER["ex"]]
    net.state.registry.rows[PEER["ex"]] = replace(participant, reputation_ppm=PPM)  # trusted
    info = net.state.epochs.rows[0]
    net.state.epochs.rows[0] = replace(info, floor_ppm=20_000)  # high traffic
    iid = net.infer("ex")
    assert net.state.inference(iid).validation_ppm == 20_000
    assert net.state.validation_rate_ppm(PEER["ex"]) == 20_000
    assert net.state.validation_rate_ppm(PEER["newbie"]) == PPM


def test_the_floor_of_an_epoch_follows_the_previous_epochs_traffic() -> None:
    """Traffic counts each executor's settled inferences up to its weight's fair share
    (rules.floor_traffic): ex's second inference is above the median of 1 per 10 weight."""
    net = Net(state=LedgerState.from_genesis(genesis(floor_full_until_inferences=1, floor_mid_inferences=4,
                                                     floor_low_inferences=6)))
    for executor in ("ex", "ex", "cheat", "v1", "v2"):
        net.infer(executor)
    net.until(10)
    info = net.state.epoch_info(1)
    assert info.traffic == 4 and info.floor_ppm == 50_000
    assert info.weights == {PEER[n]: w for n, w in WEIGHTS.items()}


def test_eligible_validators_are_committed_and_never_the_executor_or_the_ta() -> None:
    net = committed_net(everyone=("ta", "ex", "v1", "v2"))
    iid = net.infer("ex")
    assert net.state.validation_candidates(iid) == {PEER["v1"]: 10, PEER["v2"]: 10}
    view = disputes.validation_view(net.state, iid)
    assert view.p_ppm == PPM and [d.q for d in view.validators] == [1.0, 1.0]  # p = 1: all check
    assert all(d.duty is None for d in view.validators)  # seeds still secret
    assert net.state.is_validation_duty(iid, PEER["v1"], net.seed("v1", 1))
    assert not net.state.is_validation_duty(iid, PEER["ex"], net.seed("ex", 1))


def test_a_check_must_come_from_a_committed_validator_within_the_window_once() -> None:
    net = committed_net(everyone=("ta", "ex", "v1", "v2"))
    iid = net.infer("ex")
    rejected(net, net.validate("ex", iid), Reason.CONFLICT_OF_INTEREST)
    rejected(net, net.validate("ta", iid), Reason.CONFLICT_OF_INTEREST)
    rejected(net, net.validate("v3", iid), Reason.NOT_A_VALIDATOR)  # weighted but not committed
    rejected(net, net.validate("v1", iid, replace(OK, failure_flags=1)), Reason.INCONSISTENT_VERDICT)
    rejected(net, net.validate("v1", b"\x00" * 32), Reason.UNKNOWN_INFERENCE)
    rejected(net, net.validate("v1", b"\x00" * 3), Reason.MALFORMED)
    net.ok(net.validate("v1", iid))
    assert net.state.validations(iid)[PEER["v1"]].valid
    rejected(net, net.validate("v1", iid), Reason.DUPLICATE_VALIDATION)
    net.until(20)
    net.ok(net.reveal("v1", 1))
    rejected(net, net.validate("v1", net.infer("ex")), Reason.NOT_A_VALIDATOR)  # epoch 2: no seed
    net.until(23)
    rejected(net, net.validate("v2", iid), Reason.VALIDATION_CLOSED)


def test_running_work_cannot_be_checked() -> None:
    net = committed_net(everyone=("v1",))
    req = net.request("alice", "ex")
    net.ok(net.start(req, "ex"))
    rejected(net, net.validate("v1", inference_id(open_envelope(req, InferenceRequest))), Reason.NOT_VALIDATABLE)


def test_reveal_recomputes_duties_and_a_validator_that_skipped_one_forfeits_its_reward() -> None:
    net = committed_net()
    iids = [net.infer("ex", ta="ta"), net.infer("cheat", ta="ta"), net.infer("ex", ta="cheat")]
    net.check_duties(1, who_all=("ta", "ex", "cheat", "v1", "v3"))  # v2 checks nothing
    net.until(20)
    receipts = net.ok(*[net.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
    assert all(" 0 skipped" in r.detail for i, r in enumerate(receipts) if i != 4)
    assert "3 duties, 0 done, 3 skipped" in receipts[4].detail  # p = 1: all three were its duties
    view = disputes.validation_view(net.state, iids[0])
    assert {NAME_OF[d.peer]: d.duty for d in view.validators} == {"cheat": True, "v1": True, "v2": True,
                                                                   "v3": True}
    net.until(25)
    summary = net.state.epoch_summary(1)
    v1, v2 = summary.participant(PEER["v1"]), summary.participant(PEER["v2"])
    assert v2.forfeit == ("skipped_duties",) and v2.validator_reward == 0 and v2.forfeited == 0  # no work
    assert v1.forfeit == () and v1.validator_reward > 0 and v1.duties == v1.done == 3
    assert net.state.balance(PEER["v2"]) == 0


def test_a_validator_that_does_not_reveal_or_did_not_commit_forfeits() -> None:
    net = committed_net(everyone=("ta", "ex", "cheat", "v1", "v2"))
    net.infer("ex")
    net.check_duties(1)
    net.until(20)
    net.ok(*[net.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1")])  # v2 keeps its seed
    net.until(25)
    summary = net.state.epoch_summary(1)
    v2 = summary.participant(PEER["v2"])
    assert v2.forfeit == ("no_reveal",) and v2.checks == 1  # it checked, but never claimed:
    assert v2.work == v2.validator_reward == 0  # without its seed no check counts as a duty
    assert summary.participant(PEER["v3"]).forfeit == ("no_commit",)
    assert summary.participant(PEER["v1"]).forfeit == ()
    assert summary.minted + summary.forfeited <= summary.reward
    assert net.state.minted == summary.minted + net.state.epoch_summary(0).minted


# =========================================================================== disputes


HEAVY = {"ta": 10, "ex": 10, "cheat": 10, "v1": 10, "v2": 30, "v3": 30}  # non-parties: 70 % of the seats


def votes_on(net: Net, iid: bytes, votes: dict[str, VerdictStats | None]) -> list[bytes]:
    """The committee members named vote as given, in order, until a majority of all seats decides
    (a vote after that would be refused); None, or not seated: silent."""
    dispute = net.state.dispute(iid)
    seats = dict(zip(dispute.committee, dispute.seats, strict=True))
    tally, txs = {True: 0, False: dispute.accuser_seats}, []  # the accuser's failing check is its vote
    for name, verdict in votes.items():
        decided = disputes.dispute_outcome(tally[False], tally[True], net.state.params.dispute_committee_size)
        if verdict is None or PEER[name] not in seats or decided is not DisputeOutcome.UNDECIDED:
            continue
        txs.append(net.vote(name, iid, verdict))
        tally[verdict.valid] += seats[PEER[name]]
    return txs


def cast(net: Net, iid: bytes, votes: dict[str, VerdictStats | None]) -> None:
    """:func:`votes_on` in one block."""
    txs = votes_on(net, iid, votes)
    if txs:
        net.ok(*txs)


def disputed(votes: dict[str, VerdictStats | None], accuser: str = "v1") -> tuple[Net, bytes]:
    """Epoch 1: ``cheat`` executes one inference that ``ta`` routed; ``accuser`` fails it; the
    next block's hash draws the committee (255 seats by weight; the executor's recused, the
    accuser's counted as its "invalid" vote); its members vote as given (:func:`cast`)."""
    net = committed_net(weights=HEAVY)
    iid = net.infer("cheat")
    (r,) = net.ok(net.validate(accuser, iid, BAD))
    assert "dispute opened" in r.detail and net.state.dispute(iid).committee == ()
    net.ok()
    dispute = net.state.dispute(iid)
    assert dispute.voting and {NAME_OF[m] for m in dispute.committee} == {"ta", "ex", "v2", "v3"} - {accuser}
    assert sum(dispute.seats) + dispute.accuser_seats < net.state.params.dispute_committee_size  # the executor's count
    cast(net, iid, votes)
    return net, iid


def test_a_failed_check_opens_a_dispute_drawn_a_block_later_without_its_parties() -> None:
    net = committed_net(weights=HEAVY)
    iid = net.infer("cheat")
    net.ok(net.validate("v1", iid, BAD))
    assert check_tx(net.state, net.vote("v2", iid, BAD)).reason is Reason.NOT_ON_COMMITTEE  # not drawn yet
    net.next_seq.clear()
    net.ok()
    assert check_tx(net.state, net.vote("v1", iid, BAD)).reason is Reason.NOT_ON_COMMITTEE  # the accuser
    assert check_tx(net.state, net.vote("v1", b"\x01" * 32, BAD)).reason is Reason.NO_DISPUTE
    net.next_seq.clear()
    receipts = net.block(net.vote("v2", iid, BAD), net.validate("v2", iid, BAD),  # a vote and a duty
                         net.vote("v2", iid, BAD))  # check are separate; one vote each
    assert [r.reason for r in receipts] == [Reason.OK, Reason.OK, Reason.DUPLICATE_VOTE]
    assert net.state.dispute(iid).accuser == PEER["v1"]


def test_a_majority_of_all_seats_decides_at_once() -> None:
    net, iid = disputed({"v2": BAD, "v3": BAD, "ex": OK})
    dispute = net.state.dispute(iid)
    seats = dict(zip(dispute.committee, dispute.seats, strict=True))
    assert dispute.outcome is DisputeOutcome.INVALID
    assert (dispute.invalid_seats, dispute.valid_seats) == (
        dispute.accuser_seats + seats[PEER["v2"]] + seats[PEER["v3"]], 0)
    rejected(net, net.vote("ex", iid, OK), Reason.VOTING_CLOSED)


def test_a_round_without_a_majority_is_undecided_not_clean_and_its_silent_members_forfeit() -> None:
    net, iid = disputed({"ex": OK, "v2": None, "v3": None})  # one round here (test_framing redraws)
    dispute = net.state.dispute(iid)
    assert dispute.outcome is DisputeOutcome.UNDECIDED
    assert sorted(dispute.silent) == sorted([PEER["ta"], PEER["v2"], PEER["v3"]])
    summary = net.settle_epoch_1()
    assert summary.participant(PEER["v2"]).forfeit == ("missed_votes",)
    assert summary.participant(PEER["v2"]).missed_votes == 1
    assert summary.participant(PEER["ex"]).votes == 1 and summary.participant(PEER["ex"]).forfeit == ()
    cheat = summary.participant(PEER["cheat"])
    assert cheat.caught == "" and cheat.fees_paid == 15  # the benefit of the doubt, but no clean mark


def test_an_overturned_accusation_costs_the_executor_nothing_and_the_accuser_its_reward() -> None:
    net, iid = disputed({"v2": OK, "v3": OK})
    assert net.state.dispute(iid).outcome is DisputeOutcome.VALID
    summary = net.settle_epoch_1()
    cheat, v1 = summary.participant(PEER["cheat"]), summary.participant(PEER["v1"])
    assert cheat.caught == "" and cheat.fees_paid == 15 and cheat.reputation_after > 0
    assert net.state.inference(iid).payout is Payout.PAID
    assert v1.overturned == 1 and net.state.participant(PEER["v1"]).overturned == 1
    assert "overturned" in v1.forfeit and v1.validator_reward == 0 and v1.reputation_after == 0
    v2 = summary.participant(PEER["v2"])
    assert v2.work == 15 and v2.votes == 1  # its duty; a vote earns no share


def test_a_validator_that_passed_work_a_dispute_proved_invalid_forfeits_its_reward() -> None:
    """A rubber stamp: v2 passes the cheat that v1 fails and the committee convicts."""
    net = committed_net(weights=HEAVY)
    iid = net.infer("cheat")
    net.ok(net.validate("v2", iid, OK), net.validate("v1", iid, BAD))
    net.ok()
    cast(net, iid, {"v3": BAD, "v2": BAD, "ex": BAD})
    assert net.state.dispute(iid).outcome is DisputeOutcome.INVALID
    summary = net.settle_epoch_1()
    v1, v2 = summary.participant(PEER["v1"]), summary.participant(PEER["v2"])
    assert "vouched_invalid" in v2.forfeit and v2.validator_reward == 0 and v2.forfeited > 0
    assert "vouched_invalid" not in v1.forfeit and v1.validator_reward > 0


def test_an_invalid_dispute_sanctions_at_once_refunds_all_its_clients_and_cuts_weight_at_settlement() -> None:
    net = committed_net(weights=HEAVY)
    iid, other = net.infer("cheat"), net.infer("cheat", client="bob")
    net.ok(net.validate("v1", iid, BAD))
    net.ok()
    cast(net, iid, {"v2": BAD, "v3": BAD, "ex": BAD})
    assert net.state.dispute(iid).outcome is DisputeOutcome.INVALID
    convicted = net.state.participant(PEER["cheat"])
    assert convicted.sanctioned and convicted.reputation_ppm == 0  # at once: drawn for no new client
    assert not may_execute(net.state, PEER["cheat"])  # TAs route around it; the draw table stays frozen
    # Its voting power moved at the next settlement (epoch 0's, at the end of this very block):
    assert net.state.height == 15 and net.state.epoch_summary(0).participant(PEER["cheat"]).weight_after == 0
    net.check_duties(1, verdict_of=lambda i, who: OK)
    alice, bob = net.state.balance(PEER["alice"]), net.state.balance(PEER["bob"])
    net.until(20)
    net.ok(*[net.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
    net.until(25)
    summary = net.state.epoch_summary(1)
    cheat = summary.participant(PEER["cheat"])
    assert cheat.caught == "dispute" and cheat.forfeit == ("caught",) and cheat.fees_paid == 0
    assert cheat.fees_refunded == 30 and cheat.executor_reward == 0 and cheat.reputation_after == 0
    assert dict(summary.refunds) == {PEER["alice"]: 15, PEER["bob"]: 15}
    assert net.state.balance(PEER["alice"]) == alice + 15 and net.state.balance(PEER["bob"]) == bob + 15
    assert net.state.inference(iid).payout is net.state.inference(other).payout is Payout.REFUNDED
    assert net.state.balance(PEER["cheat"]) == 0 and net.state.pending_fees(PEER["cheat"]) == 0
    participant = net.state.participant(PEER["cheat"])
    assert cheat.weight_after == participant.weight == 0  # 10 of 100: within one settlement's 10 %
    assert participant.caught == 1 and PEER["cheat"] in net.state.participants()
    assert PEER["cheat"] not in net.state.weights()
    net.until(30)
    assert PEER["cheat"] not in net.state.epoch_info(3).weights  # rotated out of the validator set
    rejected(net, net.commit("cheat", 4), Reason.NOT_A_VALIDATOR)


def test_the_epoch_test_catches_an_executor_whose_valid_work_is_too_often_suspicious() -> None:
    net = committed_net()
    subtle = [net.infer("cheat") for _ in range(4)]
    honest = [net.infer("ex") for _ in range(4)]
    summary = net.settle_epoch_1(verdict_of=lambda iid, who: SUSPICIOUS if iid in subtle else OK)
    assert summary.disputes == 0
    cheat, ex = summary.participant(PEER["cheat"]), summary.participant(PEER["ex"])
    assert cheat.caught == "sprt" and cheat.fees_refunded == 60
    assert net.state.participant(PEER["cheat"]).weight == 4  # one settlement moves 10 % of 60 at most
    assert ex.caught == "" and ex.fees_paid == 60 and ex.checked == 4
    assert all(net.state.inference(i).payout is Payout.PAID for i in honest)


SUBTLE_KEYS = {n: Keypair.from_seed(f"econ-subtle-{n}".encode())
               for n in ("ta", "cheat", "v1", "v2", "v3", "v4", "partner", "alice")}
SUBTLE_VALIDATORS = ("v1", "v2", "v3", "v4", "partner")


def run_subtle_epoch(partner_stamps: bool) -> str:
    """Epoch 1 of a network where ta routes and cheat executes (the only one serving the model),
    four validators of weight 10 and a partner of weight 20 (a quarter of the total) committed
    seeds, and p is capped at 30 % (few duties each, as on a busy network): 30 inferences of a
    subtle cheat, every honest check of which finds it valid but suspicious. How the cheat
    was caught at settlement ("" if not)."""
    participants = tuple(GenesisParticipant(SUBTLE_KEYS[n].public_key, 20 if n == "partner" else 10,
                                            models=(MODEL,) if n == "cheat" else ())
                         for n in ("ta", "cheat", *SUBTLE_VALIDATORS))
    d = LedgerDriver(LedgerState.from_genesis(Genesis(
        chain_id="gonka-econ-subtle", genesis_time_ms=T0, params=params(validation_cap_ppm=300_000),
        participants=participants, allocations={SUBTLE_KEYS["alice"].peer_id: 10**6})), SUBTLE_KEYS, "ta", MODEL)
    d.until(1)
    d.ok(*[d.commit(v, 1) for v in SUBTLE_VALIDATORS])
    d.until(10)
    ids = []
    for _ in range(3):
        reqs = [d.request("alice", "cheat") for _ in range(10)]
        d.ok(*[tx for r in reqs for tx in (d.start(r, "cheat"), d.finish(r, "cheat"))])
        ids += [inference_id(open_envelope(r, InferenceRequest)) for r in reqs]
    txs = []
    for v in SUBTLE_VALIDATORS:
        duties = set(d.state.validation_duties(1, d.peer(v), d.seed(v, 1)))
        if v == "partner" and partner_stamps:  # a pass, no seed needed, on *every* inference of the cheat
            txs += [d.validate(v, iid, OK) for iid in ids]
        else:
            txs += [d.validate(v, iid, SUSPICIOUS) for iid in ids if iid in duties]
    d.ok(*txs)
    d.until(20)
    d.ok(*[d.reveal(v, 1) for v in SUBTLE_VALIDATORS])
    d.until(25)
    summary = d.state.epoch_summary(1)
    assert not partner_stamps or summary.participant(d.peer("partner")).forfeit == ()  # costs it nothing
    return summary.participant(d.peer("cheat")).caught


def test_a_rubber_stamping_validator_cannot_whitewash_a_subtle_cheat_with_passes_that_were_not_its_duty() -> None:
    """The epoch test turns each checked inference into one observation, suspicious when a
    weighted majority of its passing checks say so (``rules.inference_observation``; the
    distance run likewise takes their weighted median). A pass needs no proof of duty
    (``tx_rules.process_validation``): any committed validator may pass any inference.

    Attack: the cheat's partner, holding a quarter of the weight, passes every inference of the
    cheat as clean, so each honest duty holder's "suspicious" is at best a tie and the cheat
    escapes; the partner forfeits nothing (no dispute proves valid-but-suspicious work invalid).
    So only passes that the reveal proves were their signer's duty are evidence
    (``end_of_block.tally_epoch``); dispute votes count through the dispute's outcome."""
    assert run_subtle_epoch(partner_stamps=False) == "sprt"  # baseline: the honest duties catch it
    assert run_subtle_epoch(partner_stamps=True) == "sprt", "the partner's off-duty passes whitewash the cheat"


def test_too_many_missed_requests_reset_reputation() -> None:
    net = committed_net(everyone=("ta", "v1"))
    net.state.registry.rows[PEER["ex"]] = replace(net.state.registry.rows[PEER["ex"]], reputation_ppm=500_000)
    iid = net.infer("ex")
    net.ok(net.start(net.request("alice", "ex"), "ex"))  # never finished: expires in its hands
    net.ok(net.validate("v1", iid))
    net.until(25)
    ex = net.state.epoch_summary(1).participant(PEER["ex"])
    assert (ex.inferences, ex.expired) == (1, 1) and ex.reputation_after == 0  # 50 % > 10 %


def test_a_clean_checked_epoch_adds_one_thirtieth_of_reputation_unchecked_work_adds_nothing() -> None:
    net = committed_net(everyone=("ta", "v1"))
    checked = net.infer("ex")
    net.infer("cheat")  # nobody checks it
    net.ok(net.validate("v1", checked))
    net.until(20)
    net.ok(net.reveal("v1", 1))  # a pass is evidence only once the reveal proves it a duty
    net.until(25)
    summary = net.state.epoch_summary(1)
    assert summary.participant(PEER["ex"]).reputation_after == -(-PPM // 30)
    assert summary.participant(PEER["cheat"]).reputation_after == 0


def test_rewards_split_by_tokens_executed_and_by_validation_work_and_forfeits_are_not_minted() -> None:
    """Executors by the tokens they executed, not weight x tokens: the draw already sends an
    executor traffic in proportion to its weight (the simulator measured reward ~ weight^1.6
    when weight was counted twice). Each executor's tokens are capped at its weight's fair
    share (rules.fair_share_scores): here the median is ex's 20 tokens per 30 weight, so
    cheat's 40 tokens (weight 10) score 10 x 2/3, rounded down: 6."""
    w = {"ta": 10, "ex": 30, "cheat": 10, "v1": 10, "v2": 10, "v3": 10}
    net = Net(state=LedgerState.from_genesis(genesis(weights=w)))
    net.until(1)
    net.ok(*[net.commit(x, 1) for x in ("ta", "ex", "cheat", "v1", "v2")])
    net.until(10)
    net.infer("ex", prompt=10, completion=10)  # 20 tokens (weight 30)
    net.infer("cheat", prompt=30, completion=10)  # 40 tokens (weight 10)
    net.check_duties(1)
    net.until(20)
    net.ok(*[net.reveal(x, 1) for x in ("ta", "ex", "cheat", "v1", "v2")])
    net.until(25)
    s = net.state.epoch_summary(1)
    row = {NAME_OF[r.peer]: r for r in s.participants}
    assert (row["ex"].executor_reward, row["cheat"].executor_reward) == (80_000 * 20 // 26, 80_000 * 6 // 26)
    work = {n: row[n].work for n in ("ta", "ex", "cheat", "v1", "v2")}
    assert work == {"ta": 0, "ex": 40, "cheat": 20, "v1": 60, "v2": 60}  # every duty, p = 1
    assert row["v1"].validator_reward == 20_000 * 60 // 180 and row["v3"].forfeit == ("no_commit",)
    assert s.minted == sum(r.executor_reward + r.validator_reward for r in s.participants)
    assert s.reward - s.minted - s.forfeited < len(s.participants)  # rounding dust only
    assert net.state.minted == s.minted and net.state.total_coins() == net.state.genesis.supply + s.minted - net.state.burned
    assert net.state.balance(PEER["ex"]) == 20 + row["ex"].executor_reward + row["ex"].validator_reward


def test_epoch_0_without_genesis_seeds_pays_fees_unchecked_and_mints_no_reward() -> None:
    net = Net()
    net.infer("ex")
    net.until(15)
    s = net.state.epoch_summary(0)
    assert s.reward == s.minted == 0 and s.fees_paid == 15 and net.state.balance(PEER["ex"]) == 15
    assert all(r.forfeit == () for r in s.participants) and s.checked == 0


def test_genesis_seed_commitments_make_epoch_0_checked_so_a_cheater_in_it_is_caught_and_refunded() -> None:
    base = genesis(weights=HEAVY)
    g = replace(base, participants=tuple(
        replace(p, seed_commitment=rules.seed_commitment(0, p.peer_id, derive_validation_seed(
            KEYS[NAME_OF[p.peer_id]].secret, CHAIN, 0))) for p in base.participants))
    net = Net(state=LedgerState.from_genesis(g))
    assert net.state.commitment(0, PEER["v1"]) is not None
    iid = net.infer("cheat")
    net.check_duties(0, verdict_of=lambda i, who: BAD)
    net.ok()  # draws the committee
    cast(net, iid, dict.fromkeys(WEIGHTS, BAD))
    net.until(10)
    net.ok(*[net.reveal(w, 0) for w in WEIGHTS])
    net.until(15)
    s = net.state.epoch_summary(0)
    cheat = s.participant(PEER["cheat"])
    assert s.checked == 1 and cheat.caught == "dispute" and cheat.fees_refunded == 15 and cheat.fees_paid == 0
    assert net.state.balance(PEER["cheat"]) == 0 and dict(s.refunds) == {PEER["alice"]: 15}


def test_the_summary_prints_for_people() -> None:
    net, _ = disputed({"v2": BAD, "v3": BAD})
    net.infer("ex", client="bob")
    net.check_duties(1)
    net.until(20)
    net.ok(*[net.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
    net.until(25)
    text = format_epoch_summary(net.state.epoch_summary(1), names=NAME_OF)
    print(text)
    assert "CAUGHT (dispute)" in text and "refunded 15 to client alice" in text and "cheat" in text


def test_snapshots_round_trip_mid_dispute_and_replicas_agree_to_the_end() -> None:
    net, iid = disputed({})  # drawn, nobody voted yet
    copy = Net(state=LedgerState.from_bytes(net.state.to_bytes()))
    assert copy.state.app_hash() == net.state.app_hash()
    for n in (net, copy):
        cast(n, iid, {"v2": BAD, "v3": BAD})
        n.until(20)
        n.ok(*[n.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
        n.until(26)
    assert copy.state.app_hash() == net.state.app_hash() and copy.state.to_bytes() == net.state.to_bytes()
    assert copy.state.epoch_summary(1) == net.state.epoch_summary(1)


def test_a_replica_restored_from_its_snapshot_draws_the_same_dispute_committees_as_one_that_never_stopped() -> None:
    """Disputes due at one height used to be advanced in the order of the state's due-index: on
    a running replica the order their Validations came in, on one restored from its snapshot
    (``LedgerState.from_bytes``) the order of the disputes table (by inference id). The order
    matters: a draw can resolve a dispute at once (the accuser's seats are its vote), which
    sanctions its executor, and the next dispute drawn in the block then recuses that
    executor's seats -- the restarted replica forks off. Every due-index is now taken sorted.

    Here v1 (most of the weight, so its seats decide at the draw) fails an inference of ex and
    one of cheat in one block, in the order opposite to their ids."""
    net = Net(state=LedgerState.from_genesis(genesis(weights={"ta": 10, "ex": 10, "cheat": 10, "v1": 70,
                                                              "v2": 10})))
    net.until(1)
    net.ok(*[net.commit(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2")])
    net.until(10)
    ids = sorted(net.infer(ex) for ex in ("ex", "cheat"))
    net.ok(*[net.validate("v1", iid, BAD) for iid in reversed(ids)])  # opened in reverse id order
    restarted = LedgerState.from_bytes(net.state.to_bytes())  # a replica that restarts here
    assert restarted.app_hash() == net.state.app_hash()
    block = Block(net.height + 1, net.state.last_block_hash, PEER["ta"], net.state.time_ms + 1000, [])
    apply_block(net.state, block)  # the draw height of both disputes
    apply_block(restarted, block)
    assert all(net.state.dispute(i).outcome is DisputeOutcome.INVALID for i in ids)  # resolved at the draw
    assert [restarted.dispute(i).committee for i in ids] == [net.state.dispute(i).committee for i in ids]
    assert restarted.app_hash() == net.state.app_hash(), "the restarted replica diverged"


# =========================================================================== the scenario


def test_scenario_an_honest_executor_and_a_cheater_over_an_epoch() -> None:
    """Epoch 1: alice is served by the honest executor, bob by the cheater (made-up logprobs).
    Every validator checks its duties; the cheater's work fails, the committee agrees, and at
    settlement the cheater forfeits everything, bob is refunded, the honest are paid."""
    weights = {"ta": 10, "ex": 40, "cheat": 20, "v1": 10, "v2": 10, "v3": 10}  # the executors: 60 %
    net = committed_net(weights=weights)  # every participant committed its seed for epoch 1
    good = [net.infer("ex", client="alice", prompt=12, completion=8) for _ in range(3)]
    bad = [net.infer("cheat", client="bob", prompt=12, completion=8) for _ in range(2)]
    alice, bob = net.state.balance(PEER["alice"]), net.state.balance(PEER["bob"])
    assert all(net.state.inference(i).validation_ppm == PPM for i in good + bad)  # newcomers: 100 %

    def honest_verdict(iid: bytes, who: str) -> VerdictStats:
        return BAD if iid in bad else OK

    net.check_duties(1, verdict_of=honest_verdict)
    net.ok()  # each failure opened a dispute; this block's hash draws the committees
    net.ok(*[tx for iid in bad for tx in votes_on(net, iid, {n: honest_verdict(iid, n) for n in WEIGHTS})])
    assert all(net.state.dispute(iid).outcome is DisputeOutcome.INVALID for iid in bad)  # re-checked honestly
    net.until(20)
    net.ok(*[net.reveal(w, 1) for w in ("ta", "ex", "cheat", "v1", "v2", "v3")])
    net.until(25)

    summary = net.state.epoch_summary(1)
    print(format_epoch_summary(summary, names=NAME_OF))
    row = {NAME_OF[r.peer]: r for r in summary.participants}
    assert row["cheat"].caught == "dispute" and row["cheat"].forfeit == ("caught",)
    assert row["cheat"].fees_paid == 0 and row["cheat"].executor_reward == row["cheat"].validator_reward == 0
    assert net.state.balance(PEER["bob"]) == bob + 40 and dict(summary.refunds) == {PEER["bob"]: 40}
    assert net.state.balance(PEER["alice"]) == alice  # alice paid for honest work
    # The executor pool splits by tokens executed, capped at the weight's fair share (the
    # median: ex's 60 per 40 weight; cheat's 40 per 20 weight score 30); the cheater's share
    # is not minted, so the honest executor gains nothing from being the only one paid.
    assert row["ex"].fees_paid == 60 and row["ex"].executor_reward == 80_000 * 60 // 90
    assert row["cheat"].forfeited == 80_000 * 30 // 90 + row["cheat"].work * 20_000 // sum(
        r.work for r in summary.participants)
    for v in ("v1", "v2", "v3"):
        assert row[v].forfeit == () and row[v].validator_reward > 0, row[v]
    assert row["ta"].duties == 0 and row["ta"].forfeit == ()  # it routed everything: nothing to check
    assert net.state.participant(PEER["ex"]).reputation_ppm == -(-PPM // 30)  # 1/30, rounded up
    cheater = net.state.participant(PEER["cheat"])
    assert cheater.reputation_ppm == 0 and cheater.weight == 10  # 20 of 100: at most 10 % moves per settlement
    assert summary.minted + summary.forfeited + 10 > summary.reward
    assert net.state.total_coins() == net.state.genesis.supply + net.state.minted - net.state.burned


# =========================================================================== random epochs


BEHAVIOURS = ("diligent", "diligent", "lazy", "silent", "absent")


def announce(seed: int) -> None:
    print(f"economics seed={seed}")
    try:
        note(f"economics seed={seed} (replay: ECONOMICS_SEED={seed})")
    except Exception:  # noqa: BLE001 - not inside a hypothesis test
        pass


def run_epochs(seed: int, epochs: int = 3) -> Counter:
    """Random epochs: honest executors, a cheater (fails checks), a subtle cheater (often
    suspicious), validators that are diligent, lazy (skip some duties), silent (never vote) or
    absent (never reveal), random committee votes, expiries. Checks every invariant at every
    block, a second replica restarted from a snapshot, and each settlement's bookkeeping."""
    announce(seed)
    rng = random.Random(seed)
    weights = {n: rng.choice([1, 5, 10]) for n in WEIGHTS}
    kind = {"ex": "honest", "cheat": rng.choice(["cheater", "subtle", "honest"]), "v1": "honest",
            "v2": rng.choice(["honest", "cheater"]), "v3": "honest", "ta": "honest"}
    behaviour = {n: rng.choice(BEHAVIOURS) for n in weights}
    g = genesis(weights=weights, dispute_committee_size=rng.choice([1, 2, 3]),
                reputation_growth_epochs=rng.choice([1, 3, 30]))
    net = Net(state=LedgerState.from_genesis(g))
    replica = LedgerState.from_genesis(g)
    seen: Counter = Counter()
    restart_at = rng.randrange(5, epochs * L)
    lazy_skips: dict[tuple[int, str], int] = Counter()

    def verdict(iid: bytes, who: str) -> VerdictStats:
        executor = kind[NAME_OF[net.state.inference(iid).executor]]
        if executor == "cheater":
            return BAD
        if executor == "subtle" and rng.random() < 0.7:
            return SUSPICIOUS
        return BAD if rng.random() < 0.03 else OK  # honest noise, and the odd false accusation

    def step(txs: list[bytes]) -> None:
        nonlocal replica
        block = Block(net.height + 1, net.state.last_block_hash, PEER["ta"], net.state.time_ms + 1000, txs)
        _, receipts = apply_block(net.state, block)
        net.next_seq.clear()
        seen.update(r.reason.value for r in receipts)
        check_invariants(net.state)
        assert net.state.total_coins() == g.supply + net.state.minted - net.state.burned
        assert all(a.balance >= 0 for a in net.state.accounts.rows.values())
        if block.height == restart_at:
            replica = LedgerState.from_bytes(replica.to_bytes())
        apply_block(replica, block)
        assert replica.app_hash() == net.state.app_hash(), f"replicas diverged at {block.height}"
        settled = rules.epoch_settled_at(block.height, g.params)
        if settled is not None:
            audit(net.state.epoch_summary(settled))

    def audit(summary) -> None:
        seen["settled"] += 1
        assert summary.minted + summary.forfeited <= summary.reward
        executor_pool, validator_pool = rules.epoch_reward_pools(summary.epoch, g.params)
        scores = rules.fair_share_scores({r.peer: r.tokens for r in summary.participants},
                                         {r.peer: r.weight for r in summary.participants})
        unscored = (executor_pool * (not any(scores.values()))
                    + validator_pool * (not any(r.work for r in summary.participants)))  # nobody earned it
        assert summary.reward - summary.minted - summary.forfeited - unscored <= 2 * len(summary.participants)
        for row in summary.participants:
            name = NAME_OF[row.peer]
            if row.forfeit:
                assert row.executor_reward == row.validator_reward == 0
                seen.update(f"forfeit:{f}" for f in row.forfeit)
            if row.caught:
                seen[f"caught:{row.caught}"] += 1
                assert row.fees_paid == 0 and row.reputation_after == 0
                participant = net.state.participant(row.peer)  # sanctioned; weight falls by bounded steps
                assert participant.sanctioned and row.weight_after == participant.weight
            if lazy_skips[(summary.epoch, name)] and row.revealed and row.duties > row.done:
                assert "skipped_duties" in row.forfeit
            if behaviour[name] == "absent" and row.committed and summary.epoch > 0:
                assert "no_reveal" in row.forfeit

    while net.height < (epochs + 1) * L + g.params.settlement_delay_blocks:
        h = net.height + 1
        epoch = rules.epoch_of(h, g.params)
        txs: list[bytes] = []
        if h % L == 1:  # commit for the next epoch
            txs += [net.commit(n, epoch + 1) for n in weights
                    if net.state.participant(PEER[n]).weight and rng.random() < 0.9]
        for _ in range(rng.randrange(0, 4)):  # traffic
            ex = rng.choice([n for n in ("ex", "cheat", "v1", "v2")
                             if PEER[n] in executor_weights(net.state, MODEL)
                             and may_execute(net.state, PEER[n])] or ["ex"])
            ta = rng.choice([n for n in ("ta", "v3") if n != ex])
            req = net.request(rng.choice(["alice", "bob"]), ex, ta, max_tokens=20)
            txs.append(net.start(req, ex, ta))
            if rng.random() < 0.9:
                txs.append(net.finish(req, ex, rng.randrange(1, 30), rng.randrange(1, 20)))
        for e in (epoch - 1, epoch):  # checks of this and the previous epoch's inferences
            if e < 1 or h > rules.validation_deadline(e, g.params):
                continue
            for n in weights:
                c = net.state.commitment(e, PEER[n])
                if c is None or c.revealed:
                    continue
                for iid in net.state.validation_duties(e, PEER[n], net.seed(n, e)):
                    if (iid, PEER[n]) in net.state.checks or rng.random() < 0.5:
                        continue  # done, or later
                    if behaviour[n] == "lazy" and rng.random() < 0.3:
                        lazy_skips[(e, n)] += 1
                        continue
                    txs.append(net.validate(n, iid, verdict(iid, n)))
        for iid, dispute in sorted(net.state.disputes.rows.items()):  # votes
            if dispute.outcome is not DisputeOutcome.OPEN:
                continue
            for m in dispute.committee:
                n = NAME_OF[m]
                if (iid, m) in net.state.votes or behaviour[n] == "silent" or rng.random() < 0.3:
                    continue
                txs.append(net.vote(n, iid, verdict(iid, n)))
        for e in (epoch - 1,):  # reveals, late in the window
            if e >= 1 and rules.seed_reveal_open(e, h, g.params) and h >= rules.validation_deadline(e, g.params):
                for n in weights:
                    c = net.state.commitment(e, PEER[n])
                    if c is not None and not c.revealed and behaviour[n] != "absent":
                        txs.append(net.reveal(n, e))
        if rng.random() < 0.05:  # junk: a check of nothing, a replayed vote
            txs.append(net.validate("v1", rng.randbytes(32)))
        step(txs)
    fresh = LedgerState.from_bytes(net.state.to_bytes())
    assert fresh.app_hash() == net.state.app_hash()
    assert seen["settled"] == epochs + 1
    return seen


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_random_epochs_conserve_coins_never_go_negative_and_replicas_agree(seed: int) -> None:
    run_epochs(int(os.environ.get("ECONOMICS_SEED", seed)))


def test_random_epochs_reach_every_outcome() -> None:
    """Fixed seeds that between them catch by dispute and by SPRT and forfeit for every reason."""
    outcomes: Counter = Counter()
    for seed in (1, 2, 3, 4, 5, 6, 14):
        outcomes += run_epochs(seed)
    print(dict(outcomes))
    for key in ("caught:dispute", "caught:sprt", "forfeit:skipped_duties", "forfeit:no_reveal", "forfeit:no_commit",
                "forfeit:missed_votes", "forfeit:caught", "ok", "unknown_inference"):
        assert outcomes[key] > 0, key


# =========================================================================== a busy epoch


def test_reveals_and_settlement_of_a_busy_epoch_check_every_inference() -> None:
    """1,000 inferences, 8 validators at p = 1: every inference is checked and the epoch settles.
    Timings belong to benchmarks (ledger_bench.py measures applying blocks), not to this test."""
    vkeys = {f"val{i}": Keypair.from_seed(f"econ-val{i}".encode()) for i in range(8)}
    KEYS.update(vkeys)
    PEER.update({n: k.peer_id for n, k in vkeys.items()})
    NAME_OF.update({k.peer_id: n for n, k in vkeys.items()})
    weights = {"ta": 10, "ex": 10, **{n: 10 for n in vkeys}}
    net = Net(state=LedgerState.from_genesis(genesis(weights=weights)))
    net.until(1)
    net.ok(*[net.commit(n, 1) for n in weights])
    net.until(10)
    reqs = [net.request("alice", "ex") for _ in range(1000)]
    net.ok(*[net.start(r, "ex") for r in reqs], *[net.finish(r, "ex") for r in reqs])
    net.check_duties(1, who_all=tuple(weights))  # p = 1: 8,000 checks
    net.until(20)
    net.ok(*[net.reveal(n, 1) for n in weights])
    net.until(24)
    net.block()
    summary = net.state.epoch_summary(1)
    assert summary.inferences == summary.checked == 1000 and summary.minted > 0
