"""Actors and their tasks: no live ledger state across an await, every crash reported and
handled, and the memory an actor keeps bounded however long the node runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import eventually

from gonka_p2p.actors.node import Node
from gonka_p2p.actors.replica import ReplicaParams
from gonka_p2p.actors.supervisor import Supervised, Supervisor
from gonka_p2p.actors.evidence_fetch import RETRY_AFTER_BLOCKS, Unreachable
from gonka_p2p.actors.validator import ACCUSE_MARGIN_BLOCKS, GIVE_UP_BEFORE_BLOCKS, ValidatorActor
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.verification_params import VerificationParams
from gonka_p2p.ledger.block import Block
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.records import Dispute, Inference, InferenceStatus, SeedCommitment
from gonka_p2p.ledger.rules import settlement_height, validation_deadline
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    RevealValidationSeed,
    Transfer,
    Validation,
    VerdictStats,
    withheld_verdict,
)
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.schema import Message

KEYS = [Keypair.from_seed(f"actor-tasks-{i}".encode()) for i in range(3)]
ME, TA, EXECUTOR = KEYS
GENESIS = devnet_genesis([k.public_key for k in KEYS], [], epoch_length_blocks=10,
                         validation_window_blocks=4, dispute_voting_blocks=2)
TX_KINDS = (CommitValidationSeed, RevealValidationSeed, Validation, DisputeVote)


class Outbox:
    """The validator's transaction follower, recording what it would submit."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def follow(self, build: Callable[[int], bytes], what: str, done: Callable[[bool], object]) -> None:
        self.sent.append(open_envelope(build(len(self.sent)), *TX_KINDS).message)

    def checks(self) -> list[VerdictStats]:
        return [tx.verdict for tx in self.sent if isinstance(tx, Validation)]

    def votes(self) -> set[bytes]:
        return {tx.inference_id for tx in self.sent if isinstance(tx, DisputeVote)}


def next_block(state: LedgerState) -> None:
    apply_block(state, Block(height=state.height + 1, prev_hash=state.last_block_hash,
                             proposer=ME.peer_id, time_ms=0, txs=[]))


def settled_inference(state: LedgerState, n: int) -> bytes:
    """An inference settled at this height (written straight into the state)."""
    iid = bytes([n]) * 32
    state.close_inference(iid, Inference(
        client="client", ta=TA.peer_id, executor=EXECUTOR.peer_id, model="m", price=1, max_tokens=1,
        prompt_bound=1, escrow=1, request_ms=0, start_height=state.height, deadline=state.height + 5,
        status=InferenceStatus.SETTLED, closed_height=state.height))
    return iid


def open_dispute_on_me(state: LedgerState, n: int) -> bytes:
    """What a block holding a failed Validation does: a settled inference, disputed, with this
    validator on the committee (written straight into the state, as apply_block would)."""
    iid = settled_inference(state, n)
    state.open_dispute(iid, Dispute(epoch=0, executor=EXECUTOR.peer_id, ta=TA.peer_id, accuser=TA.peer_id,
                                    opened_height=state.height, draw_height=state.height,
                                    deadline=state.height + 5, committee=(ME.peer_id,), seats=(1,),
                                    members=(ME.peer_id,)))
    return iid


def validator_of(outbox: Outbox, genesis: Genesis = GENESIS) -> ValidatorActor:
    return ValidatorActor(MemoryHub().service(ME), ME, {}, VerificationParams(models={}),
                          genesis.chain_id, outbox)


@pytest.mark.parametrize("block", ["opens a dispute", "prunes the disputes"])
async def test_a_block_applied_while_the_validator_judges_does_not_crash_it(block: str) -> None:
    state = LedgerState.from_genesis(GENESIS)
    next_block(state)
    first, second = open_dispute_on_me(state, 1), open_dispute_on_me(state, 2)
    outbox = Outbox()
    validator = validator_of(outbox)
    judging, release = asyncio.Event(), asyncio.Event()
    judged: list[bytes] = []

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        judging.set()
        await release.wait()  # the fetch and the re-run: blocks commit meanwhile
        judged.append(inference_id)
        return withheld_verdict()

    validator.judge = judge  # type: ignore[method-assign,assignment]
    runner = asyncio.create_task(validator.run())
    validator.on_commit(state)
    await judging.wait()
    if block == "opens a dispute":
        third = open_dispute_on_me(state, 3)
        expected = {first, second, third}
    else:
        state.prune_epochs_before(1)
        expected = set()  # both were being judged; the ledger takes no vote on a pruned dispute
    validator.on_commit(state)  # the replica calls its listeners after the block
    release.set()
    try:
        await eventually(lambda: len(judged) == len(expected | {first, second}) or runner.done(), what="the checks")
        assert not runner.done(), runner.exception()
        assert outbox.votes() == expected
    finally:
        runner.cancel()


