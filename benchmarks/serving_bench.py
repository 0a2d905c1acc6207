"""Serving benchmark: what the network costs on top of the bare engine, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serving_bench.py          # ~10 min
    .venv/bin/python benchmarks/serving_bench.py --quick                    # CI smoke, ~2 min

Prints one table and writes it as markdown and JSON under ``--out``
(default ``benchmarks/results/serving_bench{,_quick}.{md,json}``).

What is compared (same model, same prompts, greedy, same max_tokens):

* ``bare`` -- ``VLLMEngine.generate`` in this process: encode, generate,
  nothing else. The floor.
* ``network`` -- ``GonkaClient.chat`` from this process over real libp2p on
  127.0.0.1 to a TA node process, which routes to the executor node process
  and relays its signed frames back; every frame is signed by the executor
  and verified by TA and client.
* ``gateway`` -- the official ``openai`` SDK (``AsyncOpenAI``, streaming)
  against one TA node's ``--http`` gateway, signing with ``GonkaAuth``.

Topology (``--peers``, default 4): one executor node and ``peers - 1``
TA-only nodes; clients spread round-robin over the TA-only nodes, the
gateway is the first one's. One executor on purpose: bare and network then
run the identical engine (one vLLM engine, same ``max_num_seqs``, same
threads), so every difference is serving overhead, not a different amount
of compute -- more executors on two cores would only split the same cores.

Fairness on a small shared machine: only one vLLM engine may run per
process, so the bare engine lives here and the executor in its node; they
never compute at the same moment because every measurement is a *turn* (c
concurrent requests on one path, all awaited) and turns alternate between
paths (bare, network, gateway; then rotated: network, gateway, bare; ...),
so slow phases of a busy machine hit every path alike. Compare the ratios
in the table, not absolute numbers across runs.

Definitions: TTFT is from the call (request building and signing
included) to the first token on the caller's side; ``total`` the whole
answer; ``tok/s per req`` the decode rate after the first token
(median over requests); ``tok/s total`` all tokens of a path's turns over
their summed wall time. Percentiles are nearest-rank (p99 of fewer than 100
samples is the maximum). ``CPU ms/token`` is the CPU time (user + system)
each process of the path used during its turns, per generated token: the
serving path's cost, far less sensitive to a busy machine than wall time.
RSS is each process's resident memory after its path's turns. ``bench`` is
this process: the engine on the bare path, the client on the others.

Reading it: on one machine every participant shares the cores with the
engine, so the network's whole CPU per token (executor, TAs, client) is
taken from decoding; "executor CPU" in the ``vs bare`` column is the part an
executor pays when its TAs and clients run elsewhere. Concurrent turns start
all requests at once: bare submits them to the engine in the same instant,
the network delivers them a few ms apart, and vLLM then spreads their
prefills over more steps -- part of the added TTFT at 8 and 32 clients.
``--profile DIR`` records py-spy stacks of every process during the turns.

Gossip and streams (``netbench.py``) run last, after the nodes and the bare
engine are gone, in their own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _name, _value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                      "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "ERROR",
                      "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_name, _value)  # before torch is imported; inherited by the nodes

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from netbench import NetRow, cpu_seconds, percentile, rss_mib  # noqa: E402

from gonka_p2p.client import GonkaClient  # noqa: E402
from gonka_p2p.gossip.libp2p_service import Libp2pService  # noqa: E402
from gonka_p2p.identity import Keypair  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL  # noqa: E402

TITLE = "gonka-p2p serving benchmark"
TTFT_TARGET_MS = 10.0  # at most this much added to p50 TTFT
THROUGHPUT_TARGET = 0.90  # at least this share of bare tokens/s, concurrent clients
DEFAULT_ROUNDS = {1: 16, 8: 6, 32: 3}  # turns per path: more where a turn has fewer samples
WARM_UP_CLIENTS = 2  # concurrent requests of the unmeasured first turn

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bicycle works.",
    "Describe a day in the life of a honeybee.",
    "Write a letter to a friend about your trip to the mountains.",
    "Explain why the sky is blue to a ten-year-old, in detail.",
    "List ten ideas for a birthday party and explain each one.",
    "Describe how bread is made, from wheat field to bakery.",
    "Write a story about a robot learning to paint.",
    "Explain how the internet delivers a web page, step by step.",
    "Describe the water cycle and why it matters for farming.",
    "Write a travel guide for a small seaside town.",
    "Explain how to plant and care for a vegetable garden.",
]

console = Console()


# ---- settings ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: str
    peers: int
    concurrency: tuple[int, ...]
    rounds: dict[int, int]  # turns per path at each concurrency
    max_tokens: int
    out: Path
    stem: str
    net_counts: tuple[int, int, int]  # gossip messages, frames per stream, round trips
    net_paced_s: float
    paths: tuple[str, ...] = ("bare", "network", "gateway")
    net: bool = True  # run the gossip & streams part
    profile: Path | None = None  # py-spy collapsed stacks of every process go here
    render: Path | None = None  # re-render this JSON report instead of running


def parse_settings(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few prompts, small counts (CI smoke)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--peers", type=int, help="node processes: 1 executor + TA-only nodes")
    p.add_argument("--concurrency", type=int, nargs="+", help="concurrent clients per turn")
    p.add_argument("--rounds", type=int, nargs="+", help="turns per path, one per concurrency")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--paths", nargs="+", choices=("bare", "network", "gateway"),
                   default=["bare", "network", "gateway"], help="serving paths to measure")
    p.add_argument("--no-net", action="store_true", help="skip the gossip & streams part")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy profiles (collapsed stacks) of every process while "
                        "serving is measured")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="print and rewrite the tables of a finished run's JSON; runs nothing")
    a = p.parse_args(argv)
    quick = a.quick
    concurrency = tuple(a.concurrency or ((1, 4) if quick else (1, 8, 32)))
    rounds = a.rounds or [2 if quick else DEFAULT_ROUNDS.get(c, 4) for c in concurrency]
    if len(rounds) == 1:
        rounds = rounds * len(concurrency)
    if len(rounds) != len(concurrency):
        p.error("--rounds takes one value, or one per --concurrency value")
    peers = a.peers or (3 if quick else 4)
    if peers < 2:
        p.error("--peers must be at least 2 (one executor, one TA)")
    return Settings(
        model=a.model, peers=peers, concurrency=concurrency,
        rounds=dict(zip(concurrency, rounds)), max_tokens=a.max_tokens or (8 if quick else 64),
        out=a.out, stem="serving_bench_quick" if quick else "serving_bench",
        net_counts=(100, 100, 60) if quick else (2000, 2000, 1000),
        net_paced_s=2.0 if quick else 10.0,
        paths=tuple(a.paths),
        net=not a.no_net, profile=a.profile, render=a.render,
    )


# ---- one request on one path ---------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first token (what the Completion class reports)."""
        decode = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode if self.tokens > 1 and decode > 0 else 0.0


