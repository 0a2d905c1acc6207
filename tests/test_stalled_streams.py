"""Streams never hang (issue 14; Gonka's issue #1798: stalled streams hang forever).

An executor that starts a stream and then goes silent -- frozen with SIGSTOP, or withholding
tokens on purpose -- keeps its connection open, so nothing but a clock ends the wait. Here
the executor is the real tiny model behind :class:`StallingEngine`, which stops after a
given number of tokens and holds. The TA must cancel that stream after its ``stall_timeout``
and tell the client ``executor_stalled`` (and count it); the OpenAI gateway must end the
answer with that error instead of holding the HTTP connection; the client library must not
hang on a silent TA either (:class:`StreamStalled`, its own idle timeout); and the ledger
must refund the client in full when the stalled inference's deadline passes, since it was
started and never finished. Over the in-memory hub and over real libp2p on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
from helpers import (
    MODEL,
    ServiceFactory,
    StallingEngine,
    eventually,
    libp2p_service,
    memory_services,
    serving,
    ta_and_executor,
)

from gonka_p2p.actors.node import Node
from gonka_p2p.client import GonkaClient, StreamStalled, build_request
from gonka_p2p.config import ConfigError, NodeConfig, load_config
from gonka_p2p.gossip.service import SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.openai.auth import GonkaAuth
from gonka_p2p.openai.gateway import Gateway
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import InferenceRequest, InferenceStarted, inference_id
from gonka_p2p.wire.protocols import INFER_PROTOCOL
from gonka_p2p.wire.stream import GonkaError, RequestRejected, StartedEvent, TokensEvent

STALL_S = 0.5  # the TA's stall_timeout in these tests
GUARD_S = 30.0  # far below what a hung stream would take, far above a stall being reported
STALL_KEYS = [Keypair.from_seed(f"stall-node-{i}".encode()) for i in range(2)]  # a TA only, an executor
CLIENT = Keypair.from_seed(b"stalled-client")


def stalled_network(make_service: ServiceFactory, engine: StallingEngine, genesis: Genesis | None = None,
                    tmp_path: Path | None = None) -> AbstractAsyncContextManager[list[Node]]:
    """A TA-only node (``stall_timeout`` = STALL_S) and one executor serving ``engine``."""
    return ta_and_executor(make_service, engine, STALL_KEYS, stall_timeout=STALL_S, genesis=genesis,
                           data_dir=tmp_path)


async def stream_until_error(client: GonkaClient, request: bytes) -> tuple[GonkaError, int]:
    """Stream ``request``; the error that ended it (within GUARD_S) and the tokens seen before."""
    tokens = 0
    async with asyncio.timeout(GUARD_S):
        with pytest.raises(GonkaError) as err:
            async for event in client.stream_request(request):
                if isinstance(event, TokensEvent):
                    tokens += len(event.token_ids)
    return err.value, tokens


def stall_request(chain_id: str) -> bytes:
    return build_request(CLIENT, [("user", "Count to twenty.")], chain_id, model=MODEL, max_tokens=40)


# --- the TA cancels and reports a stalled executor -------------------------------------------


@pytest.mark.parametrize("after", [0, 2], ids=["before-the-first-token", "mid-answer"])
async def test_the_ta_cancels_a_stalled_executor_and_tells_the_client(engine: Engine, after: int) -> None:
    stalling = StallingEngine(engine, after)
    async with stalled_network(memory_services(), stalling) as nodes:
        ta = nodes[0]
        client = await client_of(ta)
        error, tokens = await stream_until_error(client, stall_request(ta.ta.chain_id))
        assert isinstance(error, RequestRejected) and error.code == "executor_stalled"
        assert f"no token for {STALL_S:g} s" in str(error) and nodes[1].key.peer_id in str(error)
        assert tokens == after
        assert ta.ta.stalled == 1
        await asyncio.wait_for(stalling.abandoned.wait(), GUARD_S)  # the executor's stream was reset
        assert not ta.directory.is_live(nodes[1].key.peer_id)  # not drawn again until it announces


async def client_of(ta: Node) -> GonkaClient:
    service = ta.service._hub.service(CLIENT)  # type: ignore[attr-defined]
    await service.start()
    return GonkaClient(CLIENT, service, await service.connect(ta.service.listen_addrs[0]))


@pytest.mark.slow
@pytest.mark.libp2p
async def test_a_stalled_executor_over_libp2p_is_cancelled_and_reported(engine: Engine) -> None:
    async with stalled_network(libp2p_service, StallingEngine(engine, 2)) as nodes:
        ta = nodes[0]
        async with await GonkaClient.connect(ta.service.listen_addrs[0], CLIENT) as client:
            error, tokens = await stream_until_error(client, stall_request(ta.ta.chain_id))
        assert isinstance(error, RequestRejected) and error.code == "executor_stalled", error
        assert tokens == 2 and ta.ta.stalled == 1


async def test_a_stall_is_refunded_in_full_once_its_deadline_passes(engine: Engine, tmp_path: Path) -> None:
    """The Start is on the ledger, the Finish never comes: at the deadline the escrow goes back to
    the client, who is out of pocket only the Start's fee (as for any started inference)."""
    keys = [Keypair.from_seed(f"stall-node-{i}".encode()) for i in range(2)]
    genesis = devnet_genesis([k.public_key for k in keys], [CLIENT.peer_id], models=(MODEL,),
                             inference_deadline_blocks=3)
    async with stalled_network(memory_services(), StallingEngine(engine, 2), genesis, tmp_path) as nodes:
        client = await client_of(nodes[0])
        before = (await client.balance()).balance
        request = stall_request(genesis.chain_id)
        error, _ = await stream_until_error(client, request)
        assert error.code == "executor_stalled"
        iid = inference_id(open_envelope(request, InferenceRequest))
        record = await eventually(lambda: client.inference(iid), GUARD_S, "the stalled inference to expire",
                                  until=lambda r: r.status == "expired", interval=0.05)
        assert record.cost == 0 and record.executor == nodes[1].key.peer_id
        assert (await client.balance()).balance == before - genesis.params.tx_fee


