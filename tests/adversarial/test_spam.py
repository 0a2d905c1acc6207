"""Attack class: spam -- crowding the protocol's own work out of the mempool and the blocks.

On a ledger where transactions cost nothing and the mempool has no per-account quota, a
few dozen one-coin accounts fill the pool and an honest FinishInference is refused; the
submitter gives up, the validator believes its duty done, and honest participants lose pay
and rewards. What must hold instead (issue 11, invariant 3):

* every transaction has a price (``tx_fee``, burned: supply + minted - burned is conserved)
  or, for the protocol-critical kinds, which are free, a quota;
* the mempool keeps a reserved share for protocol-critical transactions, bounds every
  account, admits no more paying transactions than the signer's balance pays for, and
  reaps protocol-critical ones first;
* the transaction topic validator drops, before forwarding, batches holding a transaction
  that ``check_tx`` refuses against committed state (an unfunded key's);
* a refused submission is retried with a bounded backoff, and a validator's duty counts as
  done only once its transaction commits.

The ledger and the mempool are driven directly, with real signed transactions, the way a
replica drives them: admit, reap a block, apply it, update the pool.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from ledger_driver import OK, LedgerDriver, request_message

from gonka_p2p.actors.ledger_hooks import LedgerHooks
from gonka_p2p.actors.replica import Committed, ReplicaMetrics, ReplicaParams, TxDropped
from gonka_p2p.actors.replica.tx_gossip import TxGossip
from gonka_p2p.actors.validator import ValidatorActor
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.ledger import rules
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.consensus_wire import TxBatch
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.mempool import Mempool, MempoolParams, TxRefused
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants, check_tx
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    FinishInference,
    Reason,
    RegisterParticipant,
    RevealValidationSeed,
    StartInference,
    Transfer,
    Validation,
    decode_tx,
    derive_validation_seed,
)
from gonka_p2p.ledger.executor_draw import executor_weights
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import InferenceRequest, inference_id
from gonka_p2p.wire.schema import Message
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

CHAIN = "gonka-spam"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10
FEE = 2
HONEST = ("ta", "ex1", "ex2", "v1", "v2")
SPAMMERS = 100
KEYS = {n: Keypair.from_seed(f"spam-test-{n}".encode()) for n in (*HONEST, "alice", "broke", "stranger")}
SPAM_KEYS = [Keypair.from_seed(f"spam-test-spammer-{i}".encode()) for i in range(SPAMMERS)]
PEER = {n: k.peer_id for n, k in KEYS.items()}
# A pool the spammers can fill: 100 accounts x 8 pending > the 500 slots not reserved.
POOL = MempoolParams(max_txs=600, max_bytes=4 * 1024 * 1024, reserved_ppm=166_667, max_per_account=8,
                     max_bytes_per_account=64 * 1024, max_duties_per_account=64)
UNRESERVED = POOL.class_txs  # 500
BLOCK_TXS = 120


def genesis(**overrides: Any) -> Genesis:
    params = Params(**{**dict(epoch_length_blocks=L, inference_deadline_blocks=5, request_window_ms=10**9,
                              max_tx_bytes=64 * 1024, price_per_token={MODEL: 1}, validation_window_blocks=3,
                              dispute_voting_blocks=2, epoch_reward=100_000, validation_cap_ppm=rules.PPM,
                              tx_fee=FEE), **overrides})
    return Genesis(chain_id=CHAIN, genesis_time_ms=T0, params=params,
                   participants=tuple(GenesisParticipant(KEYS[n].public_key, 10, models=(MODEL,))
                                      for n in HONEST),
                   allocations={PEER["alice"]: 1_000_000, PEER["broke"]: FEE,
                                **{k.peer_id: 1_000 for k in SPAM_KEYS}})


@dataclass
class Chain:
    """One replica's ledger and mempool: transactions are admitted, reaped, applied."""

    state: LedgerState = field(default_factory=lambda: LedgerState.from_genesis(genesis()))
    pool: Mempool = field(default_factory=lambda: Mempool(POOL))
    receipts: dict[bytes, Receipt] = field(default_factory=dict)
    nonce: int = 0

    def submit(self, key: Keypair, make: Callable[[int], Message]) -> bytes:
        """Sign with the signer's next sequence and admit (raises TxRefused); the tx hash."""
        return self.pool.add(self.state, seal(make(self.pool.next_sequence(self.state, key.peer_id)), key)).tx_hash

    def block(self, take: bool = True) -> None:
        """The next block: with what the pool offers, or (``take=False``) with nothing."""
        txs = self.pool.reap(self.state, BLOCK_TXS, 8 * 1024 * 1024) if take else []
        block = Block(self.state.height + 1, self.state.last_block_hash, PEER["ta"], self.state.time_ms + 1000, txs)
        _, receipts = apply_block(self.state, block)
        self.receipts.update((r.tx_hash, r) for r in receipts)
        self.pool.update(self.state, txs)
        check_invariants(self.state)

    def flood(self) -> int:
        """Every spammer queues transfers until the pool refuses it; how many were admitted."""
        admitted = 0
        for i, key in enumerate(SPAM_KEYS):
            to = SPAM_KEYS[(i + 1) % SPAMMERS].peer_id
            while True:
                try:
                    self.submit(key, lambda n, to=to: Transfer(chain_id=CHAIN, to=to, amount=1, sequence=n))
                except TxRefused:
                    break
                admitted += 1
        return admitted

    def seed(self, who: str, epoch: int) -> bytes:
        return derive_validation_seed(KEYS[who].secret, CHAIN, epoch)

    def request(self) -> Signed[InferenceRequest]:
        self.nonce += 1
        raw = seal(request_message(self.state, self.nonce.to_bytes(16, "big"), MODEL), KEYS["alice"])
        return open_envelope(raw, InferenceRequest)


