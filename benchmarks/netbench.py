"""Gossip and stream microbenchmark: real Libp2pService hosts, one per process.

Why separate processes: each host runs py-libp2p in its own trio thread, and
hosts sharing one process would share one GIL, so one process's Python speed
would cap every host. Here the driver (this process) and ``--peers - 1``
workers each own one host and one key, joined in a full mesh on 127.0.0.1.

The message mix is the serving path's, with the real wire types and real
signatures (secp256k1 sign on send, verify on receipt, as the actors do):

* ``gossip`` -- signed :class:`Announcement` s on the directory's topic, from
  the driver, as fast as ``publish`` returns; every worker validates each one
  (signature check in the validator, decode again in the handler, as
  ``PeerDirectory`` does). Latency is publish-to-handler, one way, from the
  ``seq`` field, which carries the sender's ``time.time_ns()`` (one machine,
  one clock). Rate: messages handled per second per receiver.
* ``tokens`` -- one stream per worker; the worker seals one-token
  :class:`TokenBatch` frames with top-5 evidence (what an executor sends per
  token) back to back, the driver verifies each (what TA and client do).
  Latency from the send time carried in the frame's ``text``.
* ``rpc`` -- request/response: a signed :class:`InferenceRequest` in, one
  signed :class:`InferenceStarted` out (an executor's admission), with 8 in
  flight. Latency is the round trip.

Each load is measured alone, then all three at once ("mixed"). Every row
carries the RSS of each host process. Output is JSON, for ``serving_bench``::

    python benchmarks/netbench.py --peers 4 --messages 2000 --frames 2000 --requests 1000

Workers are this script with ``--worker``; they take JSON commands on stdin
and answer one JSON line on stdout each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from gonka_p2p.client import build_request  # noqa: E402
from gonka_p2p.gossip.libp2p_service import Libp2pService  # noqa: E402
from gonka_p2p.gossip.service import SendFrame  # noqa: E402
from gonka_p2p.identity import Keypair  # noqa: E402
from gonka_p2p.inference.model_names import DEFAULT_MODEL  # noqa: E402
from gonka_p2p.wire.envelope import open_envelope, seal  # noqa: E402
from gonka_p2p.wire.messages import (  # noqa: E402
    Announcement,
    InferenceRequest,
    InferenceStarted,
    TokenBatch,
    inference_id,
)
from gonka_p2p.wire.protocols import ANNOUNCE_TOPIC  # noqa: E402
from gonka_p2p.wire.schema import WireError  # noqa: E402

TOKENS_PROTOCOL = "/gonka/bench/tokens/1"
RPC_PROTOCOL = "/gonka/bench/rpc/1"
RPC_IN_FLIGHT = 8
TOP_K = 5


# ---- shared helpers (serving_bench uses them too) --------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; with fewer than 100 values p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rss_mib(pid: int | None = None) -> float:
    """Resident memory of a process (Linux /proc), MiB; NaN when unknown."""
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc); NaN when unknown."""
    try:
        fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class NetRow:
    """One measured load: how many messages, how fast, how late, at what memory cost."""

    kind: str  # gossip | tokens | rpc
    mode: str  # alone | mixed
    count: int
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    rss_mib: dict[str, float]


# ---- worker ----------------------------------------------------------------


def _now_ms(ns: int) -> float:
    return (time.time_ns() - ns) / 1e6


async def _paced(count: int, rate: float | None) -> AsyncIterator[int]:
    """Yield 0..count-1 at ``rate`` per second (None: as fast as the consumer goes)."""
    start = time.perf_counter()
    for i in range(count):
        if rate is not None:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        yield i


def _token_frame(key: Keypair, inference_id: bytes, position: int) -> bytes:
    """One token of evidence as an executor streams it, stamped with its send time."""
    return seal(TokenBatch(
        inference_id=inference_id, start=position, token_ids=[1000 + position % 4000],
        logprobs=[-0.25], top_ids=[[1000 + i for i in range(TOP_K)]],
        top_logprobs=[[-0.25 - i for i in range(TOP_K)]], text=str(time.time_ns()),
    ), key)


