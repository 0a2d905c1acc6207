"""The ledger state machine, rule by rule, then under random transaction storms.

Every random test derives all its choices from one integer seed, printed
(and noted for hypothesis) so that a failure is replayed with
``LEDGER_STORM_SEED=<seed> pytest tests/test_ledger_state.py -k storm``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import base58
import msgpack
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from helpers import drawn_attempt, request_drawing

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import duties, rules
from gonka_p2p.ledger.genesis import (
    Genesis,
    GenesisError,
    GenesisParticipant,
    Params,
    genesis_from_obj,
    load_genesis,
    save_genesis,
)
from gonka_p2p.ledger.block import Block, decode_block
from gonka_p2p.ledger.records import InferenceStatus
from gonka_p2p.ledger.state import (
    BlockMismatch,
    LedgerState,
    SnapshotError,
    apply_block,
    check_block,
    check_invariants,
    check_tx,
)
from gonka_p2p.ledger.transactions import (
    FinishInference,
    Reason,
    RegisterParticipant,
    StartInference,
    Transfer,
)
from gonka_p2p.wire.envelope import ENVELOPE_VERSION, open_envelope, seal
from gonka_p2p.wire.messages import Announcement, ChatTurn, InferenceRequest
from gonka_p2p.wire.messages import inference_id as request_id  # finish() has an inference_id parameter
from gonka_p2p.wire.schema import WireError

CHAIN = "gonka-test"
MODEL = "m"
PRICE = 2
FEE = 1  # tx_fee: what a paying transaction burns (the client's, for a Start)
T0 = 1_700_000_000_000  # genesis time, ms
KEYS = {name: Keypair.from_seed(name.encode()) for name in
        ("ta", "ta2", "ex", "ex2", "alice", "bob", "carol", "outsider")}
PEER = {name: key.peer_id for name, key in KEYS.items()}


def make_params(**overrides: object) -> Params:
    base = dict(epoch_length_blocks=10, inference_deadline_blocks=3, request_window_ms=60_000,
                max_tx_bytes=64 * 1024, prompt_overhead_per_turn_tokens=8,
                prompt_overhead_fixed_tokens=16, max_held_finishes=100,
                max_held_finishes_per_executor=10, price_per_token={MODEL: PRICE, "m2": 1},
                validation_window_blocks=3, dispute_voting_blocks=2,  # epoch e settles at 10e + 15:
                dispute_max_rounds=1,  # one dispute round (test_ledger_economics, adversarial/test_framing)
                tx_fee=FEE)
    base.update(overrides)
    return Params(**base)  # type: ignore[arg-type]


# The shape of inference/thresholds.toml: numbers, strings, lists and nested tables.
VERIFICATION = {"sprt": {"alpha": 1e-4, "beta": 0.01},
                "models": {MODEL: {"logprob_tolerance": 3e-4, "reference_tokens": 32,
                                   "calibration": {"date": "2026-11-24", "rows": ["a", "b"]}}}}


def make_genesis(**overrides: object) -> Genesis:
    return Genesis(verification=VERIFICATION,
        chain_id=CHAIN, genesis_time_ms=T0, params=make_params(**overrides),
        participants=(GenesisParticipant(KEYS["ta"].public_key, 10, ("/ip4/1.2.3.4/tcp/1",)),
                      GenesisParticipant(KEYS["ta2"].public_key, 3),
                      GenesisParticipant(KEYS["ex"].public_key, 7, models=(MODEL,)),
                      GenesisParticipant(KEYS["ex2"].public_key, 5, models=(MODEL, "m2"))),
        allocations={PEER["alice"]: 100_000, PEER["bob"]: 50_000, PEER["carol"]: 10})


def tables(state: LedgerState) -> list[dict]:
    """The state's records, without the header (height, time, last block hash)."""
    return [dict(t.rows) for t in state.tables]


@dataclass
class Chain:
    """A state plus a block builder that tracks every signer's next sequence."""

    state: LedgerState = field(default_factory=lambda: LedgerState.from_genesis(make_genesis()))
    next_seq: dict[str, int] = field(default_factory=dict)

    @property
    def now(self) -> int:
        return self.state.time_ms

    def seq(self, who: str) -> int:
        peer = PEER[who]
        account = self.state.account(peer)
        n = self.next_seq.get(peer, account.sequence if account else 0)
        self.next_seq[peer] = n + 1
        return n

    def sign(self, who: str, message: object) -> bytes:
        return seal(message, KEYS[who])  # type: ignore[arg-type]

    def transfer(self, who: str, to: str, amount: int) -> bytes:
        return self.sign(who, Transfer(chain_id=CHAIN, to=to, amount=amount, sequence=self.seq(who)))

    def register(self, who: str, models: list[str], addrs: list[str] | None = None) -> bytes:
        return self.sign(who, RegisterParticipant(chain_id=CHAIN, addrs=addrs or ["/ip4/9.9.9.9/tcp/9"],
                                                  models=models, sequence=self.seq(who)))

    def start(self, request: bytes, ta: str = "ta", executor: str = "ex") -> bytes:
        attempt = drawn_attempt(self.state, request, PEER[ta], PEER[executor]) or 0
        return self.sign(ta, StartInference(chain_id=CHAIN, request=request, executor=PEER[executor], attempt=attempt,
                                            sequence=self.seq(ta)))

    def finish(self, request: bytes, executor: str = "ex", prompt: int = 10, completion: int = 5,
               inference_id: bytes | None = None) -> bytes:
        iid = inference_id if inference_id is not None else iid_of(request)
        return self.sign(executor, FinishInference(
            chain_id=CHAIN, inference_id=iid, prompt_tokens=prompt, completion_tokens=completion,
            response_hash=b"r" * 32, artifact_commitment=b"a" * 32, sequence=self.seq(executor)))

    def block(self, *txs: object, dt_ms: int = 1000) -> list:
        block = Block(self.state.height + 1, self.state.last_block_hash, PEER["ta"],
                      self.state.time_ms + dt_ms, list(txs))  # type: ignore[arg-type]
        _, receipts = apply_block(self.state, block)
        self.next_seq.clear()
        return receipts

    def request(self, client: str = "alice", content: str = "hello", max_tokens: int = 20,
                ts: int | None = None, nonce: bytes | None = None, model: str = MODEL) -> bytes:
        """Without a ``nonce``, the first of a fixed sequence whose draw gives the request to "ex"
        when "ta" routes it (what ``start``'s defaults name)."""
        ts = self.now if ts is None else ts
        if nonce is not None:
            return make_request(client, content, max_tokens, ts, nonce, model)
        return request_drawing(self.state, lambda n: make_request(client, content, max_tokens, ts, n, model),
                               PEER["ta"], PEER["ex"])