def test_a_paying_transaction_burns_its_fee_and_coins_are_conserved() -> None:
    chain = Chain()
    before = chain.state.balance(PEER["alice"])
    tx = chain.submit(KEYS["alice"], lambda n: Transfer(chain_id=CHAIN, to=PEER["ta"], amount=100, sequence=n))
    chain.block()
    assert chain.receipts[tx].ok
    assert chain.state.balance(PEER["alice"]) == before - 100 - FEE
    assert chain.state.burned == FEE
    assert chain.state.total_coins() == chain.state.genesis.supply + chain.state.minted - chain.state.burned


def test_a_transfer_must_leave_the_fee_and_a_key_that_cannot_pay_is_refused() -> None:
    chain = Chain()
    whole = seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=0), KEYS["broke"])  # fee 2, holds 2
    assert check_tx(chain.state, whole).reason is Reason.INSUFFICIENT_BALANCE
    register = seal(RegisterParticipant(chain_id=CHAIN, addrs=[], models=[MODEL], sequence=0), KEYS["broke"])
    assert check_tx(chain.state, register).ok
    chain.pool.add(chain.state, register)
    again = seal(RegisterParticipant(chain_id=CHAIN, addrs=["/ip4/1.2.3.4"], models=[MODEL], sequence=1),
                 KEYS["broke"])
    with pytest.raises(TxRefused) as refused:  # the balance pays one pending fee, not two
        chain.pool.add(chain.state, again)
    assert refused.value.code == "insufficient_balance"
    stranger = seal(RegisterParticipant(chain_id=CHAIN, addrs=[], models=[MODEL], sequence=0), KEYS["stranger"])
    assert check_tx(chain.state, stranger).reason is Reason.UNKNOWN_ACCOUNT