class Worker:
    """One host: validates gossip, serves token streams and request/response."""

    def __init__(self) -> None:
        self.key = Keypair.generate()
        self.service = Libp2pService(self.key)
        self.gossip_ms: list[float] = []
        self.last_ns = 0  # when the latest announcement was handled

    async def start(self) -> None:
        await self.service.start()
        await self.service.subscribe(ANNOUNCE_TOPIC, self._on_announcement, _valid_announcement)
        self.service.set_stream_handler(TOKENS_PROTOCOL, self._serve_tokens)
        self.service.set_stream_handler(RPC_PROTOCOL, self._serve_rpc)

    async def _on_announcement(self, sender: str, data: bytes) -> None:
        signed = open_envelope(data, Announcement)  # decoded again, as PeerDirectory does
        self.last_ns = time.time_ns()
        self.gossip_ms.append((self.last_ns - signed.message.seq) / 1e6)

    async def _serve_tokens(self, opener: str, frame: bytes, send: SendFrame) -> None:
        count, rate = msgpack.unpackb(frame)
        inference_id = os.urandom(32)
        async for position in _paced(count, rate):
            await send(_token_frame(self.key, inference_id, position))

    async def _serve_rpc(self, opener: str, frame: bytes, send: SendFrame) -> None:
        request = open_envelope(frame, InferenceRequest)
        await send(seal(InferenceStarted(inference_id=inference_id(request), ta=opener,
                                         prompt_tokens=12), self.key))

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["cmd"] == "connect":
            for addr in cmd["addrs"]:
                if not addr.endswith(self.service.peer_id):
                    await self.service.connect(addr)
            return {"ok": True}
        if cmd["cmd"] == "report":  # gossip latencies since the last report
            latencies, self.gossip_ms = self.gossip_ms, []
            return {"gossip_ms": latencies, "last_ns": self.last_ns, "rss_mib": rss_mib()}
        raise ValueError(f"unknown command {cmd!r}")


def _valid_announcement(sender: str, data: bytes) -> bool:
    try:
        signed = open_envelope(data, Announcement)
    except WireError:
        return False
    return all(a.endswith("/p2p/" + signed.signer_id) for a in signed.message.addrs)


async def run_worker() -> None:
    worker = Worker()
    await worker.start()
    print(json.dumps({"addr": worker.service.listen_addrs[0]}), flush=True)
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            print(json.dumps(await worker.command(json.loads(line))), flush=True)
    finally:
        await worker.service.stop()


# ---- driver ----------------------------------------------------------------