def make_request(client: str, content: str, max_tokens: int, ts: int, nonce: bytes = b"n" * 16,
                 model: str = MODEL) -> bytes:
    return seal(InferenceRequest(chain_id=CHAIN, model=model, messages=[ChatTurn(role="user", content=content)],
                                 max_tokens=max_tokens, temperature=0.7, top_p=1.0, top_k=0,
                                 logprobs_k=5, timestamp_ms=ts, nonce=nonce), KEYS[client])


def escrow_of(content: str, max_tokens: int, price: int = PRICE) -> int:
    bound = len(b"user") + len(content.encode()) + 8 + 16
    return (bound + max_tokens) * price


def iid_of(request: bytes) -> bytes:
    return request_id(open_envelope(request, InferenceRequest))


# =========================================================================== rules


def test_prompt_bound_is_utf8_bytes_of_every_turn_plus_template_overhead() -> None:
    req = InferenceRequest(chain_id=CHAIN, model=MODEL, messages=[ChatTurn(role="system", content="é"),
                                                  ChatTurn(role="user", content="hi")],
                           max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5,
                           timestamp_ms=0, nonce=b"n" * 16)
    p = make_params()
    assert rules.prompt_token_bound(req, p) == (6 + 2 + 8) + (4 + 2 + 8) + 16


@given(st.text(max_size=200))
def test_prompt_bound_covers_byte_level_tokenization(text: str) -> None:
    # A byte-level BPE never yields more tokens than bytes: the bound is at least that.
    req = InferenceRequest(chain_id=CHAIN, model=MODEL, messages=[ChatTurn(role="user", content=text)],
                           max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5, timestamp_ms=0,
                           nonce=b"n" * 16)
    assert rules.prompt_token_bound(req, make_params()) >= len(text.encode())


def test_escrow_is_prompt_bound_plus_max_tokens_at_the_price() -> None:
    assert rules.escrow_for(prompt_bound=30, max_tokens=20, price=3) == 150


def test_cost_is_claimed_tokens_at_the_price_capped_at_escrow() -> None:
    assert rules.inference_cost(10, 5, price=2, escrow=100) == 30
    assert rules.inference_cost(100, 100, price=2, escrow=100) == 100
    assert rules.inference_cost(0, 0, price=2, escrow=100) == 0


def test_request_is_fresh_within_the_window_either_side_of_block_time() -> None:
    assert rules.request_is_fresh(1_000, 1_000 + 500, window_ms=500)
    assert rules.request_is_fresh(1_500, 1_000, window_ms=500)
    assert not rules.request_is_fresh(1_000, 1_501, window_ms=500)
    assert not rules.request_is_fresh(1_501, 1_000, window_ms=500)


def test_request_ids_are_remembered_exactly_while_they_can_be_fresh() -> None:
    until = rules.replay_memory_until(1_000, window_ms=500)
    assert rules.request_is_fresh(1_000, until, 500) and not rules.request_is_fresh(1_000, until + 1, 500)


def test_inference_and_held_finish_deadlines_are_deadline_blocks_later() -> None:
    p = make_params(inference_deadline_blocks=4)
    assert rules.inference_deadline(10, p) == 14 and rules.held_finish_deadline(10, p) == 14


def test_epochs_end_at_multiples_of_the_epoch_length() -> None:
    p = make_params(epoch_length_blocks=5)
    assert [h for h in range(0, 16) if rules.is_epoch_end(h, p)] == [5, 10, 15]
    assert [rules.epoch_after(h, p) for h in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]


def test_blocks_take_exactly_the_next_sequence_mempools_also_later_ones() -> None:
    assert rules.sequence_acceptable(3, 3, mempool=False)
    assert not rules.sequence_acceptable(3, 4, mempool=False)
    assert rules.sequence_acceptable(3, 4, mempool=True)
    assert not rules.sequence_acceptable(3, 2, mempool=True)


def test_block_time_never_goes_backwards() -> None:
    assert rules.next_block_time(100, 50) == 100 and rules.next_block_time(100, 150) == 150


def test_an_account_address_is_a_secp256k1_peer_id() -> None:
    assert rules.is_account_address(PEER["alice"])
    assert not rules.is_account_address("alice")
    not_a_point = base58.b58encode(b"\x00\x25\x08\x02\x12\x21\x02" + b"\x00" * 32).decode()
    assert not rules.is_account_address(not_a_point)
    assert not rules.is_account_address(PEER["alice"][:-2])
    assert not rules.is_account_address("0" * 53)  # '0' is not a base58 digit


# =========================================================================== genesis


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_genesis_round_trips_through_its_file_with_the_same_hash(tmp_path, suffix) -> None:
    genesis = make_genesis()
    path = tmp_path / f"genesis{suffix}"
    save_genesis(genesis, path)
    loaded = load_genesis(path)
    assert loaded == genesis and loaded.hash() == genesis.hash()
    if suffix == ".toml":
        assert "coin units per token" in path.read_text()  # units are written down
    assert loaded.verification["models"][MODEL]["calibration"]["rows"] == ("a", "b")


def test_the_verification_tree_is_part_of_the_genesis_identity() -> None:
    other = {**VERIFICATION, "sprt": {"alpha": 2e-4, "beta": 0.01}}
    assert Genesis(**{**make_genesis().__dict__, "verification": other}).hash() != make_genesis().hash()


def test_genesis_hash_golden_vector() -> None:
    """A fixed genesis keeps its identity across refactorings (a new hash is a new network),
    with the test's parameters and with every default."""
    assert make_genesis().hash().hex() == "1098f7ad4f9ad42ab92c64f72751e7b97980bcb9cba6b7c699f3b65a5be206b2"
    defaults = Genesis(chain_id="golden", params=Params(price_per_token={"m": 1}))
    assert defaults.hash().hex() == "77882176711f826f82a7e249d99bfe3b7540d144431a74a605ae9f957871e485"


