"""What one token frame costs in py-libp2p, with our corrections and without, side by side.

    .venv/bin/python benchmarks/frame_cost.py                          # ~1 minute
    .venv/bin/python benchmarks/frame_cost.py --frames 200 --rounds 1  # smoke

A sender process streams ``--frames`` frames of 300 bytes (about a one-token
``TokenBatch`` with top-5 evidence) on one stream to a reader process, paced
like a decoding engine (4 frames, then 1 ms), over real ``Libp2pService``
hosts on 127.0.0.1. Each process reports the CPU time (user + system) it
spent per frame, and the reader how many WINDOW_UPDATE frames it sent.

Two variants, alternating round by round so a busy machine hits both alike:

* ``ours`` -- the hosts as the network runs them (``gossip/libp2p_patches``);
* ``upstream`` -- py-libp2p 0.8.1's own yamux credit (a WINDOW_UPDATE for
  nearly every frame read) and TCP reads (two ``recv`` per noise message)
  put back in both processes.

Every relayed token pays this twice per hop (the executor's send, the TA's
read and send, the client's read), on the same cores as the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTOCOL = "/gonka/execute/1"
FRAME = bytes(300)
VARIANTS = ("ours", "upstream")


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _use_upstream() -> None:
    """Rebind py-libp2p's names to its own classes again (our subclasses are built on them)."""
    from libp2p.io import trio as py_trio_io
    from libp2p.stream_muxer.yamux import yamux as py_yamux
    from libp2p.transport.tcp import tcp as py_tcp

    from gonka_p2p.gossip import libp2p_yamux as patches

    py_yamux.YamuxStream = patches.HalfWindowCreditStream.__base__  # type: ignore[misc]
    py_trio_io.TrioTCPStream = py_tcp.TrioTCPStream = patches.ReadAheadTCPStream.__base__  # type: ignore[misc]


async def _worker(role: str, frames: int, addr: str | None) -> None:
    import asyncio

    from libp2p.stream_muxer.yamux import yamux as py_yamux

    from gonka_p2p.gossip.libp2p_service import Libp2pService
    from gonka_p2p.identity import Keypair

    host = Libp2pService(Keypair.generate())
    await host.start()
    if role == "send":
        done = asyncio.Event()

        async def stream(opener: str, request: bytes, send: object) -> None:
            start = _cpu_s()
            for i in range(frames):
                await send(FRAME)  # type: ignore[operator]
                if i % 4 == 3:
                    await asyncio.sleep(0.001)
            print(json.dumps({"cpu_us": (_cpu_s() - start) / frames * 1e6}), flush=True)
            done.set()

        host.set_stream_handler(PROTOCOL, stream)
        print(json.dumps({"addr": f"{host.listen_addrs[0]}/p2p/{host.peer_id}"}), flush=True)
        await done.wait()
        await asyncio.sleep(0.5)  # the end marker reaches the reader
    else:
        assert addr is not None
        updates = 0
        real_update = py_yamux.YamuxStream.send_window_update

        async def counted(stream: object, increment: int, skip_lock: bool = False) -> None:
            nonlocal updates
            updates += 1
            await real_update(stream, increment, skip_lock)  # type: ignore[arg-type]

        py_yamux.YamuxStream.send_window_update = counted  # type: ignore[method-assign]
        peer = await host.connect(addr)
        start, n = _cpu_s(), 0
        async for frame in host.open_stream(peer, PROTOCOL, b"go"):
            assert frame == FRAME
            n += 1
        print(json.dumps({"cpu_us": (_cpu_s() - start) / n * 1e6, "frames": n, "updates": updates}), flush=True)
    await host.stop()


def _spawn(variant: str, role: str, frames: int, addr: str | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, "--worker", role, "--variant", variant, "--frames", str(frames)]
    if addr:
        args += ["--addr", addr]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _one_round(variant: str, frames: int) -> dict[str, float]:
    sender = _spawn(variant, "send", frames)
    try:
        assert sender.stdout is not None
        addr = json.loads(sender.stdout.readline())["addr"]
        reader = _spawn(variant, "read", frames, addr)
        read_out, _ = reader.communicate(timeout=300)
        sent = json.loads(sender.stdout.readline())
        sender.wait(timeout=30)
    finally:
        sender.kill()
    read = json.loads(read_out.strip().splitlines()[-1])
    if reader.returncode != 0 or read["frames"] != frames:
        raise SystemExit(f"{variant}: the reader failed (exit {reader.returncode}, {read})")
    return {"send": sent["cpu_us"], "read": read["cpu_us"], "updates": read["updates"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=3000, help="frames per stream")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both variants")
    p.add_argument("--worker", choices=("send", "read"), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="ours", help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        import asyncio

        if a.variant == "upstream":
            _use_upstream()
        asyncio.run(_worker(a.worker, a.frames, a.addr))
        return 0

    from rich.console import Console
    from rich.table import Table

    load_before = os.getloadavg()[0]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            results[variant].append(_one_round(variant, a.frames))
    table = Table(title=f"CPU per 300-byte frame, median of {a.rounds} round(s) of {a.frames} frames")
    for column in ("variant", "sender us/frame", "reader us/frame", "both us/frame",
                   "window updates per 1000 frames", "both vs upstream"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    med = {v: {k: statistics.median(x[k] for x in rows) for k in ("send", "read", "updates")}
           for v, rows in results.items()}
    upstream_both = med["upstream"]["send"] + med["upstream"]["read"]
    for variant in VARIANTS:
        m = med[variant]
        both = m["send"] + m["read"]
        table.add_row(variant, f"{m['send']:.0f}", f"{m['read']:.0f}", f"{both:.0f}",
                      f"{m['updates'] / a.frames * 1000:.0f}", f"{both / upstream_both:.0%}")
    Console().print(table)
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