class ServingPath(Protocol):
    name: str

    async def one(self, prompt: str, max_tokens: int) -> Sample:
        """Send one chat prompt, greedy, and time it."""
        ...

    def pids(self) -> dict[str, int]:
        """Every process this path runs through, by role (for CPU time and RSS)."""
        ...


class BarePath:
    """The engine alone, in this process."""

    name = "bare"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def one(self, prompt: str, max_tokens: int) -> Sample:
        from gonka_p2p.inference.sampler import SamplingParams

        t0 = time.perf_counter()
        ids = self.engine.encode_chat([("user", prompt)])
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs_k=5)
        ttft, tokens = 0.0, 0
        async for _ in self.engine.generate(ids, params, seed=os.urandom(32)):
            if tokens == 0:
                ttft = time.perf_counter() - t0
            tokens += 1
        return Sample(ttft, time.perf_counter() - t0, tokens)

    def pids(self) -> dict[str, int]:
        return {"bench": os.getpid()}


class NetworkPath:
    """GonkaClient -> TA node -> executor node -> TA -> client, round-robin over the TAs."""

    name = "network"

    def __init__(self, clients: list[GonkaClient], cluster: Cluster, model: str) -> None:
        self.clients = clients
        self.cluster = cluster
        self.model = model
        self._next = 0

    async def one(self, prompt: str, max_tokens: int) -> Sample:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        c = await client.chat([("user", prompt)], model=self.model, max_tokens=max_tokens, temperature=0.0)
        return Sample(c.ttft_s, c.elapsed_s, c.completion_tokens)

    def pids(self) -> dict[str, int]:
        return {**self.cluster.pids(), "bench": os.getpid()}