def test_genesis_supply_and_weights() -> None:
    g = make_genesis()
    assert g.supply == 150_010
    assert g.weights()[PEER["ta"]] == 10


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(chain_id=""), "chain_id"),
    (lambda o: o["params"].update(epoch_length_blocks=0), "positive"),
    (lambda o: o["params"].update(price_per_token={MODEL: 0}), "price"),
    (lambda o: o["params"].update(price_per_token={MODEL: 1.5}), "integer"),
    (lambda o: o["params"].update(surprise=1), "unknown keys"),
    (lambda o: o["participants"][0].update(pubkey="zz"), "hex"),
    (lambda o: o["participants"][0].update(pubkey="02" + "00" * 32), "point"),
    (lambda o: o["participants"][1].update(pubkey=o["participants"][0]["pubkey"]), "repeats"),
    (lambda o: o["participants"][0].update(models=["nope"]), "no price"),
    (lambda o: o["participants"][0].update(weight=-1), "weight"),
    (lambda o: o["participants"][0].update(seed_commitment="ab"), "seed_commitment must be 32 bytes"),
    (lambda o: o["participants"][0].update(seed_commitment="zz"), "seed_commitment is not hex"),
    (lambda o: o["allocations"].update({"bob": 5}), "peer id"),
    (lambda o: o["allocations"].update({PEER["bob"]: 2**63}), "exceeds"),
    (lambda o: o.update(participants="x"), "array"),
    (lambda o: o.update(verification=[1]), "verification must be a table"),
    (lambda o: o["verification"]["sprt"].update(alpha=float("nan")), "finite"),
    (lambda o: o["verification"]["sprt"].update(alpha=None), "not a number"),
    (lambda o: o["verification"]["sprt"].update(deeper={"a": {"b": {"c": {"d": 1}}}}), "nest"),
    (lambda o: o["verification"].update(big={str(i): "x" * 100 for i in range(1000)}), "larger"),
    (lambda o: o["verification"].update({1: 2}), "keys must be strings"),
])
def test_bad_genesis_is_rejected_with_a_message_naming_the_problem(mutate, message) -> None:
    obj = make_genesis().to_obj()
    mutate(obj)
    with pytest.raises(GenesisError, match=message):
        genesis_from_obj(obj)


def test_genesis_file_errors_are_genesis_errors(tmp_path) -> None:
    with pytest.raises(GenesisError, match="does not exist"):
        load_genesis(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("chain_id = [")
    with pytest.raises(GenesisError, match="does not parse"):
        load_genesis(tmp_path / "bad.toml")


def test_genesis_state_holds_the_allocations_and_participants() -> None:
    state = LedgerState.from_genesis(make_genesis())
    assert state.height == 0 and state.epoch == 0 and state.time_ms == T0
    assert state.balance(PEER["alice"]) == 100_000 and state.account(PEER["ta"]).balance == 0
    assert state.weights() == {PEER["ta"]: 10, PEER["ta2"]: 3, PEER["ex"]: 7, PEER["ex2"]: 5}
    assert state.participant(PEER["ex2"]).models == ("m", "m2")
    assert state.last_block_hash == make_genesis().hash()
    check_invariants(state)


# =========================================================================== blocks


def test_a_block_must_extend_the_state_or_nothing_is_applied() -> None:
    chain = Chain()
    before = chain.state.app_hash()
    with pytest.raises(BlockMismatch):
        apply_block(chain.state, Block(2, chain.state.last_block_hash, "p", T0, []))
    with pytest.raises(BlockMismatch):
        apply_block(chain.state, Block(1, b"\x00" * 32, "p", T0, []))
    assert chain.state.app_hash() == before
    chain.block()
    assert chain.state.height == 1


def test_a_block_is_its_canonical_bytes_and_its_hash_is_their_digest() -> None:
    """Consensus agrees on bytes and votes on sha256(bytes); the ledger chains on the same hash."""
    chain = Chain()
    tx = chain.transfer("alice", PEER["bob"], 1)
    block = Block(1, chain.state.last_block_hash, PEER["ta"], T0 + 1, [tx])
    raw = block.encode()
    assert decode_block(raw) == block and block.hash == hashlib.sha256(raw).digest()
    check_block(chain.state, decode_block(raw))
    apply_block(chain.state, decode_block(raw))
    assert chain.state.last_block_hash == hashlib.sha256(raw).digest()
    with pytest.raises(WireError):
        decode_block(raw + b"\x00")
    noncanonical = msgpack.packb({k: v for k, v in reversed(block.to_obj().items())}, use_bin_type=True)
    assert Block.decode(noncanonical) == block
    with pytest.raises(WireError, match="canonical"):
        decode_block(noncanonical)
    with pytest.raises(BlockMismatch):
        check_block(chain.state, block)  # already applied: height 1 no longer follows


def test_block_time_from_a_lagging_proposer_is_clamped() -> None:
    chain = Chain()
    apply_block(chain.state, Block(1, chain.state.last_block_hash, "p", T0 - 5_000, []))
    assert chain.state.time_ms == T0


def test_transfer_moves_coins_creates_the_recipient_and_bumps_the_sequence() -> None:
    chain = Chain()
    (r,) = chain.block(chain.transfer("alice", PEER["outsider"], 300))
    assert r.ok and r.kind == "tx_transfer" and r.signer == PEER["alice"]
    assert chain.state.balance(PEER["alice"]) == 99_700 - FEE
    assert chain.state.account(PEER["outsider"]).balance == 300
    assert chain.state.account(PEER["alice"]).sequence == 1


def test_register_participant_newcomer_has_weight_zero_genesis_keeps_its_weight() -> None:
    chain = Chain()
    chain.block(chain.transfer("alice", PEER["outsider"], FEE), chain.transfer("alice", PEER["ta2"], FEE))
    r1, r2 = chain.block(chain.register("outsider", [MODEL, MODEL]), chain.register("ta2", ["m2"]))
    assert r1.ok and r1.detail == "registered" and r2.ok and r2.detail == "updated"
    newcomer = chain.state.participant(PEER["outsider"])
    assert newcomer.weight == 0 and newcomer.models == (MODEL,)
    assert newcomer.pubkey == KEYS["outsider"].public_key
    assert chain.state.participant(PEER["ta2"]).weight == 3
    assert PEER["outsider"] in chain.state.participants()
    assert PEER["outsider"] not in chain.state.weights()


def test_start_escrows_the_bound_on_the_work_from_the_client() -> None:
    chain = Chain()
    req = chain.request(content="hello", max_tokens=20)
    (r,) = chain.block(chain.start(req))
    assert r.ok, r
    escrow = escrow_of("hello", 20)
    rec = chain.state.inference(iid_of(req))
    assert rec.status is InferenceStatus.STARTED and rec.escrow == escrow
    assert (rec.client, rec.ta, rec.executor) == (PEER["alice"], PEER["ta"], PEER["ex"])
    assert rec.deadline == 1 + 3
    assert chain.state.balance(PEER["alice"]) == 100_000 - escrow - FEE


def test_finish_settles_cost_to_pending_fees_and_refunds_the_rest_then_settlement_pays() -> None:
    chain = Chain()
    req = chain.request(max_tokens=20)
    chain.block(chain.start(req))
    (r,) = chain.block(chain.finish(req, prompt=10, completion=5))
    assert r.ok, r
    rec = chain.state.inference(iid_of(req))
    assert rec.status is InferenceStatus.SETTLED and rec.cost == 30 and rec.closed_height == 2
    assert chain.state.balance(PEER["alice"]) == 100_000 - 30 - FEE
    assert chain.state.pending_fees(PEER["ex"]) == 30 and chain.state.balance(PEER["ex"]) == 0
    assert chain.state.participant(PEER["ex"]).completed == 1
    while chain.state.height < 14:  # epoch 0 ends at 10, settles at 10 + 3 + 2
        chain.block()
    assert chain.state.pending_fees(PEER["ex"]) == 30 and chain.state.epoch == 1
    chain.block()
    assert chain.state.pending_fees(PEER["ex"]) == 0 and chain.state.balance(PEER["ex"]) == 30
    assert chain.state.inference(iid_of(req)).payout.value == "paid"


def test_cost_is_capped_at_the_escrow() -> None:
    chain = Chain()
    req = chain.request(content="x", max_tokens=20)
    chain.block(chain.start(req))
    (r,) = chain.block(chain.finish(req, prompt=10_000, completion=20))
    assert r.ok
    escrow = escrow_of("x", 20)
    assert chain.state.inference(iid_of(req)).cost == escrow
    assert chain.state.balance(PEER["alice"]) == 100_000 - escrow - FEE


def _final(order: str) -> LedgerState:
    chain = Chain()
    req = make_request("alice", "hello", 20, T0 + 1000)
    if order == "start, finish":
        chain.block(chain.start(req))
        chain.block(chain.finish(req))
    elif order == "finish, start":
        chain.block(chain.finish(req))
        chain.block(chain.start(req))
    elif order == "[start finish]":
        chain.block(chain.start(req), chain.finish(req))
    else:
        chain.block(chain.finish(req), chain.start(req))
    return chain.state


def test_start_then_finish_and_finish_then_start_reach_the_same_state() -> None:
    """Identical records but for the duty point, which hashes the settling block (so its
    transactions' order), and, in two blocks, for where the Start committed."""
    iid = iid_of(make_request("alice", "hello", 20, T0 + 1000))
    same = [_final("[start finish]"), _final("[finish start]")]
    a, b = _final("start, finish"), _final("finish, start")
    assert a.inference(iid).start_height == 1 and b.inference(iid).start_height == 2
    for state in (*same, a, b):
        assert state.inference(iid).duty_point == duties.duty_point(state.last_block_hash, iid)
        state.inferences.rows[iid] = replace(state.inferences.rows[iid], duty_point=0)
    assert tables(same[0]) == tables(same[1])
    for state in (a, b):
        state.inferences.rows[iid] = replace(state.inferences.rows[iid], start_height=0, deadline=0)
    assert tables(a) == tables(b)
    rec = a.inference(iid)
    assert rec.status is InferenceStatus.SETTLED and rec.cost == 30 and rec.closed_height == 2
    assert a.balance(PEER["alice"]) == 100_000 - 30 - FEE and a.pending_fees(PEER["ex"]) == 30


def test_a_finish_without_its_start_is_held_and_reported_as_finished() -> None:
    chain = Chain()
    req = chain.request()
    (r,) = chain.block(chain.finish(req, completion=4))
    assert r.ok and "held" in r.detail
    view = chain.state.inference(iid_of(req))
    assert view.status is InferenceStatus.FINISHED and view.executor == PEER["ex"]
    assert view.completion_tokens == 4


def test_a_held_finish_is_dropped_after_the_deadline() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.finish(req))
    for _ in range(3):
        chain.block()
    assert chain.state.inference(iid_of(req)) is None and len(chain.state.held) == 0


