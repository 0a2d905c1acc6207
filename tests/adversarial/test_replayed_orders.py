"""Attack class: unpaid work. Signed client requests are public once their ``StartInference``
is in a block, so anyone could wrap one in an order of its own and fill an executor's slots;
and a TA's replay memory used to die with the TA. Now an executor runs only a fresh request
of its own network, ordered by a registered participant, not started on the committed ledger
nor already run here, and only if the ledger's draw would pay this executor for it -- each
refusal with its own code, before any compute -- and a TA that
restarts still refuses what the ledger remembers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from helpers import MODEL

from gonka_p2p.actors.admission import Rejected
from gonka_p2p.actors.artifact_store import ArtifactStore
from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.executor import ExecutorActor
from gonka_p2p.actors.transfer_agent import TERMINAL_REFUSALS, TransferAgent
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine, TokenStep
from gonka_p2p.ledger.block import Block
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.rules import choose_executor
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.transactions import Reason, StartInference
from gonka_p2p.ledger.executor_draw import executor_weights
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import (
    NONCE_BYTES,
    ChatTurn,
    ExecuteOrder,
    InferenceFailed,
    InferenceFinished,
    InferenceRequest,
    inference_id,
)
from gonka_p2p.wire.protocols import EXECUTE_PROTOCOL

CHAIN = "gonka-orders"
CLIENT, TA, EX, RIVAL, OUTSIDER = (Keypair.from_seed(n) for n in (b"client", b"ta", b"ex", b"rival", b"outsider"))
REFUSALS = ("stale", "wrong_chain", "unknown_ta", "replay")


class CountingEngine:
    """The real engine, counting the generations it was asked for (compute spent)."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner
        self.runs = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def generate(self, *args: object, **kwargs: object) -> AsyncIterator[TokenStep]:
        self.runs += 1
        return self._inner.generate(*args, **kwargs)  # type: ignore[arg-type]


def ledger(now_ms: int, rival_weight: int = 0) -> LedgerState:
    """TA and EX are participants; a rival executor holds ``rival_weight`` (none at 0)."""
    rival = (GenesisParticipant(RIVAL.public_key, rival_weight, models=(MODEL,)),) if rival_weight else ()
    return LedgerState.from_genesis(Genesis(
        chain_id=CHAIN, genesis_time_ms=now_ms - 1000, params=Params(price_per_token={MODEL: 1}),
        participants=(GenesisParticipant(TA.public_key, 10),
                      GenesisParticipant(EX.public_key, 10, models=(MODEL,)), *rival),
        allocations={CLIENT.peer_id: 10**6}))


def request(chain: str = CHAIN, age_ms: int = 0, nonce: bytes = b"n" * NONCE_BYTES) -> bytes:
    return seal(InferenceRequest(
        chain_id=chain, model=MODEL, messages=[ChatTurn(role="user", content="hi")], max_tokens=3,
        temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5,
        timestamp_ms=int(time.time() * 1000) - age_ms, nonce=nonce), CLIENT)


def started_on(state: LedgerState, raw: bytes) -> None:
    """Commit the TA's StartInference of ``raw`` into ``state``."""
    tx = seal(StartInference(chain_id=CHAIN, request=raw, executor=EX.peer_id, attempt=0, sequence=0), TA)
    _, (receipt,) = apply_block(state, Block(state.height + 1, state.last_block_hash, TA.peer_id,
                                             int(time.time() * 1000), [tx]))  # type: ignore[arg-type]
    assert receipt.reason == Reason.OK, receipt.detail


async def served(hub: MemoryHub, executor: MemoryService, orderer: Keypair, raw: bytes) -> list[bytes]:
    """The frames the executor answers to ``orderer``'s order for the request ``raw``."""
    service = hub.service(orderer)
    await service.start()
    peer = await service.connect(executor.listen_addrs[0])
    order = seal(ExecuteOrder(request=raw), orderer)
    frames = [f async for f in service.open_stream(peer, EXECUTE_PROTOCOL, order)]
    await service.stop()
    return frames