class GatewayPath:
    """The official openai SDK, streaming, against the first TA's HTTP gateway."""

    name = "gateway"

    def __init__(self, base_url: str, model: str, cluster: Cluster) -> None:
        import httpx
        import openai

        from gonka_p2p.openai.auth import GonkaAuth

        http = httpx.AsyncClient(auth=GonkaAuth(Keypair.generate()), timeout=300,
                                 limits=httpx.Limits(max_connections=256))
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", http_client=http)
        self.model = model
        self.cluster = cluster

    async def one(self, prompt: str, max_tokens: int) -> Sample:
        t0 = time.perf_counter()
        stream = await self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        ttft, tokens = 0.0, 0
        async for chunk in stream:
            if not ttft and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0  # the role-only opening chunk is not a token
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return Sample(ttft, time.perf_counter() - t0, tokens)

    def pids(self) -> dict[str, int]:
        return {**self.cluster.pids("TA0", "executor"), "bench": os.getpid()}

    async def close(self) -> None:
        await self.client.close()


# ---- the local network ----------------------------------------------------------


@dataclass
class NodeProc:
    role: str  # "executor" or "TA<i>"
    proc: asyncio.subprocess.Process
    log: Path
    addr: str = ""
    http: str = ""  # the gateway's base URL (".../v1"), as the node prints it