def test_a_held_finish_of_another_executor_is_discarded_when_the_start_names_one() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.finish(req, executor="ex2"))
    (r,) = chain.block(chain.start(req, executor="ex"))
    assert r.ok and "settled" not in r.detail
    assert chain.state.inference(iid_of(req)).status is InferenceStatus.STARTED
    assert len(chain.state.held) == 0 and chain.state.held_count(PEER["ex2"]) == 0


def test_a_held_finish_claiming_more_than_max_tokens_does_not_settle() -> None:
    chain = Chain()
    req = chain.request(max_tokens=5)
    chain.block(chain.finish(req, completion=6))
    (r,) = chain.block(chain.start(req))
    assert r.ok and "too many tokens" in r.detail
    assert chain.state.inference(iid_of(req)).status is InferenceStatus.STARTED
    (r,) = chain.block(chain.finish(req, completion=5))  # the executor may correct itself in time
    assert r.ok and chain.state.inference(iid_of(req)).status is InferenceStatus.SETTLED


def test_an_unfinished_inference_expires_after_its_deadline_with_a_full_refund_and_a_miss() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))  # height 1, deadline 4
    chain.block(), chain.block(), chain.block()
    rec = chain.state.inference(iid_of(req))
    assert rec.status is InferenceStatus.EXPIRED and rec.closed_height == 4 and rec.cost == 0
    assert chain.state.balance(PEER["alice"]) == 100_000 - FEE  # the Start's fee is not refunded
    assert chain.state.participant(PEER["ex"]).missed == 1
    (r,) = chain.block(chain.finish(req))
    assert r.reason is Reason.INFERENCE_CLOSED


def test_a_finish_in_the_deadline_block_is_in_time() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))
    chain.block(), chain.block()
    (r,) = chain.block(chain.finish(req))  # height 4 == deadline
    assert r.ok and chain.state.inference(iid_of(req)).status is InferenceStatus.SETTLED


def test_closed_inferences_are_kept_until_the_epoch_after_theirs_settles_then_pruned() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))
    chain.block(chain.finish(req))  # closed at height 2, epoch 0 (settles at 15)
    while chain.state.height < 24:
        chain.block()
    assert chain.state.inference(iid_of(req)) is not None  # kept until epoch 1 settles
    chain.block()  # height 25: epoch 1 settles
    assert chain.state.inference(iid_of(req)) is None
    assert chain.state.epoch_summary(0).inferences == 1  # the summary outlives the records


def test_request_ids_are_forgotten_once_stale_and_the_request_can_never_start_again() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))
    chain.block(chain.finish(req))
    assert iid_of(req) in chain.state.seen
    chain.block(dt_ms=61_000)
    assert iid_of(req) not in chain.state.seen
    (r,) = chain.block(chain.start(req))
    assert r.reason is Reason.STALE_REQUEST


# =========================================================================== rejections