async def test_the_validator_forgets_each_epoch_once_it_has_settled() -> None:
    state = LedgerState.from_genesis(GENESIS)
    outbox = Outbox()
    validator = validator_of(outbox)
    epochs = 30
    remembered = []
    for _ in range(epochs * GENESIS.params.epoch_length_blocks):
        next_block(state)
        validator.on_commit(state)
        await validator.step()
        remembered.append(len(validator.remembered_epochs()))
    commits = [tx.epoch for tx in outbox.sent if isinstance(tx, CommitValidationSeed)]
    assert commits == list(range(1, epochs + 1))  # it still commits once per epoch
    assert max(remembered) <= 3  # the epoch before, this one and the next


async def test_a_restarted_validator_does_not_rejudge_an_epoch_whose_seed_it_revealed() -> None:
    """A reveal closes the epoch's duties on the ledger (its checks are refused after it), but a
    validator restarted after its reveal had forgotten what it sent, judged every duty of the
    epoch again -- fetches and a re-run each -- and had each refused (testnet run 10: 189
    refusals by one restarted participant)."""
    state = LedgerState.from_genesis(GENESIS)
    for _ in range(GENESIS.params.epoch_length_blocks + 1):
        next_block(state)
    epoch = state.epoch
    duty = settled_inference(state, 1)
    state.add_commitment(epoch, ME.peer_id, SeedCommitment(
        commitment=b"c", height=1, seed=b"s", revealed_height=state.height))
    state.validation_duties = lambda e, validator, seed: [duty] if e == epoch else []  # type: ignore[method-assign]
    judged: list[bytes] = []

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        judged.append(inference_id)
        return withheld_verdict()

    outbox = Outbox()
    validator = validator_of(outbox)  # a fresh actor: what a restart starts with
    validator.judge = judge  # type: ignore[method-assign,assignment]
    validator.on_commit(state)
    await validator.step()
    assert judged == []
    assert not [tx for tx in outbox.sent if isinstance(tx, Validation)]


WIDE = devnet_genesis([k.public_key for k in KEYS], [], epoch_length_blocks=40,
                      validation_window_blocks=20, dispute_voting_blocks=2)


async def test_evidence_no_holder_could_be_reached_for_is_unreachable_not_withheld() -> None:
    """A holder that answers without the evidence withholds it; one the network cannot reach
    (down, partitioned, behind lossy links) has not answered at all."""
    validator = ValidatorActor(MemoryHub().service(ME), ME, {}, VerificationParams(models={}), WIDE.chain_id, None)
    validator.on_commit(LedgerState.from_genesis(WIDE))
    gone = Keypair.from_seed(b"actor-tasks-gone").peer_id
    record = SimpleNamespace(executor=gone, ta=gone, artifact_commitment=b"", response_hash=b"")
    async with validator._evidence.fetch(b"\x07" * 32, record) as fetched:  # type: ignore[arg-type]
        assert isinstance(fetched, Unreachable) and fetched.holders == (gone,)


def epoch_with_duties(n: int) -> tuple[LedgerState, int, list[bytes]]:
    """A state in epoch 1, whose ``n`` settled inferences are all this validator's duties and
    stay so however many blocks are applied (their records are kept out of those blocks)."""
    state = LedgerState.from_genesis(WIDE)
    for _ in range(WIDE.params.epoch_length_blocks + 1):
        next_block(state)
    epoch = state.epoch
    probe = LedgerState.from_genesis(WIDE)
    next_block(probe)
    duties = [settled_inference(probe, i + 1) for i in range(n)]
    records = {iid: probe.inference(iid) for iid in duties}
    state.inference = records.get  # type: ignore[method-assign,assignment]
    state.add_commitment(epoch, ME.peer_id, SeedCommitment(commitment=b"c", height=1))
    state.validation_duties = lambda e, validator, seed: list(duties) if e == epoch else []  # type: ignore
    return state, epoch, duties