# --- the gateway ends the answer instead of holding the connection ---------------------------


@asynccontextmanager
async def openai_sdk(ta: Node) -> AsyncIterator[openai.AsyncOpenAI]:
    async with serving(Gateway(ta.ta, ta.directory)) as url:
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                                      http_client=httpx.AsyncClient(auth=GonkaAuth(CLIENT))) as sdk:
            yield sdk


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 40,
        "temperature": 0}  # greedy: a sampled answer could end before the stall


async def test_the_gateway_ends_a_stalled_stream_with_an_error_event(engine: Engine) -> None:
    async with stalled_network(memory_services(), StallingEngine(engine, 2)) as nodes, \
            openai_sdk(nodes[0]) as sdk:
        stream = await sdk.chat.completions.create(**CHAT, stream=True)
        with pytest.raises(openai.APIError) as err:
            async with asyncio.timeout(GUARD_S):
                async for _ in stream:
                    pass
        assert err.value.code == "executor_stalled" and "no token for" in err.value.message


async def test_the_gateway_answers_a_stalled_whole_request_with_504(engine: Engine) -> None:
    async with stalled_network(memory_services(), StallingEngine(engine, 2)) as nodes, \
            openai_sdk(nodes[0]) as sdk:
        with pytest.raises(openai.InternalServerError) as err:
            async with asyncio.timeout(GUARD_S):
                await sdk.chat.completions.create(**CHAT)
        assert (err.value.status_code, err.value.code) == (504, "executor_stalled")


# --- the client library does not hang on a silent TA ------------------------------------------


@pytest.mark.parametrize("transport", ["memory", pytest.param("libp2p", marks=pytest.mark.libp2p)])
@pytest.mark.parametrize("starts", [False, True], ids=["silent-from-the-start", "silent-after-started"])
async def test_the_client_gives_up_on_a_silent_ta_with_stream_stalled(transport: str, starts: bool) -> None:
    ta_key = Keypair.from_seed(b"silent-ta")
    make = memory_services() if transport == "memory" else libp2p_service
    ta, service = make(ta_key), make(CLIENT)
    forever = asyncio.Event()

    async def silent(opener: str, frame: bytes, send: SendFrame) -> None:
        if starts:
            iid = inference_id(open_envelope(frame, InferenceRequest))
            await send(seal(InferenceStarted(inference_id=iid, ta=ta_key.peer_id, prompt_tokens=3), ta_key))
        await forever.wait()

    ta.set_stream_handler(INFER_PROTOCOL, silent)
    await ta.start()
    await service.start()
    try:
        client = GonkaClient(CLIENT, service, await service.connect(ta.listen_addrs[0]), chain_id="any")
        events = []
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(StreamStalled) as err:
                async for event in client.stream_chat([("user", "Hi")], model=MODEL, timeout=STALL_S):
                    events.append(event)
        assert err.value.code == "stalled" and not isinstance(err.value, TimeoutError)
        assert f"sent nothing for {STALL_S:g} s" in str(err.value)
        assert [type(e) for e in events] == ([StartedEvent] if starts else [])
    finally:
        forever.set()
        await service.stop()
        await ta.stop()


# --- the option ---------------------------------------------------------------------------------


def test_stall_timeout_is_a_node_option_and_must_be_positive(tmp_path: Path) -> None:
    assert NodeConfig().stall_timeout == 30.0
    toml = tmp_path / "node.toml"
    toml.write_text("stall_timeout = 2.5\n")
    assert load_config(toml).stall_timeout == 2.5
    assert load_config(toml, stall_timeout=4.0).stall_timeout == 4.0
    with pytest.raises(ConfigError, match="stall_timeout"):
        load_config(None, stall_timeout=0.0)
