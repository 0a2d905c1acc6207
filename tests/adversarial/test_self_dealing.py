"""Attack class: self-dealing and executor steering. One party plays client, TA and executor
(a zero-weight identity) and floods itself with requests, to take the epoch's executor reward
and to lower everyone's validation floor with traffic it pays itself; or a TA names a partner
on the ledger while another executor does the work. The ledger now recomputes the weighted
executor draw for every StartInference (``tx_rules.process_start_inference``): the flood's
fees go to executors drawn by weight -- honest ones -- the attacker mints nothing and loses
what it paid, and a named partner is refused.

What the draw leaves open: a client that is also the TA grinds its request nonce until the
draw lands on its own executor, which holds real weight, and pumps that executor's share of
the reward (split by executed work) and the traffic count that sets the validation floor, at
no cost beyond fees it pays itself. Settlement caps both at the executor's weight's fair share
(``rules.fair_share_scores``, ``rules.floor_traffic``), which a coalition below half the
weight cannot move.

The ledger is driven directly with real signed transactions (as tests/test_ledger_economics.py
does); that the TA routes by the same draw is tests/test_serving.py's."""

from __future__ import annotations

from dataclasses import replace
from itertools import count

from ledger_driver import OK, LedgerDriver, request_message

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import rules
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.state import LedgerState, check_tx
from gonka_p2p.ledger.transactions import Reason, RegisterParticipant
from gonka_p2p.ledger.executor_draw import executor_weights, is_drawn, may_execute
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import InferenceRequest, inference_id

CHAIN = "gonka-self-dealing"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10
HONEST = {"h1": 60, "h2": 30, "h3": 10}  # the honest executors and their weights
ATTACKER = ("mallory", "mallory_ta", "mallory_ex")  # client, TA, zero-weight executor
KEYS = {n: Keypair.from_seed(f"self-dealing-{n}".encode()) for n in (*HONEST, *ATTACKER, "alice")}
PEER = {n: k.peer_id for n, k in KEYS.items()}
NAME = {p: n for n, p in PEER.items()}
FLOOD = 300  # the attacker's requests in epoch 1 (honest traffic: 30)


def genesis() -> Genesis:
    params = Params(epoch_length_blocks=L, inference_deadline_blocks=3, request_window_ms=10**9,
                    max_tx_bytes=64 * 1024, price_per_token={MODEL: 1}, validation_window_blocks=3,
                    dispute_voting_blocks=2, epoch_reward=100_000, validation_cap_ppm=rules.PPM,
                    floor_full_until_inferences=10, floor_mid_inferences=100, floor_low_inferences=200)
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params,
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, w, models=(MODEL,))
                                      for n, w in HONEST.items()),
                   allocations={PEER["alice"]: 1_000_000, PEER["mallory"]: 1_000_000,
                                PEER["mallory_ta"]: 10, PEER["mallory_ex"]: 10})


class Ledger(LedgerDriver):
    def __init__(self, state: LedgerState | None = None) -> None:
        super().__init__(state or LedgerState.from_genesis(genesis()), KEYS, "h1", MODEL)

    def fresh_request(self, client: str) -> bytes:
        """A request with the next nonce, not ground: where it goes is the draw's."""
        self.nonce += 1
        return seal(request_message(self.state, self.nonce.to_bytes(16, "big"), MODEL), KEYS[client])

    def grind(self, client: str, ta: str, executor: str) -> bytes:
        """A request of ``client``'s whose nonce is ground until the draw at attempt 0 gives it to
        ``executor`` when ``ta`` routes it (the id needs no signature: only the one kept is signed)."""
        weights = executor_weights(self.state, MODEL)
        for nonce in (n.to_bytes(16, "big") for n in count(self.nonce + 1)):
            message = request_message(self.state, nonce, MODEL)
            iid = inference_id(Signed(message, KEYS[client].public_key, b""))
            if rules.choose_executor(weights, frozenset({PEER[ta]}), iid, 0) == PEER[executor]:
                self.nonce = int.from_bytes(nonce, "big")
                return seal(message, KEYS[client])
        raise AssertionError("unreachable: the nonces never run out")

    def drawn(self, request: bytes, ta: str, attempt: int = 0) -> str:
        """The executor the ledger's draw gives ``request`` at ``attempt`` (what an honest TA routes to)."""
        iid = inference_id(open_envelope(request, InferenceRequest))
        weights = executor_weights(self.state, MODEL)
        return NAME[rules.choose_executor(weights, frozenset({PEER[ta]}), iid, attempt)]

    def coins(self, *names: str) -> int:
        return sum(self.state.balance(PEER[n]) for n in names)

def attacker_route(ledger: Ledger, request: bytes) -> tuple[str, bytes]:
    """The attacker's best Start: its own executor if the ledger takes it, else the draw."""
    greedy = ledger.start(request, "mallory_ex", "mallory_ta", attempt=0)
    if check_tx(ledger.state, greedy).ok:
        return "mallory_ex", greedy
    ledger.next_seq["mallory_ta"] -= 1  # the refused Start is never sent: its sequence is reused
    executor = ledger.drawn(request, "mallory_ta")
    return executor, ledger.start(request, executor, "mallory_ta", attempt=0)