@pytest.mark.parametrize("reachable_again", [True, False])
async def test_a_validator_that_cannot_reach_the_evidence_asks_again_and_accuses_only_at_the_deadline(
        reachable_again: bool) -> None:
    """Testnet run 11: a validator that could not reach an executor under packet loss accused it
    of withholding at its first try; the committee, later, got the evidence, and the honest
    validator was penalised for an overturned accusation. Now it asks again every
    RETRY_AFTER_BLOCKS while the check's window stays open, and a withheld verdict is
    submitted only within ACCUSE_MARGIN_BLOCKS of the deadline."""
    state, epoch, _ = epoch_with_duties(1)
    asked: list[int] = []
    served = VerdictStats(valid=True, suspicious=False, failure_flags=0, n_tokens=16, mean_distance_nano=0,
                          max_distance_nano=0, top_k_misses=0, sampling_mismatches=0)

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        asked.append(state.height)
        assert give_up_at == validation_deadline(epoch, state.params) - GIVE_UP_BEFORE_BLOCKS
        if reachable_again and len(asked) == 3:
            return served
        return Unreachable((EXECUTOR.peer_id,))

    outbox = Outbox()
    validator = validator_of(outbox, WIDE)
    validator.judge = judge  # type: ignore[method-assign,assignment]
    deadline = validation_deadline(epoch, state.params)
    while state.height < deadline and not outbox.checks():
        validator.on_commit(state)
        await validator.step()
        next_block(state)
    assert asked[1] - asked[0] == RETRY_AFTER_BLOCKS
    if reachable_again:
        assert outbox.checks() == [served] and len(asked) == 3
    else:
        assert outbox.checks() == [withheld_verdict()]
        assert deadline - ACCUSE_MARGIN_BLOCKS <= asked[-1] < deadline


async def test_a_validator_whose_own_links_failed_it_accuses_no_one_and_skips_the_check() -> None:
    """Testnet runs 24, 25: a validator whose link was capped through most of a check's window
    accused the honest holders it could not reach. Evidence unreachable while its own links are
    suspect (``Unreachable.witnessed`` false: its replica lagged) is asked again up to the
    deadline and never judged withheld: the skipped duty is the validator's own loss."""
    state, epoch, _ = epoch_with_duties(1)
    asked: list[int] = []

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        asked.append(state.height)
        return Unreachable((EXECUTOR.peer_id,), witnessed=False)

    outbox = Outbox()
    validator = validator_of(outbox, WIDE)
    validator.judge = judge  # type: ignore[method-assign,assignment]
    deadline = validation_deadline(epoch, state.params)
    while state.height <= deadline:
        validator.on_commit(state)
        await validator.step()
        next_block(state)
    assert outbox.checks() == []
    assert asked[-1] >= deadline - ACCUSE_MARGIN_BLOCKS  # asked to the end


async def test_a_validator_reveals_only_after_it_has_sent_every_check_of_the_epoch() -> None:
    """The reveal closes an epoch's duties, and the ledger counts every duty not checked by then
    as skipped: the validator forfeits its epoch reward. A duty whose evidence was unreachable
    when the epoch ended was waiting to be asked again, and the validator revealed at the first
    block after the end anyway -- so a partition at an epoch's end cost an honest validator its
    reward. Now it reveals once every duty of the epoch is sent, or when the checks have closed."""
    state, epoch, _ = epoch_with_duties(1)
    while state.epoch == epoch:  # the evidence is out of reach from the epoch's last blocks on
        next_block(state)

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        return Unreachable((EXECUTOR.peer_id,))

    outbox = Outbox()
    validator = validator_of(outbox, WIDE)
    validator.judge = judge  # type: ignore[method-assign,assignment]
    while state.height < settlement_height(epoch, state.params):
        validator.on_commit(state)
        await validator.step()
        next_block(state)
    kinds = [type(tx) for tx in outbox.sent if not isinstance(tx, CommitValidationSeed)]
    assert kinds == [Validation, RevealValidationSeed]  # the accusation, at its deadline; then the claim


async def test_a_check_whose_evidence_does_not_come_holds_up_no_other_check() -> None:
    """A holder that never answers costs a fetch its whole timeout (30 s), and a lying executor
    chooses to. The checks ran one at a time, so every other duty of the validator waited
    behind the silent one, again at each retry: honest duties could miss their deadline (a
    skipped duty forfeits the validator's epoch reward) while the silent executor's own
    accusation margin passed unreached. Now the checks of a block run side by side."""
    state, _, (silent, _) = epoch_with_duties(2)
    never = asyncio.Event()

    async def judge(inference_id: bytes, record: Inference, give_up_at: int | None = None) -> object:
        if inference_id == silent:
            await never.wait()  # the fetch's timeout, as long as the test
        return withheld_verdict()

    outbox = Outbox()
    validator = validator_of(outbox, WIDE)
    validator.judge = judge  # type: ignore[method-assign,assignment]
    runner = asyncio.create_task(validator.run())
    validator.on_commit(state)
    try:
        await eventually(lambda: outbox.checks() or runner.done(), what="the other duty's check")
        assert not runner.done(), runner.exception()
    finally:
        runner.cancel()