def test_protocol_transactions_are_free_and_a_start_is_paid_by_its_client() -> None:
    chain = Chain()
    commits = [chain.submit(KEYS[w], lambda n, w=w: CommitValidationSeed(
        chain_id=CHAIN, epoch=1, commitment=rules.seed_commitment(1, PEER[w], chain.seed(w, 1)), sequence=n))
        for w in HONEST]
    request = chain.request()
    executor = rules.choose_executor(executor_weights(chain.state, MODEL), frozenset({PEER["ta"]}),
                                     inference_id(request), 0)
    start = chain.submit(KEYS["ta"], lambda n: StartInference(chain_id=CHAIN, request=request.raw,
                                                              executor=executor, attempt=0, sequence=n))
    chain.block()
    assert all(chain.receipts[h].ok for h in (*commits, start))
    assert all(chain.state.balance(PEER[w]) == 0 for w in HONEST)  # no participant paid anything
    record = chain.state.inference(inference_id(request))
    assert record is not None
    assert chain.state.balance(PEER["alice"]) == 1_000_000 - record.escrow - FEE
    assert chain.state.burned == FEE


def test_a_hundred_funded_spammers_for_a_whole_epoch_crowd_out_no_protocol_transaction() -> None:
    chain = Chain()
    honest: list[bytes] = []

    def blocks_until(height: int) -> None:
        while chain.state.height < height:
            chain.flood()
            chain.block()

    assert chain.flood() >= UNRESERVED  # the unreserved share is full
    honest += [chain.submit(KEYS[w], lambda n, w=w: CommitValidationSeed(
        chain_id=CHAIN, epoch=1, commitment=rules.seed_commitment(1, PEER[w], chain.seed(w, 1)), sequence=n))
        for w in HONEST]
    blocks_until(L + 1)
    for _ in range(4):  # inferences of epoch 1: Start (paying, client's fee) and Finish (free)
        request = chain.request()
        iid = inference_id(request)
        executor = rules.choose_executor(executor_weights(chain.state, MODEL), frozenset({PEER["ta"]}), iid, 0)
        chain.flood()
        honest.append(chain.submit(KEYS["ta"], lambda n, r=request, e=executor: StartInference(
            chain_id=CHAIN, request=r.raw, executor=e, attempt=0, sequence=n)))
        name = next(n for n in HONEST if PEER[n] == executor)
        honest.append(chain.submit(KEYS[name], lambda n, iid=iid: FinishInference(
            chain_id=CHAIN, inference_id=iid, prompt_tokens=10, completion_tokens=5, response_hash=b"r" * 32,
            artifact_commitment=b"a" * 32, sequence=n)))
        chain.block()
    blocks_until(2 * L - 2)
    for w in HONEST:
        for iid in chain.state.validation_duties(1, PEER[w], chain.seed(w, 1)):
            chain.flood()
            honest.append(chain.submit(KEYS[w], lambda n, iid=iid: Validation(
                chain_id=CHAIN, inference_id=iid, verdict=OK, seed=b"", sequence=n)))
    blocks_until(2 * L + 1)
    chain.flood()
    honest += [chain.submit(KEYS[w], lambda n, w=w: RevealValidationSeed(
        chain_id=CHAIN, epoch=1, seed=chain.seed(w, 1), sequence=n)) for w in HONEST]
    blocks_until(rules.settlement_height(1, chain.state.params))

    assert all(h in chain.receipts and chain.receipts[h].ok for h in honest), [
        (chain.receipts[h].reason, chain.receipts[h].detail) if h in chain.receipts else "never committed"
        for h in honest]
    summary = chain.state.epoch_summary(1)
    assert summary is not None and summary.inferences == 4 and summary.fees_paid > 0
    scores = rules.fair_share_scores({r.peer: r.tokens for r in summary.participants},
                                     {r.peer: r.weight for r in summary.participants})
    for w in HONEST:  # every duty done, nothing forfeited, every executor paid for its (capped) tokens
        row = summary.participant(PEER[w])
        assert row is not None and not row.caught and not row.forfeit and row.forfeited == 0
        assert row.done == row.duties and (row.executor_reward > 0) == (scores[row.peer] > 0)
    assert sum(row.validator_reward for row in summary.participants) > 0
    assert chain.state.burned > 0  # and the spam paid for every transaction it got in