def _rejected(chain: Chain, tx: object, reason: Reason) -> None:
    """Each bad tx gets its reason in the receipt and changes nothing, not even a sequence."""
    before = tables(chain.state)
    assert check_tx(chain.state, tx).reason is reason  # type: ignore[arg-type]
    (r,) = chain.block(tx)
    assert r.reason is reason, r
    assert not r.ok and r.detail
    assert tables(chain.state) == before


def test_garbage_is_malformed() -> None:
    chain = Chain()
    for junk in (b"", b"\xc1", msgpack.packb([1, 2, 3]), b"\x00" * 100):
        _rejected(chain, junk, Reason.MALFORMED)
    _rejected(chain, "not bytes", Reason.MALFORMED)


def test_oversize_tx_is_rejected_before_decoding() -> None:
    chain = Chain()
    _rejected(chain, b"\x00" * (64 * 1024 + 1), Reason.OVERSIZE)


def test_an_envelope_of_another_kind_is_an_unknown_kind() -> None:
    chain = Chain()
    ann = seal(Announcement(addrs=[], models=[], capacity=1, seq=0), KEYS["alice"])
    _rejected(chain, ann, Reason.UNKNOWN_KIND)


def test_an_unknown_schema_version_is_unsupported() -> None:
    chain = Chain()
    env = msgpack.unpackb(chain.transfer("alice", PEER["bob"], 1))
    env[2] = 99
    _rejected(chain, msgpack.packb(env, use_bin_type=True), Reason.UNSUPPORTED_VERSION)


def test_a_forged_signature_is_bad() -> None:
    chain = Chain()
    env = msgpack.unpackb(chain.transfer("alice", PEER["bob"], 1))
    env[4] = KEYS["bob"].public_key  # claim bob signed alice's transfer
    _rejected(chain, msgpack.packb(env, use_bin_type=True), Reason.BAD_SIGNATURE)
    body = msgpack.unpackb(env[3])
    body["amount"] = 1000  # or alter the body under alice's signature
    env[3], env[4] = msgpack.packb(body), KEYS["alice"].public_key
    _rejected(chain, msgpack.packb([ENVELOPE_VERSION, *env[1:]], use_bin_type=True), Reason.BAD_SIGNATURE)


def test_a_tx_for_another_chain_is_void() -> None:
    chain = Chain()
    tx = chain.sign("alice", Transfer(chain_id="other", to=PEER["bob"], amount=1, sequence=0))
    _rejected(chain, tx, Reason.WRONG_CHAIN)


def test_an_unknown_signer_has_no_account() -> None:
    chain = Chain()
    _rejected(chain, chain.transfer("outsider", PEER["bob"], 1), Reason.UNKNOWN_ACCOUNT)


def test_a_wrong_sequence_is_rejected_and_a_replayed_tx_too() -> None:
    chain = Chain()
    tx = chain.transfer("alice", PEER["bob"], 1)
    assert chain.block(tx)[0].ok
    _rejected(chain, tx, Reason.BAD_SEQUENCE)  # replay
    ahead = chain.sign("alice", Transfer(chain_id=CHAIN, to=PEER["bob"], amount=1, sequence=5))
    assert check_tx(chain.state, ahead).ok  # the mempool may queue it...
    assert chain.block(ahead)[0].reason is Reason.BAD_SEQUENCE  # ...a block may not apply it yet


def test_a_rejected_tx_does_not_consume_its_sequence_so_the_next_one_fails_too() -> None:
    chain = Chain()
    bad = chain.transfer("alice", "nobody", 1)
    good_looking = chain.transfer("alice", PEER["bob"], 1)
    r1, r2 = chain.block(bad, good_looking)
    assert (r1.reason, r2.reason) == (Reason.INVALID_ADDRESS, Reason.BAD_SEQUENCE)


def test_transfer_to_a_non_address_is_invalid() -> None:
    chain = Chain()
    _rejected(chain, chain.transfer("alice", "bob", 1), Reason.INVALID_ADDRESS)


def test_transfer_beyond_the_balance_is_insufficient() -> None:
    chain = Chain()
    _rejected(chain, chain.transfer("carol", PEER["bob"], 11), Reason.INSUFFICIENT_BALANCE)


def test_zero_or_negative_amounts_are_malformed() -> None:
    chain = Chain()
    _rejected(chain, chain.sign("alice", Transfer(chain_id=CHAIN, to=PEER["bob"], amount=0, sequence=0)),
              Reason.MALFORMED)


def test_registering_an_unpriced_model_or_a_huge_address_is_rejected() -> None:
    chain = Chain()
    _rejected(chain, chain.register("alice", ["gpt-9"]), Reason.UNKNOWN_MODEL)
    _rejected(chain, chain.register("alice", [MODEL], addrs=["/ip4/" + "1" * 300]), Reason.MALFORMED)


def test_start_by_a_non_participant_is_rejected() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(), ta="bob"), Reason.NOT_A_PARTICIPANT)


def test_start_with_a_tampered_or_unsigned_client_request_is_rejected() -> None:
    chain = Chain()
    env = msgpack.unpackb(chain.request())
    body = msgpack.unpackb(env[3])
    body["max_tokens"] = 1  # the TA shrinks the request to lower the escrow
    env[3] = msgpack.packb(body)
    _rejected(chain, chain.start(msgpack.packb(env, use_bin_type=True)), Reason.BAD_CLIENT_REQUEST)
    _rejected(chain, chain.start(b"not an envelope"), Reason.BAD_CLIENT_REQUEST)
    transfer = chain.sign("alice", Transfer(chain_id=CHAIN, to=PEER["bob"], amount=1, sequence=0))
    _rejected(chain, chain.start(transfer), Reason.BAD_CLIENT_REQUEST)


def test_start_for_an_unpriced_model_is_rejected() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(model="gpt-9")), Reason.UNKNOWN_MODEL)


def test_start_of_a_stale_or_future_request_is_rejected() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(ts=T0 - 60_001)), Reason.STALE_REQUEST)
    _rejected(chain, chain.start(chain.request(ts=chain.now + 1000 + 60_001)), Reason.STALE_REQUEST)


def test_the_same_client_request_starts_once() -> None:
    chain = Chain()
    req = chain.request()
    assert chain.block(chain.start(req))[0].ok
    _rejected(chain, chain.start(req, ta="ta2"), Reason.DUPLICATE_INFERENCE)
    chain.block(chain.finish(req))
    _rejected(chain, chain.start(req), Reason.DUPLICATE_INFERENCE)


def test_a_ta_cannot_name_itself_executor() -> None:
    chain = Chain()
    chain.block(chain.register("ta", [MODEL]))
    _rejected(chain, chain.start(chain.request(), ta="ta", executor="ta"), Reason.SELF_EXECUTION)