@asynccontextmanager
async def executor_node(hub: MemoryHub, engine: CountingEngine, state: LedgerState
                        ) -> AsyncIterator[MemoryService]:
    """EX's executor actor over the committed ``state``, on its own service."""
    service, store = hub.service(EX), ArtifactStore(None, 1 << 30)
    await service.start()
    await store.open()
    actor = ExecutorActor(service, EX, {MODEL: engine}, store, chain_id=CHAIN)  # type: ignore[dict-item]
    actor.on_commit(state)
    actor.start()
    try:
        yield service
    finally:
        await service.stop()
        await store.close()


async def test_an_order_is_run_once_however_often_it_is_sent(engine: Engine) -> None:
    hub, counting = MemoryHub(), CountingEngine(engine)
    raw = request()
    async with executor_node(hub, counting, ledger(int(time.time() * 1000))) as service:
        first = await served(hub, service, TA, raw)
        again = await served(hub, service, TA, raw)
    assert isinstance(open_envelope(first[-1]).message, InferenceFinished)
    assert [open_envelope(f, InferenceFailed).message.code for f in again] == ["replay"]
    assert counting.runs == 1


@pytest.mark.parametrize("attack", REFUSALS)
async def test_an_executor_refuses_unpaid_work_before_any_compute(engine: Engine, attack: str) -> None:
    hub, counting = MemoryHub(), CountingEngine(engine)
    state = ledger(int(time.time() * 1000))
    raw, orderer = request(), TA
    if attack == "stale":
        raw = request(age_ms=state.params.request_window_ms + 60_000)
    elif attack == "wrong_chain":
        raw = request(chain="gonka-elsewhere")
    elif attack == "unknown_ta":
        orderer = OUTSIDER  # read the request from a block, signed an order of its own
    elif attack == "replay":
        started_on(state, raw)  # the request is public: its StartInference committed
    async with executor_node(hub, counting, state) as service:
        (frame,) = await served(hub, service, orderer, raw)
    assert open_envelope(frame, InferenceFailed).message.code == attack
    assert counting.runs == 0


async def test_an_executor_refuses_an_order_the_ledger_would_not_pay_it_for(engine: Engine) -> None:
    hub, counting = MemoryHub(), CountingEngine(engine)
    state = ledger(int(time.time() * 1000), rival_weight=10**6)
    weights, attempts = executor_weights(state, MODEL), range(state.params.max_executor_attempts)

    def drawn(raw: bytes) -> set[str]:
        iid = inference_id(open_envelope(raw, InferenceRequest))
        return {choose_executor(weights, frozenset({TA.peer_id}), iid, a) for a in attempts}

    # A request the ledger's draw gives the rival at every attempt: a TA ordering EX anyway
    # could never start it on the ledger, so EX would work for nothing.
    raw = next(r for r in (request(nonce=n.to_bytes(NONCE_BYTES, "big")) for n in range(100))
               if EX.peer_id not in drawn(r))
    async with executor_node(hub, counting, state) as service:
        (frame,) = await served(hub, service, TA, raw)
    assert open_envelope(frame, InferenceFailed).message.code == "not_drawn"
    assert counting.runs == 0


def test_a_transfer_agent_passes_these_refusals_to_the_client_without_redrawing() -> None:
    # They are about the request or its TA, so every other executor would refuse them too.
    assert set(REFUSALS) <= TERMINAL_REFUSALS


async def test_a_restarted_transfer_agent_refuses_what_the_ledger_remembers() -> None:
    state = ledger(int(time.time() * 1000))
    raw = request()
    started_on(state, raw)  # admitted and started before the TA restarted
    hub = MemoryHub()
    service = hub.service(TA)
    await service.start()
    fresh = TransferAgent(service, TA, PeerDirectory(service, TA, [], 1, None), chain_id=CHAIN)
    fresh.on_commit(state)
    with pytest.raises(Rejected) as refused:
        await fresh.admit(raw)
    assert refused.value.code == "replay"
    await service.stop()