def test_reaping_takes_protocol_transactions_first_and_the_reserved_share_stays_theirs() -> None:
    chain = Chain()
    chain.flood()
    assert len(chain.pool) == UNRESERVED
    for w in HONEST:  # arriving last, into a full pool
        chain.submit(KEYS[w], lambda n, w=w: CommitValidationSeed(
            chain_id=CHAIN, epoch=1, commitment=rules.seed_commitment(1, PEER[w], chain.seed(w, 1)), sequence=n))
    block = chain.pool.reap(chain.state, len(HONEST), 8 * 1024 * 1024)
    kinds = [decode_tx(raw, chain.state.params.max_tx_bytes).message.KIND for raw in block]
    assert kinds == [CommitValidationSeed.KIND] * len(HONEST)


def test_one_account_holds_at_most_its_quota() -> None:
    chain = Chain()
    key = SPAM_KEYS[0]
    for _ in range(POOL.max_per_account):
        chain.submit(key, lambda n: Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=n))
    with pytest.raises(TxRefused) as refused:
        chain.submit(key, lambda n: Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=n))
    assert refused.value.code == "account_quota"


# ---- free Finishes of zero-weight Sybils ---------------------------------------------------
# Protocol-critical kinds are free, "bounded by its duties on the ledger" (``transactions.Payer``):
# but a Finish whose Start has not committed is held, and any funded key joins the registry with
# one RegisterParticipant (weight 0, drawn for nothing). Only an executor a Start can still name
# has its Finish held (``executor_draw.drawable_executors``), and the mempool, which admits
# with the same rule, keeps the rest of its room for paying transactions.

SYBILS = {"s1": SPAM_KEYS[0], "s2": SPAM_KEYS[1]}


def sybil_net(**overrides: Any) -> LedgerDriver:
    """The honest network, and two funded spammers registered as participants (weight 0)."""
    d = LedgerDriver(LedgerState.from_genesis(genesis(**overrides)), {**KEYS, **SYBILS}, "ta", MODEL)
    d.ok(*[d.sign(s, lambda n: RegisterParticipant(chain_id=CHAIN, addrs=[], models=[MODEL], sequence=n))
           for s in SYBILS])
    return d


def junk_finish(d: LedgerDriver, who: str, i: int) -> bytes:
    """A Finish for an inference that does not exist (and never will)."""
    iid = hashlib.sha256(f"junk/{who}/{i}".encode()).digest()
    return d.sign(who, lambda n: FinishInference(chain_id=CHAIN, inference_id=iid, prompt_tokens=0,
                                                 completion_tokens=0, response_hash=b"r" * 32,
                                                 artifact_commitment=b"a" * 32, sequence=n))


def test_a_zero_weight_sybil_cannot_crowd_honest_finishes_out_of_the_holding_area_for_free() -> None:
    """Attack: Sybils commit free Finishes for made-up ids, refreshed every
    ``inference_deadline_blocks`` (with the defaults, 64 of them x 1,024 fill the 65,536
    places). An honest executor whose Finish outruns its Start is then refused
    HOLDING_AREA_FULL, which its submitter does not retry: the inference expires in its hands,
    unpaid, a miss counted. Refused instead: no Start can name a Sybil, and each executor that
    one can holds at most its share of the area (``rules.held_finish_share``)."""
    d = sybil_net(max_held_finishes=8, max_held_finishes_per_executor=4)
    before = {s: d.state.balance(k.peer_id) for s, k in SYBILS.items()}
    for i in range(4):  # (a refused transaction leaves its signer's sequence: one each per block)
        receipts = d.block(*[junk_finish(d, s, i) for s in SYBILS])
        assert {r.reason for r in receipts} == {Reason.EXECUTOR_NOT_ELIGIBLE}
    assert {s: d.state.balance(k.peer_id) for s, k in SYBILS.items()} == before and len(d.state.held) == 0
    req = d.request("alice", "ex1")  # the honest executor finishes before the TA's Start commits
    (honest,) = d.block(d.finish(req, "ex1"))
    assert honest.ok, f"the honest executor's Finish is refused: {honest.reason} ({honest.detail})"