class WorkerProcess:
    """A worker subprocess and its line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.addr = ""
        self.peer_id = ""

    @classmethod
    async def spawn(cls) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        worker = cls(proc)
        worker.addr = (await worker._reply())["addr"]
        worker.peer_id = worker.addr.rsplit("/", 1)[-1]
        return worker

    async def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError("a netbench worker exited early")
        return json.loads(line)

    async def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._reply()

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass
class Load:
    """What one load measured: messages seen, their latencies (ms), and its time span."""

    count: int
    latencies_ms: list[float]
    span_s: float


@dataclass(frozen=True)
class Rates:
    """Offered load per kind; None means as fast as the service takes it (saturation)."""

    gossip: float | None  # announcements/s from the driver
    tokens: float | None  # frames/s per stream, one stream per worker
    rpc: float | None  # requests/s (None: RPC_IN_FLIGHT lanes back to back)


SATURATED = Rates(None, None, None)
# The serving path's own mix, roughly: announcements of a few dozen peers, one
# executor's decode rate per stream, a request every so often.
PACED = Rates(gossip=20.0, tokens=50.0, rpc=10.0)


class Driver:
    def __init__(self, service: Libp2pService, key: Keypair, workers: list[WorkerProcess]) -> None:
        self.service = service
        self.key = key
        self.workers = workers

    async def gossip(self, messages: int, rate: float | None) -> Load:
        """Publish ``messages`` announcements; receivers report their latencies."""
        await self._reports()  # discard anything earlier
        started_ns = time.time_ns()
        async for _ in _paced(messages, rate):
            msg = Announcement(addrs=self.service.listen_addrs, models=[DEFAULT_MODEL],
                               capacity=16, seq=time.time_ns())
            await self.service.publish(ANNOUNCE_TOPIC, seal(msg, self.key))
        deadline = time.monotonic() + 60
        latencies: list[float] = []
        last_ns = started_ns
        while time.monotonic() < deadline:  # until every receiver has them all
            await asyncio.sleep(0.2)
            reports = await self._reports()
            latencies += [ms for r in reports for ms in r["gossip_ms"]]
            last_ns = max([last_ns] + [r["last_ns"] for r in reports])
            if len(latencies) >= messages * len(self.workers):
                break
        # Rate per receiver: every worker handles the whole stream.
        return Load(len(latencies) // len(self.workers), latencies, (last_ns - started_ns) / 1e9)

    async def tokens(self, frames: int, rate: float | None) -> Load:
        """One token stream from every worker at once, ``frames`` frames each."""
        started = time.perf_counter()
        per_stream = await asyncio.gather(*(self._token_stream(w.peer_id, frames, rate)
                                            for w in self.workers))
        latencies = [ms for stream in per_stream for ms in stream]
        return Load(len(latencies), latencies, time.perf_counter() - started)

    async def _token_stream(self, peer: str, frames: int, rate: float | None) -> list[float]:
        latencies = []
        request = msgpack.packb([frames, rate])
        async for frame in self.service.open_stream(peer, TOKENS_PROTOCOL, request):
            signed = open_envelope(frame, TokenBatch)  # verified, as TA and client do
            latencies.append(_now_ms(int(signed.message.text)))
        return latencies

    async def rpc(self, requests: int, rate: float | None) -> Load:
        """Signed request/response round trips: paced one at a time, or RPC_IN_FLIGHT lanes flat out."""
        client = Keypair.generate()
        latencies: list[float] = []

        async def round_trip(i: int) -> None:
            t0 = time.perf_counter()
            frame = build_request(client, [("user", "What is the capital of France?")], "netbench")
            peer = self.workers[i % len(self.workers)].peer_id
            open_envelope(await self.service.request(peer, RPC_PROTOCOL, frame), InferenceStarted)
            latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        if rate is None:
            todo = iter(range(requests))

            async def lane() -> None:
                for i in todo:
                    await round_trip(i)

            await asyncio.gather(*(lane() for _ in range(RPC_IN_FLIGHT)))
        else:
            async for i in _paced(requests, rate):
                await round_trip(i)
        return Load(len(latencies), latencies, time.perf_counter() - started)

    async def _reports(self) -> list[dict[str, Any]]:
        return [await w.ask(cmd="report") for w in self.workers]

    async def rss(self) -> dict[str, float]:
        reports = await self._reports()  # also drains gossip latencies, harmless between loads
        return {"driver": rss_mib(), **{f"worker{i}": r["rss_mib"] for i, r in enumerate(reports)}}

    async def measure(self, rates: Rates, counts: Rates) -> dict[str, Load]:
        """All three loads at once (one with the others' counts at 0 is a load alone)."""
        kinds = {"gossip": self.gossip, "tokens": self.tokens, "rpc": self.rpc}
        chosen = {k: run for k, run in kinds.items() if getattr(counts, k)}
        loads = await asyncio.gather(*(run(int(getattr(counts, k)), getattr(rates, k))
                                       for k, run in chosen.items()))
        return dict(zip(chosen, loads))


def _row(kind: str, mode: str, load: Load, rss: dict[str, float]) -> NetRow:
    return NetRow(kind, mode, load.count, load.count / load.span_s if load.span_s else 0.0,
                  percentile(load.latencies_ms, 50), percentile(load.latencies_ms, 99), rss)


async def run_driver(peers: int, counts: Rates, paced_s: float,
                     progress: Callable[[str], None]) -> list[NetRow]:
    """Each load alone at saturation, then the paced mix of all three for ``paced_s``."""
    key = Keypair.generate()
    service = Libp2pService(key)
    await service.start()
    workers: list[WorkerProcess] = []
    try:
        progress(f"starting {peers} hosts (one process each)")
        workers = list(await asyncio.gather(*(WorkerProcess.spawn() for _ in range(peers - 1))))
        addrs = [w.addr for w in workers]
        for w in workers:
            await service.connect(w.addr)
            await w.ask(cmd="connect", addrs=addrs)
        await _wait_for_mesh(service, len(workers))
        driver = Driver(service, key, workers)
        rows = []
        for kind in ("gossip", "tokens", "rpc"):
            progress(f"{kind} alone, saturated")
            alone = Rates(**{k: getattr(counts, k) if k == kind else None
                             for k in ("gossip", "tokens", "rpc")})
            load = (await driver.measure(SATURATED, alone))[kind]
            rows.append(_row(kind, "saturated", load, await driver.rss()))
        progress(f"paced mix of all three for {paced_s:.0f} s")
        paced_counts = Rates(**{k: getattr(PACED, k) * paced_s for k in ("gossip", "tokens", "rpc")})
        mixed = await driver.measure(PACED, paced_counts)
        rss = await driver.rss()
        rows += [_row(kind, "paced mix", load, rss) for kind, load in mixed.items()]
        return rows
    finally:
        await asyncio.gather(*(w.close() for w in workers))
        await service.stop()


async def _wait_for_mesh(service: Libp2pService, subscribers: int, timeout: float = 30) -> None:
    """Until every worker's subscription is known here (gossipsub grafts at the next heartbeat)."""
    deadline = time.monotonic() + timeout
    while len(service.topic_peers(ANNOUNCE_TOPIC)) < subscribers:
        if time.monotonic() > deadline:
            raise RuntimeError("the gossip mesh did not form")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # one heartbeat or so for the mesh itself


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=4, help="hosts, the driver included")
    parser.add_argument("--messages", type=int, default=2000, help="gossip messages, saturated")
    parser.add_argument("--frames", type=int, default=2000, help="token frames per stream, saturated")
    parser.add_argument("--requests", type=int, default=1000, help="round trips, saturated")
    parser.add_argument("--paced-seconds", type=float, default=10.0, help="length of the paced mix")
    args = parser.parse_args(argv)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # redial noise as peers shut down
    if args.worker:
        asyncio.run(run_worker())
        return 0
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    rows = asyncio.run(run_driver(
        args.peers, Rates(args.messages, args.frames, args.requests), args.paced_seconds,
        progress=lambda text: print(json.dumps({"phase": text}), flush=True)))
    print(json.dumps({"rows": [asdict(r) for r in rows]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