# ---- a node's supervised actors ---------------------------------------------------------

NODE = Keypair.from_seed(b"actor-tasks-node")
NODE_GENESIS = devnet_genesis([NODE.public_key], [NODE.peer_id], epoch_length_blocks=1000)
QUICK = ReplicaParams(tx_flush_s=0.01, empty_block_interval_s=0.1)


async def crash_the_follower(node: Node) -> None:
    """A follow-up whose completion callback raises: a bug in a caller of ``follow``."""
    def bug(committed: bool) -> None:
        raise RuntimeError("a bug in a follow-up")

    assert node.hooks is not None
    node.hooks.follow(transfer(node), "transfer", done=bug)


async def crash_the_validator(node: Node) -> None:
    """The validator's first step raises: a bug in a check."""
    validator = node.validator
    assert validator is not None
    step = validator.step

    async def bug() -> None:
        validator.step = step  # type: ignore[method-assign]
        raise RuntimeError("a bug in a check")

    validator.step = bug  # type: ignore[method-assign]


def transfer(node: Node) -> Callable[[int], bytes]:
    return lambda sequence: seal(Transfer(chain_id=NODE_GENESIS.chain_id, to=KEYS[0].peer_id, amount=1,
                                          sequence=sequence), node.key)


@pytest.mark.parametrize("actor, crash", [("transaction follower", crash_the_follower),
                                          ("validator", crash_the_validator)])
async def test_a_crashed_actor_is_reported_and_restarted_while_the_ledger_runs(
        tmp_path: Path, actor: str, crash: Callable[[Node], Awaitable[None]]) -> None:
    node = Node(NodeConfig(models=[], data_dir=tmp_path, announce_interval=0.5), NODE,
                MemoryHub().service(NODE), None, NODE_GENESIS, QUICK)
    node.supervisor.restart_delay_s = 0.05
    await node.join()
    replica, hooks = node.replica, node.hooks
    assert replica is not None and hooks is not None
    await crash(node)  # armed before the actors start: whatever they do next is after a restart
    stop = asyncio.Event()
    serving = asyncio.create_task(node.serve(stop))
    try:
        await eventually(lambda: len(node.supervisor.crashes) == 1, what=f"the {actor}'s crash")
        crashed = node.supervisor.crashes[0]
        assert crashed.actor == actor and crashed.restarted
        assert "a bug in" in repr(crashed.error)
        height = replica.height
        await eventually(lambda: replica.height > height, what="a block after the crash")
        # Restarted, each works: the follower sees a transaction to its block, the validator
        # commits its seed for the next epoch.
        followed = asyncio.Event()
        hooks.follow(transfer(node), "transfer", done=lambda committed: followed.set())
        await asyncio.wait_for(followed.wait(), 10)
        await eventually(lambda: replica.state.commitment(1, NODE.peer_id) is not None,
                         what="the validator's seed commitment")
        assert not serving.done() and len(node.supervisor.crashes) == 1
    finally:
        stop.set()
        await serving
        await node.close()


async def test_a_critical_actor_stops_the_node_with_its_error_and_the_others_with_it() -> None:
    supervisor = Supervisor(restart_delay_s=0.01)
    cancelled = asyncio.Event()

    async def ledger() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the ledger broke")

    async def announcer() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()

    with pytest.raises(ExceptionGroup) as raised:
        await supervisor.run([Supervised("ledger replica", ledger, critical=True),
                              Supervised("announcer", announcer, critical=False)], asyncio.Event())
    assert raised.group_contains(RuntimeError, match="the ledger broke")
    assert cancelled.is_set()
    assert [(c.actor, c.restarted) for c in supervisor.crashes] == [("ledger replica", False)]


async def test_a_restarted_actor_runs_again_after_each_crash() -> None:
    supervisor = Supervisor(restart_delay_s=0.01)
    runs = 0
    stop = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"crash {runs}")
        stop.set()
        await asyncio.sleep(60)

    await supervisor.run([Supervised("validator", flaky, critical=False)], stop)
    assert runs == 3
    assert [str(c.error) for c in supervisor.crashes] == ["crash 1", "crash 2"]