def test_free_finishes_do_not_starve_paying_transactions_out_of_the_mempool() -> None:
    """Attack: duties are bounded only per account here, and reaped first; registered
    zero-weight keys queue free Finishes for made-up ids (with the defaults 50 Sybils x 1,000
    fill the 50,000 places) and an honest client's paying transaction finds the pool full.
    Refused instead: ``check_tx`` holds no Sybil's Finish, and the Finishes that executors a
    Start can name may queue fill at most the pool less ``reserved_ppm``, kept for paying ones."""
    d = sybil_net()
    pool = Mempool(MempoolParams(max_txs=100, max_bytes=1 << 20, max_ahead=1000, reserved_ppm=200_000,
                                 max_per_account=16, max_duties_per_account=64))
    for s in SYBILS:
        with pytest.raises(TxRefused) as refused:
            pool.add(d.state, junk_finish(d, s, 0))
        assert refused.value.code == Reason.EXECUTOR_NOT_ELIGIBLE
    refusals = []
    for who in HONEST:  # each may have its Finish held, so each passes check_tx
        for i in range(30):
            try:
                pool.add(d.state, junk_finish(d, who, i))
            except TxRefused as e:
                refusals.append(e.code)
    assert len(pool) == pool.params.class_txs == 80 and set(refusals) == {"mempool_full"}
    honest = d.sign("alice", lambda n: Transfer(chain_id=CHAIN, to=PEER["ta"], amount=5, sequence=n))
    pool.add(d.state, honest)  # raises TxRefused if the free junk left it no room


# ---- the transaction topic ---------------------------------------------------------------


def tx_gossip(chain: Chain) -> TxGossip:
    return TxGossip(SimpleNamespace(state=chain.state), chain.pool, lambda: None,  # type: ignore[arg-type]
                    publish=None, consensus_idle=asyncio.Event(), params=ReplicaParams(),  # type: ignore[arg-type]
                    metrics=ReplicaMetrics())


def test_the_topic_validator_drops_what_check_tx_refuses_before_forwarding() -> None:
    chain = Chain()
    validate = tx_gossip(chain).validator()
    paid = seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=0), KEYS["alice"])
    unfunded = seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=0), KEYS["stranger"])
    cannot_pay = seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=0), KEYS["broke"])
    assert validate("peer", encode_frame(TxBatch(txs=[paid])))
    assert not validate("peer", encode_frame(TxBatch(txs=[paid, unfunded])))
    assert not validate("peer", encode_frame(TxBatch(txs=[cannot_pay])))


def transfer(who: str, sequence: int, amount: int = 1) -> bytes:
    return seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=amount, sequence=sequence), KEYS[who])


def batch(*txs: bytes) -> bytes:
    return encode_frame(TxBatch(txs=list(txs)))


def test_the_topic_validator_lets_through_what_a_block_committed_meanwhile_beside_a_new_one() -> None:
    """A batch that raced a block holds transactions this node has committed since: harmless,
    and nothing to relay on their own; beside a new one the batch still goes on."""
    chain = Chain()
    validate = tx_gossip(chain).validator()
    raced = transfer("alice", 0)
    chain.pool.add(chain.state, raced)
    chain.block()
    assert validate("peer", batch(raced, transfer("alice", 1)))
    assert not validate("peer", batch(raced))


def test_one_funded_key_cannot_have_many_versions_of_one_transaction_relayed() -> None:
    """One sequence signed with a thousand amounts: each passes ``check_tx`` against committed
    state, but at most one can ever commit, so at most one may travel -- once this node holds
    one, another for the same (signer, sequence) is not relayed, nor two in one batch. Before,
    every version crossed the whole network and cost every node a signature check, for one fee."""
    chain = Chain()
    validate = tx_gossip(chain).validator()
    versions = [transfer("alice", 0, amount) for amount in range(1, 1001)]
    assert not validate("peer", batch(*versions[:2]))
    chain.pool.add(chain.state, versions[0])
    assert not validate("peer", batch(versions[1]))
    assert not validate("peer", batch(transfer("alice", 1), versions[2]))