def test_self_dealing_flood_mints_nothing_and_pays_honest_executors_by_weight() -> None:
    ledger = Ledger()
    register = [ledger.sign(n, lambda s: RegisterParticipant(chain_id=CHAIN, addrs=["/ip4/6.6.6.6/tcp/6"],
                                                             models=[MODEL], sequence=s))
                for n in ("mallory_ta", "mallory_ex")]
    commits = [ledger.commit(n, 1) for n in HONEST]
    ledger.ok(*register, *commits)
    ledger.until(L)
    before = ledger.coins(*ATTACKER)

    paid_by_attacker: dict[str, int] = {}
    for _block in range(6):
        txs = []
        for i in range((FLOOD + 30) // 6):
            if i % 11 == 0:  # honest traffic, through an honest TA
                req = ledger.fresh_request("alice")
                executor = ledger.drawn(req, "h1")
                start = ledger.start(req, executor, "h1", attempt=0)
            else:
                req = ledger.fresh_request("mallory")
                executor, start = attacker_route(ledger, req)
                paid_by_attacker[executor] = paid_by_attacker.get(executor, 0) + 15
            txs += [start, ledger.finish(req, executor)]
        ledger.ok(*txs)
    assert ledger.state.height < 2 * L, "the flood fits in epoch 1"
    assert "mallory_ex" not in paid_by_attacker, "the ledger refused every Start naming the attacker's executor"

    checks = [ledger.validate(v, iid, OK)
              for v in HONEST for iid in ledger.state.validation_duties(1, PEER[v], ledger.seed(v, 1))]
    ledger.ok(*checks)
    ledger.until(2 * L)
    ledger.ok(*[ledger.reveal(v, 1) for v in HONEST])
    ledger.until(rules.settlement_height(1, ledger.state.params))
    summary = ledger.state.epoch_summary(1)
    rows = {NAME[r.peer]: r for r in summary.participants}

    # It lost at least the fees it paid honest executors (and any transaction fees on top).
    assert ledger.coins(*ATTACKER) <= before - sum(paid_by_attacker.values()) < before
    assert all(rows[n].executor_reward == 0 for n in ATTACKER if n in rows)
    rewards = {n: rows[n].executor_reward for n in HONEST}
    assert sum(rewards.values()) > 0
    for name, weight in HONEST.items():  # the draw routes by weight, so the reward follows it
        assert abs(rewards[name] / sum(rewards.values()) - weight / 100) < 0.08, rewards
    # The flood lowered the next epoch's floor, but every inference of it paid honest executors.
    assert ledger.state.epoch_info(2).floor_ppm < rules.PPM
    assert sum(paid_by_attacker.values()) == 15 * FLOOD


def test_ta_naming_a_partner_is_refused_and_the_drawn_executor_is_paid() -> None:
    ledger = Ledger()
    ledger.ok(ledger.sign("mallory_ta", lambda s: RegisterParticipant(
        chain_id=CHAIN, addrs=["/ip4/6.6.6.6/tcp/6"], models=[], sequence=s)))
    while True:  # a request whose draws never pick h3, the greedy TA's partner
        req = ledger.fresh_request("alice")
        draws = [ledger.drawn(req, "mallory_ta", k) for k in range(ledger.state.params.max_executor_attempts)]
        if "h3" not in draws:
            break
    for partner, attempt, reason in (("h3", 0, Reason.EXECUTOR_NOT_DRAWN), ("h3", 2, Reason.EXECUTOR_NOT_DRAWN),
                                     ("mallory_ex", 0, Reason.EXECUTOR_NOT_ELIGIBLE),
                                     (draws[0], 3, Reason.ATTEMPT_OUT_OF_RANGE)):
        (r,) = ledger.block(ledger.start(req, partner, "mallory_ta", attempt))
        assert r.reason is reason, (partner, attempt, r.reason, r.detail)
    honest = draws[0]
    before = ledger.state.balance(PEER[honest])
    ledger.ok(ledger.finish(req, honest))  # the drawn executor did the work: its Finish waits, held
    ledger.ok(ledger.start(req, honest, "mallory_ta", attempt=0))  # the only Start the ledger takes names it
    iid = inference_id(open_envelope(req, InferenceRequest))
    record = ledger.state.inference(iid)
    assert record is not None and record.executor == PEER[honest] and record.attempt == 0
    assert ledger.state.pending_fees(PEER[honest]) == 15
    ledger.until(rules.settlement_height(0, ledger.state.params))
    assert ledger.state.balance(PEER[honest]) == before + 15


SHARES = {"h1": 50, "h2": 30, "h3": 10, "mallory_ex": 10}  # the attacker's executor holds 10 % of the weight
GROUND = 10_000  # the attacker's own requests, each ground onto its own executor


def grinding_genesis() -> Genesis:
    params = Params(epoch_length_blocks=L, inference_deadline_blocks=3, request_window_ms=10**9,
                    max_tx_bytes=64 * 1024, price_per_token={MODEL: 1}, validation_window_blocks=3,
                    dispute_voting_blocks=2, epoch_reward=100_000, validation_cap_ppm=10_000,
                    floor_full_until_inferences=100, floor_mid_inferences=1_000, floor_low_inferences=5_000)
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params,
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, w, models=(MODEL,))
                                      for n, w in SHARES.items()),
                   allocations={PEER["alice"]: 10**6, PEER["mallory"]: 10**7, PEER["mallory_ta"]: 10})