class Cluster:
    """``gonka-p2p node`` processes on 127.0.0.1: one executor, the rest TA-only."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.nodes: list[NodeProc] = []

    @property
    def tas(self) -> list[NodeProc]:
        return [n for n in self.nodes if n.role != "executor"]

    async def start(self) -> None:
        """The first TA (with the gateway) is the bootstrap; the others join through it."""
        config = self.workdir / "node.toml"
        # The executor must admit every concurrent client (the node's default is 16).
        config.write_text(f"max_concurrent = {max(*self.settings.concurrency, WARM_UP_CLIENTS)}\n")
        first = await self._spawn("TA0", ["--no-executor", "--http", "127.0.0.1:0"], config)
        await self._ready(first)
        rest = [await self._spawn("executor", [], config, first.addr)]
        rest += [await self._spawn(f"TA{i}", ["--no-executor"], config, first.addr)
                 for i in range(1, self.settings.peers - 1)]
        await asyncio.gather(*(self._ready(n) for n in rest))

    async def _spawn(self, role: str, extra: list[str], config: Path,
                     bootstrap: str | None = None) -> NodeProc:
        args = [sys.executable, "-m", "gonka_p2p.cli", "node", "--config", str(config),
                "--key", str(self.workdir / f"{role}.key"), "--listen", "/ip4/127.0.0.1/tcp/0",
                "--engine", "vllm", "--model", self.settings.model, *extra]  # default announcing
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        log = self.workdir / f"{role}.log"
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                        stderr=err, cwd=ROOT)
        node = NodeProc(role, proc, log)
        self.nodes.append(node)
        return node

    async def _ready(self, node: NodeProc, timeout: float = 600) -> None:
        """Read the node's stdout until READY; the gateway's URL comes just before it."""
        assert node.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(node.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"node {node.role} exited before it was ready:\n"
                                   + node.log.read_text(errors="replace")[-3000:])
            word, _, rest = line.decode().strip().partition(" ")
            if word == "HTTP":
                node.http = rest
            elif word == "READY":
                node.addr = rest
                return

    def pids(self, *roles: str) -> dict[str, int]:
        """Node pids by role: those named, or all."""
        return {n.role: n.proc.pid for n in self.nodes if not roles or n.role in roles}

    async def stop(self) -> None:
        for node in self.nodes:
            if node.proc.returncode is None:
                node.proc.terminate()
        for node in self.nodes:
            try:
                await asyncio.wait_for(node.proc.wait(), 30)
            except TimeoutError:
                node.proc.kill()
                await node.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)  # keys and logs; a failed start quotes its log


@asynccontextmanager
async def profiling(out: Path | None, pids: dict[str, int]) -> AsyncIterator[None]:
    """py-spy (sampling, non-blocking: the processes are not paused) on every process.

    Collapsed stacks, one file per process, thread names included, so the
    engine thread, the asyncio loop and the trio thread can be told apart.
    """
    if out is None:
        yield
        return
    if shutil.which("py-spy") is None:
        raise RuntimeError("--profile needs py-spy on PATH (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    spies = [await asyncio.create_subprocess_exec(
        "py-spy", "record", "--nonblocking", "--threads", "--format", "raw", "--rate", "200",
        "--pid", str(pid), "--output", str(out / f"{role}.txt"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for role, pid in pids.items()]
    await asyncio.sleep(1.0)  # attached before the first turn
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        await asyncio.gather(*(spy.wait() for spy in spies))


async def wait_for_executor(client: GonkaClient, model: str, timeout: float = 120) -> None:
    """Until the client's TA has heard the executor's announcement."""
    deadline = time.monotonic() + timeout
    while not any(model in models for models in (await client.network_info()).values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"TA {client.ta} saw no executor for {model} in {timeout:.0f} s")
        await asyncio.sleep(0.3)


# ---- measuring -------------------------------------------------------------------


@dataclass
class Turn:
    clients: int
    wall_s: float
    samples: list[Sample]
    cpu_s: dict[str, float]  # CPU seconds each process of the path used during the turn

    @property
    def ttft_p50_s(self) -> float:
        return statistics.median(s.ttft_s for s in self.samples)

    @property
    def rate(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


@dataclass
class PathResult:
    path: str
    clients: int
    turns: list[Turn] = field(default_factory=list)
    rss: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> list[Sample]:
        return [s for t in self.turns for s in t.samples]

    def ttft_ms(self, p: float) -> float:
        return percentile([s.ttft_s * 1000 for s in self.samples], p)

    @property
    def total_p50_s(self) -> float:
        return percentile([s.total_s for s in self.samples], 50)

    @property
    def rate_per_request(self) -> float:
        return statistics.median(s.decode_rate for s in self.samples)

    @property
    def rate_total(self) -> float:
        return sum(s.tokens for s in self.samples) / sum(t.wall_s for t in self.turns)

    def added_ttft_ms(self, bare: PathResult) -> float:
        """Median over rounds of (this path's median TTFT - bare's) in the same round.

        Rounds are adjacent in time and use the same prompts, so pairing them
        cancels the load drifts of a shared machine that a difference of two
        overall p50s keeps.
        """
        return statistics.median(self.round_added_ttft_ms(bare))

    def round_added_ttft_ms(self, bare: PathResult) -> list[float]:
        """Each round's median TTFT minus bare's in the same round, in ms."""
        return [1000 * (t.ttft_p50_s - b.ttft_p50_s) for t, b in zip(self.turns, bare.turns, strict=True)]

    def round_shares(self, bare: PathResult) -> list[float]:
        """Each round's tokens/s as a share of bare's in the same round: how far one run's
        verdict on the pooled share could move with its rounds' spread."""
        return [t.rate / b.rate for t, b in zip(self.turns, bare.turns, strict=True)]

    def cpu_ms_per_token(self) -> dict[str, float]:
        """CPU per generated token, by process: the serving path's cost, robust to load."""
        tokens = sum(s.tokens for s in self.samples)
        roles = self.turns[0].cpu_s if self.turns else {}
        return {role: 1000 * sum(t.cpu_s[role] for t in self.turns) / tokens for role in roles}

    @property
    def tokens(self) -> list[int]:
        return [s.tokens for s in self.samples]