def test_transactions_this_node_holds_or_committed_are_not_relayed_again_on_their_own() -> None:
    """Re-publishing what every node already holds, or a slice of committed history (valid
    signatures all, an old sequence each), costs the sender one message and every node a
    delivery, a check and a forward: relayed only beside a new transaction. A lagging sender's
    batch (transactions peers committed since, and a new one) still goes on."""
    chain = Chain()
    validate = tx_gossip(chain).validator()
    history = [transfer("alice", n) for n in range(4)]
    for tx in history:
        chain.pool.add(chain.state, tx)
    assert not validate("peer", batch(*history))  # held here
    chain.block()
    assert not validate("peer", batch(*history))  # committed here
    assert validate("peer", batch(*history, transfer("alice", 4)))


def test_a_regossiped_batch_of_held_and_new_transactions_goes_on() -> None:
    """An own transaction no block took is gossiped again beside others peers hold already
    (stop 28): the node that lacks one relays the batch."""
    chain = Chain()
    validate = tx_gossip(chain).validator()
    held, new = transfer("alice", 0), transfer("alice", 1)
    chain.pool.add(chain.state, held)
    assert validate("peer", batch(held, new))


def test_sequences_past_what_the_mempool_queues_are_not_relayed() -> None:
    chain = Chain()
    validate = tx_gossip(chain).validator()
    assert not validate("peer", batch(transfer("alice", POOL.max_ahead + 1)))
    assert validate("peer", batch(transfer("alice", POOL.max_ahead)))


async def test_an_own_transaction_no_block_takes_is_gossiped_again_at_doubling_waits() -> None:
    """Every peer's topic validator refused the batch (none had applied the block opening the
    transaction's phase), so none holds it: a sender that proposes no blocks would hold it alone
    until the phase closed (a joiner's proof-of-compute secret, stop 28). The sender gossips it
    again after 2 blocks, then 4, 8, ..., and stops once a block takes it."""
    chain = Chain()
    published: list[list[bytes]] = []

    async def publish(topic: str, data: bytes) -> None:
        published.append(decode_frame(data, TxBatch).txs)

    idle = asyncio.Event()
    idle.set()
    gossip = TxGossip(SimpleNamespace(state=chain.state), chain.pool, lambda: None, publish,  # type: ignore[arg-type]
                      idle, ReplicaParams(tx_flush_s=0.0), ReplicaMetrics())
    flushing = asyncio.create_task(gossip.flush())

    async def flushed() -> None:  # no I/O on this path: a few turns of the loop publish what is due
        for _ in range(5):
            await asyncio.sleep(0)

    async def block(take: bool = False) -> int:
        """Commit a block; how many batches went out after it."""
        before = len(published)
        chain.block(take)
        gossip.on_commit(chain.state)
        await flushed()
        return len(published) - before

    try:
        tx = seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=0), KEYS["alice"])
        gossip.submit(tx)
        await flushed()
        assert len(published) == 1
        again = [await block() for _ in range(14)]
        assert again == [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]  # after 2, then 4, then 8 blocks
        assert all(batch == [tx] for batch in published)
        assert await block(take=True) == 0 and digest(tx) in chain.receipts
        assert [await block() for _ in range(16)] == [0] * 16  # taken: never again
    finally:
        flushing.cancel()


# ---- the submitter -----------------------------------------------------------------------


class FlakyReplica:
    """A replica whose mempool refuses the first ``refusals`` submissions as full."""

    chain_id = CHAIN

    def __init__(self, refusals: int, code: str = "mempool_full") -> None:
        self.refusals = refusals
        self.code = code
        self.submitted: list[bytes] = []

    def next_sequence(self, account: str) -> int:
        return len(self.submitted)

    def submit(self, raw: bytes) -> bytes:
        if self.refusals:
            self.refusals -= 1
            raise TxRefused(self.code, "refused")
        self.submitted.append(raw)
        return raw[-32:]

    async def wait_for_commit(self, tx_hash: bytes, timeout: float | None = None) -> Committed:
        return Committed(1, Receipt(tx_hash, Reason.OK))