def epoch_1_with_grinding(ground: int) -> LedgerState:
    """Epoch 1 of the network above, settled: honest traffic of 100 inferences split exactly by
    weight (the test grinds alice's nonces too, so that the comparison is exact: the draw's
    variance is not what is under test), plus ``ground`` requests the attacker (client
    mallory, TA mallory_ta) grinds onto mallory_ex. Every validator does its duties."""
    ledger = Ledger(state=LedgerState.from_genesis(grinding_genesis()))
    ledger.ok(ledger.sign("mallory_ta", lambda s: RegisterParticipant(
        chain_id=CHAIN, addrs=["/ip4/6.6.6.6/tcp/6"], models=[], sequence=s)),
        *[ledger.commit(n, 1) for n in SHARES])
    ledger.until(L)
    work = [(executor, "h2" if executor == "h1" else "h1", "alice")
            for executor, weight in SHARES.items() for _ in range(weight)]
    work += [("mallory_ex", "mallory_ta", "mallory")] * ground
    txs = []
    for executor, ta, client in work:
        request = ledger.grind(client, ta, executor)
        txs += [ledger.start(request, executor, ta, attempt=0), ledger.finish(request, executor)]
    for chunk in range(0, len(txs), 4_000):
        ledger.ok(*txs[chunk:chunk + 4_000])
        ledger.next_seq.clear()
    assert ledger.state.height < 2 * L - 3, "the traffic fits in epoch 1"
    ledger.ok(*[ledger.validate(v, iid, OK)
                for v in SHARES for iid in ledger.state.validation_duties(1, PEER[v], ledger.seed(v, 1))])
    ledger.until(2 * L)
    ledger.ok(*[ledger.reveal(v, 1) for v in SHARES])
    ledger.until(rules.settlement_height(1, ledger.state.params))
    return ledger.state


def test_grinding_nonces_onto_its_own_weighted_executor_earns_nothing_and_keeps_the_floor() -> None:
    attacked, honest = epoch_1_with_grinding(GROUND), epoch_1_with_grinding(0)
    a = {NAME[r.peer]: r for r in attacked.epoch_summary(1).participants}
    h = {NAME[r.peer]: r for r in honest.epoch_summary(1).participants}
    assert a["mallory_ex"].inferences == GROUND + 10 and h["mallory_ex"].inferences == 10
    assert all(not row.forfeit and not row.caught for row in (a[n] for n in SHARES)), a
    # The attacker's executor earns what an honest 10 % executor doing the same honest work earns...
    assert a["mallory_ex"].executor_reward == a["h3"].executor_reward == h["mallory_ex"].executor_reward
    # ... and no more in all than the honest executor of its weight: the self-dealt volume is never
    # its duty (it executed it), so it only adds to the honest validators' checked work.
    assert a["mallory_ex"].executor_reward + a["mallory_ex"].validator_reward <= \
        a["h3"].executor_reward + a["h3"].validator_reward
    pool, _ = rules.epoch_reward_pools(1, attacked.params)
    for name, weight in SHARES.items():  # executor rewards follow weight, as without the attack
        assert a[name].executor_reward == h[name].executor_reward == pool * weight // 100, (name, a[name])
    # The floor counts the honest traffic alone: the next epoch is checked as much as without it.
    assert attacked.epoch_info(2).traffic == honest.epoch_info(2).traffic == 100
    assert attacked.epoch_info(2).floor_ppm == honest.epoch_info(2).floor_ppm == rules.PPM


def test_a_sanction_in_flight_does_not_move_the_draw_of_other_requests() -> None:
    """The draw runs over the weights the epoch froze at its start: a conviction (or any
    other change) landing between the TA's draw and its Start's block leaves every other
    request's draw where it was, so an honest executor's finished work is never refused.
    (When the table dropped sanctioned executors at once, a conviction mid-epoch moved
    draws under requests already in flight: the honest executor's Start was refused.)"""
    state = LedgerState.from_genesis(genesis())
    ta, height = PEER["mallory_ta"], state.height + 1
    draws = {}
    for n in range(64):
        iid = bytes([n]) * 32
        draws[iid] = rules.choose_executor(executor_weights(state, MODEL), frozenset({ta}), iid, 0)
    sanctioned = PEER["h2"]
    state.registry.put(sanctioned, replace(state.registry.rows[sanctioned], sanctioned=True))
    for iid, executor in draws.items():
        if executor != sanctioned:
            assert is_drawn(state, MODEL, ta, iid, 0, executor, height), iid.hex()
    assert not may_execute(state, sanctioned)