def test_the_executor_must_be_a_participant_serving_the_model() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(), executor="ta2"), Reason.EXECUTOR_NOT_ELIGIBLE)
    _rejected(chain, chain.start(chain.request(), executor="bob"), Reason.EXECUTOR_NOT_ELIGIBLE)
    _rejected(chain, chain.start(chain.request(model="m2"), executor="ex"), Reason.EXECUTOR_NOT_ELIGIBLE)


def test_a_client_without_an_account_cannot_be_charged() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(client="outsider")), Reason.UNKNOWN_CLIENT)


def test_escrow_may_never_exceed_the_client_balance() -> None:
    chain = Chain()
    _rejected(chain, chain.start(chain.request(client="carol", max_tokens=1)), Reason.INSUFFICIENT_BALANCE)
    # The escrow and the Start's fee (the client's) must both fit in the balance.
    content = "x"
    max_tokens = 50_000 // PRICE - (4 + 1 + 8 + 16)
    assert escrow_of(content, max_tokens) == 50_000
    _rejected(chain, chain.start(chain.request(client="bob", content=content, max_tokens=max_tokens)),
              Reason.INSUFFICIENT_BALANCE)
    req = chain.request(client="bob", content=content, max_tokens=max_tokens - 1)
    assert chain.block(chain.start(req))[0].ok and chain.state.balance(PEER["bob"]) == PRICE - FEE


def test_finish_by_anyone_but_the_named_executor_is_rejected() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))
    _rejected(chain, chain.finish(req, executor="ex2"), Reason.WRONG_EXECUTOR)
    _rejected(chain, chain.finish(req, executor="alice"), Reason.NOT_A_PARTICIPANT)


def test_a_second_finish_is_rejected() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.start(req))
    chain.block(chain.finish(req))
    _rejected(chain, chain.finish(req), Reason.INFERENCE_CLOSED)


def test_a_finish_after_its_record_was_pruned_is_closed() -> None:
    chain = Chain(state=LedgerState.from_genesis(make_genesis(request_window_ms=10**9)))
    req = chain.request()
    chain.block(chain.start(req))
    chain.block(chain.finish(req))
    while chain.state.height < 25:
        chain.block()
    assert chain.state.inference(iid_of(req)) is None
    _rejected(chain, chain.finish(req), Reason.INFERENCE_CLOSED)


def test_claiming_more_completion_tokens_than_max_tokens_is_rejected() -> None:
    chain = Chain()
    req = chain.request(max_tokens=20)
    chain.block(chain.start(req))
    _rejected(chain, chain.finish(req, completion=21), Reason.TOKENS_EXCEED_REQUEST)


def test_finish_hashes_must_be_32_bytes() -> None:
    chain = Chain()
    _rejected(chain, chain.finish(b"", inference_id=b"short"), Reason.MALFORMED)


def test_a_held_finish_cannot_be_held_twice() -> None:
    chain = Chain()
    req = chain.request()
    chain.block(chain.finish(req))
    _rejected(chain, chain.finish(req), Reason.DUPLICATE_FINISH)


def test_the_holding_area_is_bounded_per_executor_and_in_total() -> None:
    """An executor holds at most ``max_held_finishes_per_executor`` (10 here), and at most its
    equal share of ``max_held_finishes`` among the executors a Start could name (ex and ex2:
    12 // 2), so that one executor -- or many identities in the draw table -- cannot fill the
    area and leave another's Finish without a place (``rules.held_finish_share``)."""
    chain = Chain(state=LedgerState.from_genesis(make_genesis(inference_deadline_blocks=50)))
    chain.block(*[chain.finish(b"", inference_id=bytes([i]) * 32) for i in range(10)])
    _rejected(chain, chain.finish(b"", inference_id=b"\xff" * 32), Reason.HOLDING_AREA_FULL)
    chain = Chain(state=LedgerState.from_genesis(make_genesis(max_held_finishes=12, inference_deadline_blocks=50)))
    chain.block(*[chain.finish(b"", inference_id=bytes([i]) * 32) for i in range(6)])
    _rejected(chain, chain.finish(b"", inference_id=b"\xff" * 32), Reason.HOLDING_AREA_FULL)
    chain.block(*[chain.finish(b"", executor="ex2", inference_id=bytes([i]) * 32) for i in range(6)])
    _rejected(chain, chain.finish(b"", executor="ex2", inference_id=b"\xfe" * 32),
              Reason.HOLDING_AREA_FULL)
    assert len(chain.state.held) == 12


def test_only_an_executor_a_start_can_name_has_its_finish_held() -> None:
    """ta has weight but serves no model: no draw table holds it, so no Start can ever name it
    and its Finish for an inference not started is refused, not held for free."""
    chain = Chain()
    _rejected(chain, chain.finish(b"", executor="ta", inference_id=b"\x01" * 32), Reason.EXECUTOR_NOT_ELIGIBLE)


# =========================================================================== mempool, queries, snapshots


def test_check_tx_accepts_a_later_sequence_and_changes_nothing() -> None:
    chain = Chain()
    before, hash_before = tables(chain.state), chain.state.app_hash()
    first = chain.transfer("alice", PEER["bob"], 1)
    second = chain.transfer("alice", PEER["bob"], 1)
    assert check_tx(chain.state, first).ok and check_tx(chain.state, second).ok
    assert check_tx(chain.state, second).sequence == 1
    assert tables(chain.state) == before and chain.state.app_hash() == hash_before
    r1, r2 = chain.block(second, first)  # a block takes them only in order
    assert (r1.reason, r2.reason) == (Reason.BAD_SEQUENCE, Reason.OK)


def test_snapshot_round_trip_keeps_the_app_hash_and_the_behaviour() -> None:
    chain = Chain()
    req, held_req = chain.request(), chain.request(client="bob")
    chain.block(chain.start(req), chain.finish(held_req), chain.transfer("alice", PEER["outsider"], 5))
    copy = Chain(state=LedgerState.from_bytes(chain.state.to_bytes()))
    assert copy.state.app_hash() == chain.state.app_hash()
    assert copy.state.to_bytes() == chain.state.to_bytes()
    for c in (chain, copy):
        c.block(c.start(held_req))
        c.block(), c.block(), c.block()  # req expires at height 4
    assert copy.state.app_hash() == chain.state.app_hash()
    assert copy.state.inference(iid_of(req)).status is InferenceStatus.EXPIRED


