"""What several test modules share: polling for a condition, a network on the in-memory hub
with the real tiny model, a TA-and-executor pair around an engine that can go silent, and
reading a node process's READY line.

Tests wait for the signal they need (a commit, a height, an announcement) by polling it
here, never by a fixed sleep: a fixed sleep is either too short on a loaded machine or
wastes time on an idle one. No test module imports another; what two share lives here.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from gonka_p2p.actors.node import Node
from gonka_p2p.actors.replica import Replica
from gonka_p2p.actors.replica.params import ReplicaParams
from gonka_p2p.client import GonkaClient, NetworkUnavailable
from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.gossip.service import NetworkService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine, TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.consensus_types import ConsensusParams
from gonka_p2p.ledger.rules import choose_executor
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.openai.gateway import Gateway, GatewayServer
from gonka_p2p.ledger.executor_draw import executor_weights
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id
from gonka_p2p.wire.schema import WireError

MODEL = "tiny-llama"

T = TypeVar("T")

# Consensus timeouts cut to a few hundred milliseconds, so that a test's replicas commit in seconds.
FAST = ReplicaParams(
    consensus=ConsensusParams(timeout_propose_ms=400, timeout_propose_delta_ms=100, timeout_prevote_ms=200,
                              timeout_prevote_delta_ms=100, timeout_precommit_ms=200,
                              timeout_precommit_delta_ms=100, rebroadcast_interval_ms=300),
    tx_flush_s=0.01, empty_block_interval_s=0.3, snapshot_interval=4, sync_batch=4, request_timeout_s=2.0)


async def eventually(probe: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "a condition", *,
                     until: Callable[[T], bool] = bool, interval: float = 0.02) -> T:
    """Poll ``probe`` (a function or a coroutine function) until ``until`` holds of its value,
    and return that value; fail naming ``what`` and the last value once ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if until(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def eventually_blocking(probe: Callable[[], T], timeout: float = 10.0, what: str = "a condition", *,
                        until: Callable[[T], bool] = bool, interval: float = 1.0) -> T:
    """:func:`eventually` for synchronous tests that drive subprocesses (no event loop to yield to)."""
    deadline = time.monotonic() + timeout
    while not until(value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")
        time.sleep(interval)
    return value


async def start_network(hub: MemoryHub, engine: Engine, n: int = 3) -> list[Node]:
    """n nodes, the first one TA only, all joined through the first and announced."""
    return await start_nodes(hub, [None] + [engine] * (n - 1))


async def start_nodes(hub: MemoryHub, engines: list[Engine | None],
                      evidence_max_bytes: list[int] | None = None) -> list[Node]:
    """One node per engine (None: TA only), each with its evidence bound if given, all joined
    through the first and announced."""
    nodes: list[Node] = []
    for i, engine in enumerate(engines):
        key = Keypair.from_seed(f"node{i}".encode())
        models = [] if engine is None else [MODEL]
        bootstrap = [nodes[0].service.listen_addrs[0]] if nodes else []
        bound = {} if evidence_max_bytes is None else {"evidence_max_bytes": evidence_max_bytes[i]}
        node = Node(NodeConfig(models=models, bootstrap=bootstrap, engine="torch", **bound), key,  # type: ignore[arg-type]
                    hub.service(key), weights=None)
        if engine is not None:
            node.engines[MODEL] = engine
        await node.join()
        await node.start_actors()
        nodes.append(node)
    for node in nodes[1:]:  # full mesh, as the directory would dial on announcements
        for other in nodes[1:]:
            if other is not node:
                await node.service.connect(other.service.listen_addrs[0])
    for node in nodes:
        await node.directory.announce_once()
    await all_announced(nodes)
    return nodes



class StallingEngine:
    """The real engine, going silent after ``after`` tokens (0: before its first) until
    ``release`` is set: an executor frozen mid-answer, its connection still open. It holds
    before computing the next token; ``holding`` is set once it holds, and ``abandoned`` when
    its generation is cancelled while it holds (its stream was reset)."""

    def __init__(self, engine: Engine, after: int) -> None:
        self._engine = engine
        self._after = after
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.abandoned = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       seed: bytes) -> AsyncIterator[TokenStep]:
        if self._after == 0:
            await self._hold()
        n = 0
        async with aclosing(self._engine.generate(prompt_ids, params, seed)) as steps:
            async for step in steps:
                yield step
                n += 1
                if n == self._after:
                    await self._hold()

    async def _hold(self) -> None:
        self.holding.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.abandoned.set()
            raise


ServiceFactory = Callable[[Keypair], NetworkService]


def memory_services() -> ServiceFactory:
    """Services on one fresh in-memory hub."""
    return MemoryHub().service


def libp2p_service(key: Keypair) -> NetworkService:
    """A real py-libp2p service on 127.0.0.1, any free port."""
    return Libp2pService(key, "/ip4/127.0.0.1/tcp/0")


@asynccontextmanager
async def ta_and_executor(make_service: ServiceFactory, engine: Engine | StallingEngine, keys: Sequence[Keypair],
                          *, stall_timeout: float, genesis: Genesis | None = None,
                          data_dir: Path | None = None) -> AsyncIterator[list[Node]]:
    """A TA-only node (``stall_timeout``) and one executor serving ``engine``, with ``keys``,
    joined and announced; with ``genesis`` each runs a ledger replica (kept under ``data_dir``).
    The engine is the caller's, shared by its tests: the nodes leave it open."""
    nodes: list[Node] = []
    stop = asyncio.Event()
    serving: list[asyncio.Task[None]] = []
    try:
        for i, models in enumerate(([], [MODEL])):
            config = NodeConfig(models=models, engine="torch", stall_timeout=stall_timeout, announce_interval=0.5,
                                data_dir=data_dir / f"node{i}" if data_dir else None)
            node = Node(config, keys[i], make_service(keys[i]), None, genesis, FAST)
            if models:
                node.engines[MODEL] = engine  # type: ignore[assignment]
            await node.join()
            nodes.append(node)
        await nodes[1].service.connect(nodes[0].service.listen_addrs[0])
        serving = [asyncio.create_task(n.serve(stop)) for n in nodes]
        await all_announced(nodes)
        yield nodes
    finally:
        if isinstance(engine, StallingEngine):
            engine.release.set()  # a held generation ends, so the nodes stop at once
        stop.set()
        await asyncio.gather(*serving)
        for node in nodes:  # not Node.close: the engine stays open
            if node.replica is not None:
                await node.replica.close()
            await node.service.stop()
            await node.artifacts.store.close()

async def all_announced(nodes: list[Node], timeout: float = 30.0) -> None:
    """Until every node's directory holds every other node that serves ``MODEL`` as live, and
    every ledger has committed a block: a StartInference is checked against the last block's
    time, and before the first that is the genesis time (0 in tests' genesis files)."""
    executors = {node.key.peer_id for node in nodes if MODEL in node.config.models}
    for node in nodes:
        await eventually(lambda: set(node.directory.executor_weights(MODEL)), timeout,
                         f"{node.key.peer_id[-6:]} to hear every executor's announcement",
                         until=lambda seen: seen == executors - {node.key.peer_id})  # noqa: B023
        if node.replica is not None:
            replica = node.replica
            await eventually(lambda: replica.state.height, timeout,  # noqa: B023
                             f"{node.key.peer_id[-6:]} to commit its first block")


async def client_for(hub: MemoryHub, ta: Node, seed: bytes = b"client") -> GonkaClient:
    key = Keypair.from_seed(seed)
    service = hub.service(key)
    await service.start()
    peer = await service.connect(ta.service.listen_addrs[0])
    return GonkaClient(key, service, peer)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a node to bind, or to dial and fail)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_address(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The address a ``gonka-p2p node`` process prints on its READY line; None when it exits
    or ``timeout`` passes first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return line.split()[1]
        if not line and proc.poll() is not None:
            return None
    return None


def drawn_attempt(state: LedgerState, request: bytes, ta: str, executor: str) -> int | None:
    """The attempt at which the ledger's executor draw gives ``request``, routed by ``ta``, to
    ``executor`` (peer ids), or None if no draw within ``max_executor_attempts`` does: what a
    test's StartInference must name for the ledger to take it."""
    try:
        signed = open_envelope(request, InferenceRequest)
    except WireError:  # a test of a malformed request: no draw at all
        return None
    weights = executor_weights(state, signed.message.model)
    if executor not in weights or executor == ta:
        return None
    iid = inference_id(signed)
    return next((k for k in range(state.params.max_executor_attempts)
                 if choose_executor(weights, frozenset({ta}), iid, k) == executor), None)


def request_drawing(state: LedgerState, make: Callable[[bytes], bytes], ta: str, executor: str) -> bytes:
    """A client grinding its nonce, as tests do to pin an executor: of the requests
    ``make(nonce)`` over a fixed nonce sequence (``b"n" * 16`` first), the first that the
    ledger's draw gives to ``executor`` when ``ta`` routes it; the very first when
    ``executor`` can never be drawn (a test of a refused Start)."""
    first = make(b"n" * 16)
    if executor == ta or executor not in executor_weights(state, open_envelope(first, InferenceRequest).message.model):
        return first
    candidates = itertools.chain([first], (make(hashlib.sha256(i.to_bytes(8, "big")).digest()[:16])
                                           for i in itertools.count()))
    return next(r for r in candidates if drawn_attempt(state, r, ta, executor) is not None)


# -- node processes of a devnet written by ``gonka-p2p init`` --------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def gonka(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gonka_p2p.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


class NodeProcess:
    """A ``gonka-p2p node`` process (``argv`` after ``node``) whose key is ``key``; stderr goes to ``log``."""

    def __init__(self, argv: list[str], key: Path, log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "gonka_p2p.cli", "node", *argv], stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=ENV, cwd=cwd)
        self.peer_id = Keypair.load(key).peer_id
        self.addr = ""

    def wait_ready(self, timeout: float = 240) -> str:
        addr = ready_address(self.proc, timeout)
        if addr is None:
            raise AssertionError(f"{self.log.name} not ready: {self.log.read_text()[-3000:]}")
        self.addr = addr
        return addr

    def stop(self) -> int:
        """SIGTERM, and SIGKILL if it has not exited within a minute (a loaded machine's vLLM
        shutdown can take that long; a test's own failure must not hide behind this one)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


class DevnetNode(NodeProcess):
    """``gonka-p2p node`` number ``index`` of the network in ``net`` (a TA and replica only unless
    ``executor``), with ``args`` added."""

    def __init__(self, net: Path, index: int, port: int, bootstrap: str | None, *args: str,
                 executor: bool = False) -> None:
        key = net / f"node{index}.key"
        argv = ["--key", str(key), "--genesis", str(net / "genesis.toml"), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
                "--empty-block-interval", "0.5", "--announce-interval", "1", *args]
        argv += [] if executor else ["--no-executor"]
        argv += ["--bootstrap", bootstrap] if bootstrap else []
        super().__init__(argv, key, net / f"node{index}.{time.monotonic_ns()}.log")


async def ask(client: GonkaClient, question: Callable[[GonkaClient], Awaitable[T]], addr: str) -> T:
    """Ask, re-dialling once if the connection dropped (py-libp2p drops some on a loaded machine)."""
    try:
        return await question(client)
    except NetworkUnavailable:
        await client.service.connect(addr)
        return await question(client)


async def height_of(node: DevnetNode, client: GonkaClient) -> int:
    return (await ask(client, lambda c: c.status(), node.addr)).height


async def wait_height(node: DevnetNode, client: GonkaClient, height: int, timeout: float = 120) -> None:
    await eventually(lambda: height_of(node, client), timeout, f"node {client.ta[-6:]} to reach height {height}",
                     until=lambda h: h >= height, interval=0.25)


@asynccontextmanager
async def running_replicas(keys: Sequence[Keypair], genesis: Genesis, dirs: Sequence[Path], params: ReplicaParams,
                           prepare: Callable[[int, Replica], None] = lambda i, r: None
                           ) -> AsyncIterator[tuple[list[Replica], list[asyncio.Task[None]]]]:
    """A replica per key on one in-memory network, each opened from its data directory (and
    ``prepare``-d) before it runs; their run tasks, cancelled and every replica closed on exit."""
    hub = MemoryHub()
    services: list[NetworkService] = []
    replicas: list[Replica] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, (key, path) in enumerate(zip(keys, dirs, strict=True)):
            service = hub.service(key)
            await service.start()
            for other in services:
                await service.connect(other.listen_addrs[0])
            services.append(service)
            replica = Replica(service, key, genesis, path, params)
            await replica.open()
            prepare(i, replica)
            replicas.append(replica)
            tasks.append(asyncio.create_task(replica.run()))
        yield replicas, tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in replicas:
            await replica.close()
        for service in services:
            await service.stop()


@asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[str]:
    """Serve ``gateway`` with the real HTTP server on a free port of 127.0.0.1; yields the base URL."""
    server = GatewayServer(gateway.app, "127.0.0.1", 0)
    server.bind()
    task = asyncio.create_task(server.serve())
    try:
        yield server.url
    finally:
        server.stop()
        await task


def short_testnet_runs_here() -> bool:
    """Whether ``test_testnet.py`` runs the short scenario in this session (root and
    ``nft`` at hand, not skipped with ``GONKA_TESTNET_SHORT=0``): tests whose ground it
    covers under harsher conditions give CI's budget back to it."""
    from gonka_p2p.testnet import netns

    if os.environ.get("GONKA_TESTNET_SHORT") == "0":
        return False
    try:
        netns.require_privilege()
    except netns.PrivilegeError:
        return False
    return True


async def a_raising_handler_is_contained(a: NetworkService, b: NetworkService, caplog: pytest.LogCaptureFixture,
                                         logger: str, linked: Callable[[], Awaitable[None]] | None = None,
                                         ) -> asyncio.Task[None]:
    """``b`` subscribes a handler that raises on ``b"x"``; ``a`` publishes ``b"x"``, then ``b"y"``
    (once ``linked`` returns): the second is handled, the error logged under ``logger``, and
    ``b`` goes on. Returns the task awaiting ``b``'s end (what a node's supervisor awaits)."""
    handled: list[bytes] = []

    async def broken_on_x(sender: str, data: bytes) -> None:
        if data == b"x":
            raise RuntimeError("handler bug")
        handled.append(data)

    await b.subscribe("t", broken_on_x)
    if linked is not None:
        await linked()
    owner = asyncio.create_task(b.wait_closed())
    with caplog.at_level(logging.ERROR, logger=logger):
        await a.publish("t", b"x")
        await a.publish("t", b"y")
        await eventually(lambda: handled == [b"y"], what="the message after the one that raised")
    assert not owner.done()
    assert any("handler bug" in repr(r.exc_info) for r in caplog.records if r.exc_info)
    return owner