async def follow(replica: FlakyReplica | Any, **retry: float) -> list[bool]:
    hooks = LedgerHooks(replica, KEYS["v1"], retry_first_s=0.001, retry_max_s=0.004, **retry)  # type: ignore[arg-type]
    fates: list[bool] = []
    done = asyncio.Event()

    def record(committed: bool) -> None:
        fates.append(committed)
        done.set()

    runner = asyncio.create_task(hooks.run())
    hooks.follow(lambda n: seal(Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=n), KEYS["v1"]),
                 "transfer", record)
    await asyncio.wait_for(done.wait(), 5)
    runner.cancel()
    return fates


async def test_a_refused_submission_is_retried_until_it_commits() -> None:
    replica = FlakyReplica(refusals=5)
    assert await follow(replica) == [True]
    assert len(replica.submitted) == 1


async def test_a_submission_that_cannot_succeed_gives_up_at_once_and_says_so() -> None:
    replica = FlakyReplica(refusals=1_000, code=Reason.INFERENCE_CLOSED.value)
    assert await follow(replica) == [False]
    assert replica.refusals == 999


async def test_retries_end_at_their_deadline() -> None:
    replica = FlakyReplica(refusals=1_000_000)
    assert await follow(replica, retry_for_s=0.05) == [False]


class DroppingReplica(FlakyReplica):
    """Admits, then drops the first transaction from its pool as a block took its sequence."""

    async def wait_for_commit(self, tx_hash: bytes, timeout: float | None = None) -> Committed:
        if len(self.submitted) == 1:
            raise TxDropped(tx_hash, TxRefused(Reason.BAD_SEQUENCE.value, "an earlier one failed"))
        return Committed(1, Receipt(tx_hash, Reason.OK))


async def test_a_dropped_submission_is_signed_again_and_followed_to_its_block() -> None:
    replica = DroppingReplica(refusals=0)
    assert await follow(replica) == [True]
    assert len(replica.submitted) == 2


# ---- the validator's duties ---------------------------------------------------------------


class Follower:
    """The validator's transaction follower: records each submission and its fate callback."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Callable[[bool], object]]] = []

    def follow(self, build: Callable[[int], bytes], what: str, done: Callable[[bool], object]) -> None:
        self.sent.append((what, done))


async def test_a_duty_counts_as_done_only_once_its_transaction_commits() -> None:
    follower = Follower()
    actor = ValidatorActor(None, KEYS["v1"], {}, None, CHAIN, follower)  # type: ignore[arg-type]
    chain = Chain()
    chain.block()  # height 1: epoch 0, when seeds for epoch 1 are committed
    actor.on_commit(chain.state)
    await actor.step()
    (what, done), = follower.sent  # the seed commitment for epoch 1
    await actor.step()
    assert len(follower.sent) == 1  # in flight: not sent twice
    done(False)  # refused to the end, or rejected: the duty is still to do
    await actor.step()
    assert len(follower.sent) == 2 and follower.sent[1][0] == what
    follower.sent[1][1](True)
    await actor.step()
    assert len(follower.sent) == 2


def test_a_newcomer_evicts_the_heaviest_account_of_a_full_pool_and_the_eviction_is_reported() -> None:
    chain = Chain()
    chain.flood()  # the spammers hold the whole paying share, evicting each other down to a fair share
    assert {refusal.code for _, refusal in chain.pool.update(chain.state, [])} == {"evicted"}
    tx = chain.submit(KEYS["alice"], lambda n: Transfer(chain_id=CHAIN, to=PEER["ta"], amount=1, sequence=n))
    assert tx in chain.pool and len(chain.pool) == UNRESERVED
    (evicted_hash, refusal), = chain.pool.update(chain.state, [])  # reported by the next update, once
    assert refusal.code == "evicted" and evicted_hash not in chain.pool
    assert chain.pool.update(chain.state, []) == []