def test_a_corrupt_snapshot_is_a_snapshot_error() -> None:
    good = Chain().state.to_bytes()
    for bad in (b"", b"\x93\x01\x02\x03", good[:-5], msgpack.packb([99] + msgpack.unpackb(good)[1:])):
        with pytest.raises(SnapshotError):
            LedgerState.from_bytes(bad)
    # A snapshot whose coins do not add up is refused.
    obj = msgpack.unpackb(good)
    obj[7][0][1][0][1][0] += 1  # first account's balance
    with pytest.raises(SnapshotError, match="coins"):
        LedgerState.from_bytes(msgpack.packb(obj, use_bin_type=True))


def test_the_app_hash_covers_header_and_records() -> None:
    a, b = Chain(), Chain()
    a.block(a.transfer("alice", PEER["bob"], 1))
    b.block(b.transfer("alice", PEER["bob"], 2))
    assert a.state.app_hash() != b.state.app_hash()
    state = LedgerState.from_genesis(make_genesis())
    other = LedgerState.from_genesis(Genesis(**{**make_genesis().__dict__, "chain_id": "x"}))
    assert state.app_hash() != other.app_hash()


# =========================================================================== storms


CLIENTS = ["alice", "bob", "carol", "outsider"]  # carol is poor, outsider has no account at first
SERVES = {MODEL: ["ex", "ex2"], "m2": ["ex2"]}


def storm_genesis(seed: int) -> Genesis:
    rng = random.Random(seed)
    return make_genesis(epoch_length_blocks=rng.choice([3, 5, 10]),
                        validation_window_blocks=1, dispute_voting_blocks=2,
                        inference_deadline_blocks=rng.choice([1, 2, 4]),
                        max_held_finishes=rng.choice([3, 50]), max_held_finishes_per_executor=2)


def storm_blocks(seed: int, n_blocks: int, txs_per_block: int) -> list[Block]:
    """Random blocks: mostly valid traffic (transfers, starts, finishes in either order, also
    across blocks) laced with every fault the storm knows (wrong executor, stale or replayed
    requests, overspends, skipped sequences, old txs again, mangled bytes, junk).

    Blocks are built against a shadow replica so that they chain (height, prev hash), so that
    finishes can target what really started, and so that sequences are mostly right.
    """
    rng = random.Random(seed)
    shadow = Chain(state=LedgerState.from_genesis(storm_genesis(seed)))
    started: list[tuple[bytes, str]] = []  # (client request, executor) that a block accepted
    deferred: list[tuple[bytes, str, str]] = []  # Starts to send a block later (Finish goes first)
    finished: set[bytes] = set()  # requests the good path already finished
    sent: list[bytes] = []
    blocks = []
    for _ in range(n_blocks):
        txs: list[object] = []
        starts: dict[bytes, tuple[bytes, str]] = {}  # tx -> (request, executor)
        for req, ta, ex in deferred:
            tx = shadow.start(req, ta=ta, executor=ex)
            starts[tx] = (req, ex)
            txs.append(tx)
        deferred = []
        fresh = started[-8:]  # recent starts: finishes mostly aim at inferences still running
        for _ in range(rng.randrange(txs_per_block + 1)):
            op, bad = rng.random(), rng.random() < 0.15
            sequences = dict(shadow.next_seq)  # a deliberately bad tx will not consume its sequence
            if op < 0.2:
                who = rng.choice(["alice", "bob", "carol", "ex", "ex2", "outsider"])
                amount = rng.randrange(1, 200_000) if bad else rng.randrange(1, 500)
                to = "junk" if bad and rng.random() < 0.3 else PEER[rng.choice(list(PEER))]
                txs.append(shadow.transfer(who, to, amount))
            elif op < 0.55:
                model = rng.choice([MODEL, MODEL, "m2"])
                client = rng.choice(CLIENTS) if bad else rng.choice(["alice", "bob"])
                skew = rng.randrange(-90_000, 90_000) if bad else rng.randrange(-15_000, 15_000)
                req = make_request(client, "q" * rng.randrange(0, 300), rng.randrange(1, 400),
                                   shadow.now + skew, nonce=rng.randbytes(16), model=model)
                ta = rng.choice(["ta", "ta2", "ex", "bob"] if bad else ["ta", "ta2"])
                ex = rng.choice(["ex", "ex2", "ta"] if bad else SERVES[model])
                if rng.random() < 0.25:  # the executor is quick: its Finish lands a block early
                    txs.append(shadow.finish(req, executor=ex, prompt=rng.randrange(0, 400),
                                             completion=rng.randrange(0, 400)))
                    deferred.append((req, ta, ex))
                else:
                    tx = shadow.start(req, ta=ta, executor=ex)
                    starts[tx] = (req, ex)
                    txs.append(tx)
            elif op < 0.8 and (started or starts):
                pool = [c for c in list(starts.values()) + fresh if c[0] not in finished]
                if bad or not pool:
                    pool = started[-40:] or list(starts.values())
                req, ex = rng.choice(pool)
                finished.add(req)
                if bad:
                    ex = rng.choice(["ex", "ex2", "ta", "alice"])
                txs.append(shadow.finish(req, executor=ex, prompt=rng.randrange(0, 600),
                                         completion=rng.randrange(0, 500 if bad else 200)))
            elif op < 0.85 and started:
                txs.append(shadow.start(rng.choice(started)[0], ta=rng.choice(["ta", "ta2"])))
            elif op < 0.9:
                who = rng.choice(["alice", "ex", "ex2", "outsider"])
                models = {"ex": [MODEL], "ex2": [MODEL, "m2"]}.get(who, [])
                if bad:
                    models = rng.sample([MODEL, "m2", "nope"], rng.randrange(0, 3))
                txs.append(shadow.register(who, models))
            elif op < 0.95 and sent:
                txs.append(rng.choice(sent))  # an old tx again
            else:
                base = bytearray(rng.choice(sent) if sent else b"\x90")
                for _ in range(rng.randrange(1, 4)):
                    base[rng.randrange(len(base))] = rng.randrange(256)
                txs.append(bytes(base) if rng.random() < 0.8 else rng.randbytes(rng.randrange(64)))
            if bad:
                shadow.next_seq = sequences
            if rng.random() < 0.03:  # a signer skips or reuses a sequence
                who = PEER[rng.choice(list(PEER))]
                shadow.next_seq[who] = max(0, shadow.next_seq.get(who, 0) + rng.choice([-1, 1]))
        sent.extend(t for t in txs if isinstance(t, bytes))
        dt = rng.choice([0, 1_000, 1_000, 5_000, 40_000, -3_000])
        block = Block(shadow.state.height + 1, shadow.state.last_block_hash, PEER["ta"],
                      shadow.state.time_ms + dt, list(txs))  # type: ignore[arg-type]
        _, receipts = apply_block(shadow.state, block)
        started += [starts[t] for t, r in zip(txs, receipts) if r.ok and t in starts]
        shadow.next_seq.clear()
        blocks.append(block)
    return blocks