async def run_turn(path: ServingPath, prompts: list[str], max_tokens: int) -> Turn:
    pids = path.pids()
    cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
    t0 = time.perf_counter()
    samples = await asyncio.gather(*(path.one(p, max_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    cpu = {role: cpu_seconds(pid) - cpu0[role] for role, pid in pids.items()}
    return Turn(len(prompts), wall, list(samples), cpu)


async def measure_serving(paths: list[ServingPath], settings: Settings,
                          advance: Callable[[str], None]) -> list[PathResult]:
    """Interleaved turns: round r runs every path once, in an order rotated by r."""
    results = []
    for clients in settings.concurrency:
        by_path = {p.name: PathResult(p.name, clients) for p in paths}
        for r in range(settings.rounds[clients]):
            # The same prompts on every path within a round; other prompts next round.
            prompts = [PROMPTS[(r * clients + i) % len(PROMPTS)] for i in range(clients)]
            for k in range(len(paths)):
                path = paths[(r + k) % len(paths)]
                advance(f"{clients} client(s), round {r + 1}/{settings.rounds[clients]}: {path.name}")
                by_path[path.name].turns.append(await run_turn(path, prompts, settings.max_tokens))
        for p in paths:
            by_path[p.name].rss = {role: rss_mib(pid) for role, pid in p.pids().items()}
        results += by_path.values()
    return results


async def warm_up(paths: list[ServingPath]) -> None:
    """First requests pay for connections, streams and engine warm-up: not measured."""
    for path in paths:
        await run_turn(path, PROMPTS[:WARM_UP_CLIENTS], 4)


# ---- the run ------------------------------------------------------------------------


@dataclass
class Report:
    settings: Settings
    serving: list[PathResult]
    gateway_note: str | None
    net: list[NetRow]
    wall_s: float
    load: tuple[float, float]  # the machine's 1-minute load average as serving began and ended


def gateway_unavailable() -> str | None:
    """Why the gateway path cannot run here, or None when it can."""
    try:
        import openai  # noqa: F401

        import gonka_p2p.openai.gateway  # noqa: F401
    except ImportError as e:
        return f"gateway not available ({e.name} missing)"
    return None


async def serving_phase(settings: Settings, progress: Progress
                        ) -> tuple[list[PathResult], str | None, tuple[float, float]]:
    from gonka_p2p.inference.factory import load_engine
    from gonka_p2p.inference.models import resolve_model

    setup = progress.add_task("preparing the model", total=None)
    await asyncio.to_thread(resolve_model, settings.model)  # once, before processes race for it
    gateway_note = None if "gateway" in settings.paths else "gateway not measured (--paths)"
    gateway_note = gateway_note or gateway_unavailable()
    cluster = Cluster(settings, Path(tempfile.mkdtemp(prefix="gonka-bench-")))
    service = Libp2pService(Keypair.generate())
    engine = None
    paths: list[ServingPath] = []
    try:
        progress.update(setup, description=f"starting {settings.peers} nodes and the bare engine "
                                           "(model loads)")
        engine, _ = await asyncio.gather(asyncio.to_thread(load_engine, "vllm", settings.model),
                                         cluster.start())
        await service.start()
        clients = []
        for ta in cluster.tas:
            peer = await service.connect(ta.addr)
            clients.append(GonkaClient(Keypair.generate(), service, peer))
        progress.update(setup, description="waiting until every TA sees the executor")
        await asyncio.gather(*(wait_for_executor(c, settings.model) for c in clients))
        paths = [path for path in (BarePath(engine), NetworkPath(clients, cluster, settings.model))
                 if path.name in settings.paths]
        if gateway_note is None:
            paths.append(GatewayPath(cluster.tas[0].http, settings.model, cluster))
        progress.update(setup, description="warming up every path")
        await warm_up(paths)
        progress.update(setup, description="network ready", total=1, completed=1)

        total = sum(settings.rounds.values()) * len(paths)
        task = progress.add_task("serving", total=total)

        def advance(text: str) -> None:
            progress.update(task, description=text)
            progress.advance(task)

        load_start = os.getloadavg()[0]
        async with profiling(settings.profile, {"bench": os.getpid(), **cluster.pids()}):
            results = await measure_serving(paths, settings, advance)
        progress.update(task, description="serving measured")
        return results, gateway_note, (load_start, os.getloadavg()[0])
    finally:
        for path in paths:
            if isinstance(path, GatewayPath):
                await path.close()
        await service.stop()
        await cluster.stop()
        if engine is not None:
            await engine.close()


async def net_phase(settings: Settings, progress: Progress) -> list[NetRow]:
    """netbench in its own processes; its progress lines drive ours."""
    task = progress.add_task("gossip & streams", total=None)
    messages, frames, requests = settings.net_counts
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("netbench.py")), "--peers", str(settings.peers),
        "--messages", str(messages), "--frames", str(frames), "--requests", str(requests),
        "--paced-seconds", str(settings.net_paced_s), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    rows: list[NetRow] = []
    async for line in proc.stdout:
        message = json.loads(line)
        if "phase" in message:
            progress.update(task, description=f"gossip & streams: {message['phase']}")
        else:
            rows = [NetRow(**r) for r in message["rows"]]
    if await proc.wait() != 0 or not rows:
        raise RuntimeError(f"netbench failed (exit {proc.returncode})")
    progress.update(task, description="gossip & streams measured", total=1, completed=1)
    return rows


async def run(settings: Settings) -> Report:
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        serving, gateway_note, load = await serving_phase(settings, progress)
        net = await net_phase(settings, progress) if settings.net else []
    return Report(settings, serving, gateway_note, net, time.perf_counter() - started, load)


# ---- reporting ------------------------------------------------------------------------

COLUMNS = ("part", "path", "clients", "p50 ms", "p99 ms", "total p50 s",
           "tok/s per req", "rate", "vs bare", "CPU ms/token", "RSS MiB")


def _per_process(values: dict[str, float], digits: int) -> str:
    return ", ".join(f"{role} {v:.{digits}f}" for role, v in values.items())


def _cpu_text(cpu: dict[str, float]) -> str:
    """Total CPU per token, then each process's share."""
    return f"{sum(cpu.values()):.1f}: {_per_process(cpu, 1)}"


def _versus(row: PathResult, bare: PathResult) -> tuple[str, bool]:
    """Against bare at the same concurrency: added TTFT, share of tok/s, and the executor's
    extra CPU per token (what serving costs an executor whose TAs and clients run
    elsewhere); with whether the targets hold."""
    added = row.added_ttft_ms(bare)
    share = row.rate_total / bare.rate_total
    executor = row.cpu_ms_per_token().get("executor", math.nan)
    extra = executor / sum(bare.cpu_ms_per_token().values()) - 1
    ok = added <= TTFT_TARGET_MS if row.clients == 1 else share >= THROUGHPUT_TARGET
    ttfts, shares = row.round_added_ttft_ms(bare), row.round_shares(bare)
    return (f"{added:+.1f} ms TTFT (rounds {min(ttfts):+.1f} to {max(ttfts):+.1f}), {share:.1%} tok/s "
            f"(rounds {min(shares):.0%}-{max(shares):.0%}), executor CPU {extra:+.0%}"), ok


def table_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    bare = {r.clients: r for r in report.serving if r.path == "bare"}
    for r in report.serving:
        versus = ""
        if r.path != "bare" and r.clients in bare:
            text, ok = _versus(r, bare[r.clients])
            versus = f"{text} {'ok' if ok else 'MISS'}"
        rows.append(("serving", r.path, str(r.clients), f"{r.ttft_ms(50):.1f}", f"{r.ttft_ms(99):.1f}",
                     f"{r.total_p50_s:.2f}", f"{r.rate_per_request:.1f}", f"{r.rate_total:.1f} tok/s",
                     versus, _cpu_text(r.cpu_ms_per_token()), _per_process(r.rss, 0)))
    if report.gateway_note:
        rows.append(("serving", "gateway", "-", "-", "-", "-", "-", "-", report.gateway_note, "-",
                     "-"))
    for n in report.net:
        unit = {"gossip": "msg/s per receiver", "tokens": "frames/s", "rpc": "req/s"}[n.kind]
        rows.append(("gossip & streams", f"{n.kind} ({n.mode})", "-", f"{n.p50_ms:.1f}",
                     f"{n.p99_ms:.1f}", "-", "-", f"{n.rate_per_s:.0f} {unit}", f"{n.count} msgs",
                     "-", _per_process(n.rss_mib, 0)))
    return rows


def caption(report: Report) -> str:
    s = report.settings
    bare = {r.clients: r for r in report.serving if r.path == "bare"}
    verdicts = []
    compared = [r for r in report.serving if r.path != "bare" and r.clients in bare]
    for r in compared:
        _, ok = _versus(r, bare[r.clients])
        verdicts.append(f"{r.path}@{r.clients}: {'ok' if ok else 'MISS'}")
    mismatched = sum(r.tokens != bare[r.clients].tokens for r in compared)
    return (
        f"{s.model}, {s.peers} node processes (1 executor), greedy, max_tokens {s.max_tokens}, "
        f"rounds {s.rounds}; one run, {report.wall_s:.0f} s, paths interleaved; load average "
        f"{report.load[0]:.1f} as serving began, {report.load[1]:.1f} as it ended, on "
        f"{os.cpu_count()} CPUs. "
        f"p50/p99: TTFT for serving rows, one-way delivery (round trip for rpc) for gossip & streams. "
        f"Added TTFT: median over rounds of the round's p50 minus bare's in the same round; tok/s: "
        f"all of a path's tokens over its turns' time, as a share of bare's; in brackets the "
        f"smallest and largest of the rounds' own values. "
        f"Targets: <= {TTFT_TARGET_MS:.0f} ms added p50 TTFT at 1 client; >= "
        f"{THROUGHPUT_TARGET:.0%} of bare tok/s with concurrent clients. "
        f"{'; '.join(verdicts)}. Paths with token counts unlike bare's: {mismatched}."
    )


def render(report: Report) -> Table:
    table = Table(title=TITLE, caption=caption(report), caption_justify="left")
    for name in COLUMNS:
        table.add_column(name, overflow="fold")
    part = None
    for row in table_rows(report):
        if part is not None and row[0] != part:
            table.add_section()
        part = row[0]
        table.add_row(*row)
    return table


def markdown(report: Report) -> str:
    lines = [f"# {TITLE}", "", caption(report), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    s = report.settings
    return {
        "settings": dataclasses.asdict(s),
        "wall_s": report.wall_s,
        "load": report.load,
        "gateway_note": report.gateway_note,
        "serving": [{
            "path": r.path, "clients": r.clients, "ttft_p50_ms": r.ttft_ms(50),
            "ttft_p99_ms": r.ttft_ms(99), "total_p50_s": r.total_p50_s,
            "tok_s_per_request": r.rate_per_request, "tok_s_total": r.rate_total, "rss_mib": r.rss,
            "cpu_ms_per_token": r.cpu_ms_per_token(),
            "turns": [dataclasses.asdict(t) for t in r.turns],
        } for r in report.serving],
        "net": [dataclasses.asdict(n) for n in report.net],
    }


def from_json(data: dict[str, Any]) -> Report:
    """A report written by ``to_json``, for ``--render``."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    raw = {k: v for k, v in data["settings"].items() if k in fields}
    settings = Settings(**{**raw, "out": Path(raw["out"]), "concurrency": tuple(raw["concurrency"]),
                           "rounds": {int(c): n for c, n in raw["rounds"].items()},
                           "net_counts": tuple(raw["net_counts"]), "paths": tuple(raw["paths"]),
                           "profile": None})
    serving = [PathResult(r["path"], r["clients"], rss=r["rss_mib"], turns=[
        Turn(t["clients"], t["wall_s"], [Sample(**x) for x in t["samples"]], t["cpu_s"])
        for t in r["turns"]]) for r in data["serving"]]
    return Report(settings, serving, data["gateway_note"], [NetRow(**n) for n in data["net"]],
                  data["wall_s"], tuple(data.get("load", (math.nan, math.nan))))


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    if settings.render is not None:  # re-render a finished run, e.g. after a format change
        report = from_json(json.loads(settings.render.read_text()))
        settings = dataclasses.replace(report.settings, out=settings.out, stem=settings.render.stem)
        report.settings = settings
    else:
        report = asyncio.run(run(settings))
    console.print(render(report))
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / f"{settings.stem}.md").write_text(markdown(report))
    (settings.out / f"{settings.stem}.json").write_text(json.dumps(to_json(report), indent=1, default=str))
    console.print(f"written: {settings.out / settings.stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