def run_storm(seed: int, n_blocks: int = 24, txs_per_block: int = 12) -> None:
    print(f"ledger storm seed={seed}")
    note(f"ledger storm seed={seed} (replay: LEDGER_STORM_SEED={seed})")
    blocks = storm_blocks(seed, n_blocks, txs_per_block)
    genesis = storm_genesis(seed)
    a = LedgerState.from_genesis(genesis)
    b = LedgerState.from_genesis(genesis)
    outcomes: set[Reason] = set()
    for i, block in enumerate(blocks):
        _, receipts = apply_block(a, block)
        outcomes.update(r.reason for r in receipts)
        check_invariants(a)
        assert all(acct.balance >= 0 for acct in a.accounts.rows.values())
        assert a.total_coins() == genesis.supply + a.minted - a.burned
        if i == len(blocks) // 2:
            b = LedgerState.from_bytes(b.to_bytes())  # a replica restarting from its snapshot
        apply_block(b, block)
        assert a.app_hash() == b.app_hash(), f"replicas diverged at height {block.height}"
    fresh = LedgerState.from_bytes(a.to_bytes())
    assert fresh.app_hash() == a.app_hash()  # the incremental hash equals a from-scratch one
    assert Reason.OK in outcomes


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_storm_conserves_coins_never_goes_negative_and_replicas_agree(seed: int) -> None:
    run_storm(int(os.environ.get("LEDGER_STORM_SEED", seed)))


def test_storm_reaches_every_outcome() -> None:
    """A long fixed-seed storm settles in both orders, expires, pays epochs and rejects widely."""
    seed = 20_260_101  # fixed: the thresholds below were checked for this seed
    print(f"ledger storm seed={seed}")
    blocks = storm_blocks(seed, n_blocks=60, txs_per_block=20)
    state = LedgerState.from_genesis(storm_genesis(seed))
    reasons: Counter[str] = Counter()
    statuses: Counter[InferenceStatus] = Counter()
    for block in blocks:
        _, receipts = apply_block(state, block)
        reasons.update("held" if r.ok and "held until" in r.detail else
                       "settled with held" if r.ok and "settled with its held" in r.detail else
                       r.reason.value for r in receipts)
        statuses.update(r.status for r in state.inferences.rows.values()
                        if r.closed_height == block.height)
        check_invariants(state)
    print(dict(reasons), dict(statuses))
    assert statuses[InferenceStatus.SETTLED] >= 20 and statuses[InferenceStatus.EXPIRED] >= 5
    assert reasons["held"] >= 5 and reasons["settled with held"] >= 2
    assert len(reasons) >= 15  # OK plus most rejection reasons
    assert state.balance(PEER["ex"]) + state.balance(PEER["ex2"]) > 0  # epochs paid fees
    assert state.height == 60


# =========================================================================== a big block


def test_a_block_of_1000_mixed_txs_applies() -> None:
    """1,000 txs (transfers, starts, finishes) in one block all apply. How long that takes is
    measured by benchmarks/ledger_bench.py ("applying blocks"), not asserted here."""
    keys = [Keypair.from_seed(f"client{i}".encode()) for i in range(200)]
    genesis = replace(make_genesis(max_held_finishes=10_000, max_held_finishes_per_executor=10_000,
                                   request_window_ms=10**9),
                      allocations={**{k.peer_id: 10**9 for k in keys}, PEER["alice"]: 10**9})
    state = LedgerState.from_genesis(genesis)
    chain = Chain(state=state)
    txs: list[bytes] = []
    reqs = [request_drawing(state, lambda n, i=i: make_request(
        "alice", f"prompt {i}", 64, T0, nonce=hashlib.sha256(i.to_bytes(4, "big") + n).digest()[:16]),
        PEER["ta"], PEER["ex"]) for i in range(300)]
    for req in reqs:
        txs.append(chain.start(req, executor="ex"))
    for req in reqs:
        txs.append(chain.finish(req, executor="ex"))
    for i in range(400):
        k = keys[i % len(keys)]
        txs.append(seal(Transfer(chain_id=CHAIN, to=keys[(i + 1) % len(keys)].peer_id, amount=1,
                                 sequence=i // len(keys)), k))
    block = Block(1, state.last_block_hash, PEER["ta"], T0 + 1000, txs)
    _, receipts = apply_block(state, block)
    assert len(receipts) == 1000 and all(r.ok for r in receipts), [r for r in receipts if not r.ok][:3]


def test_the_executor_draw_table_picks_as_the_walk_over_the_weights_without_the_excluded() -> None:
    """rules.DrawTable answers by bisection what the walk over the positive weights in peer-id
    order, less the excluded peers, answers: at every boundary and with absent or weightless
    peers excluded."""
    seed = 5
    print(f"draw table seed={seed}")
    rng = random.Random(seed)

    def walk(weights: dict[str, int], point: int) -> str:
        for peer, weight in sorted((p, w) for p, w in weights.items() if w > 0):
            if point < weight:
                return peer
            point -= weight
        raise AssertionError("point past the total")

    for _ in range(3000):
        weights = {f"p{i}": rng.choice([0, 1, 2, 5, 10**6]) for i in range(rng.randint(0, 8))}
        exclude = frozenset(rng.sample([*weights, "absent"], rng.randint(0, min(3, len(weights) + 1))))
        left = {p: w for p, w in weights.items() if p not in exclude}
        draw = rng.randbytes(32)
        want = walk(left, int.from_bytes(draw, "big") % sum(left.values())) if sum(left.values()) else None
        assert rules.DrawTable(weights).pick(draw, exclude) == want, (weights, exclude)


def test_an_executor_that_drops_its_model_is_not_drawn_from_the_block_that_drops_it() -> None:
    """The ledger keeps each epoch's executor table laid out (executor_draw.ExecutorTables): a
    change of models must reach the draw within its own block, not at the next commit."""
    chain = Chain()
    chain.block(chain.transfer("alice", PEER["ex"], 100))
    assert PEER["ex"] in chain.state.executor_tables.table(chain.state, MODEL, 0)  # laid out already
    req = make_request("alice", "hi", 20, T0 + 1000)
    register, start = chain.register("ex", ["m2"]), chain.start(req, executor="ex")
    r, s = chain.block(register, start)
    assert r.ok and s.reason is Reason.EXECUTOR_NOT_ELIGIBLE, (r, s)
    assert PEER["ex"] not in chain.state.executor_tables.table(chain.state, MODEL, 0)
