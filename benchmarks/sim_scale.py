"""How the researchers' simulator scales: one full epoch at 10, 100, 1,000 and 10,000 peers.

Each size runs in a fresh process (so its peak memory is its own): honest peers,
one epoch of 100 blocks, ``--requests-per-peer`` (3) requests per peer -- 30,000 at
10,000 peers, the issue's target of <= 60 s on one core -- then the epoch's
settlement, on the real ledger with real signatures (``--signatures keyed-hash``: the
stand-in of :mod:`sim.signatures`). The table gives wall time, CPU time (the
process's own, so a machine shared with other work inflates it less than the wall time),
peak resident memory, milliseconds per request and the local growth exponent k
(time ~ size^k between one size and the next); a size that would run past
``--budget-s`` by the previous one's exponent (at least 1) is projected, not run, and marked so.
``--profile`` prints the cProfile hot spots of the largest size run (profiled, so slower).

    OMP_NUM_THREADS=1 python benchmarks/sim_scale.py --plot sim_scale.png   # 10 .. 10,000, and the curve
    OMP_NUM_THREADS=1 python benchmarks/sim_scale.py --sizes 10,100,1000 --profile

Run it at a quiet moment: the table prints ``uptime``'s load beside the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_size(peers: int, requests: int, signatures: str, profile: bool) -> dict[str, float]:
    """Run one epoch of ``peers`` in this process; wall time, peak RSS, and maybe the profile."""
    sys.path.insert(0, str(ROOT))
    from sim.config import SimConfig
    from sim.world import Simulation

    config = SimConfig(seed=1, peers=peers, epochs=1, requests=requests, clients=100, churn=0.0, mix={},
                       signatures=signatures)
    profiler = cProfile.Profile() if profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    simulation = Simulation(config)
    simulation.run()
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    out = {"peers": peers, "requests": requests, "wall_s": wall, "cpu_s": cpu,
           "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        out["profile"] = text.getvalue()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="peer counts (default %(default)s)")
    parser.add_argument("--requests-per-peer", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="skip (and project) a size whose projected time exceeds this")
    parser.add_argument("--signatures", choices=("real", "keyed-hash"), default="real",
                        help="secp256k1, or the keyed hash standing in for it (default %(default)s)")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size run")
    parser.add_argument("--plot", type=Path, help="write the curve (time and memory against peers) to this PNG")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.child * args.requests_per_peer, args.signatures, args.profile)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"sim scale: one epoch of 100 blocks, {args.requests_per_peer} requests per peer, {args.signatures} "
          f"signatures (uptime: {_uptime()})")
    print(f"{'peers':>7} {'requests':>9} {'wall s':>9} {'cpu s':>7} {'ms/request':>11} {'peak MiB':>9} {'k':>5}",
          flush=True)
    rows: list[dict[str, float]] = []
    hot_spots = ""
    for peers in sizes:
        # At least linear: requests grow with peers. Between two tiny sizes the measured exponent
        # is noise (a fresh clone's first size pays cold caches; k came out small enough there
        # to run 100,000 peers instead of projecting them, for 600 s, until the test's timeout)
        k = max(1.0, _exponent(rows[-2], rows[-1])) if len(rows) >= 2 else None
        projected = rows[-1]["wall_s"] * (peers / rows[-1]["peers"]) ** k if k is not None else 0.0
        if projected > args.budget_s:
            row = {"peers": peers, "requests": peers * args.requests_per_peer, "wall_s": projected,
                   "cpu_s": float("nan"), "peak_mib": float("nan"), "projected": True}
        else:
            command = [sys.executable, __file__, "--child", str(peers),
                       "--requests-per-peer", str(args.requests_per_peer), "--signatures", args.signatures,
                       *(["--profile"] if args.profile else [])]
            row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
            hot_spots = row.pop("profile", hot_spots)
        growth = f"{_exponent(rows[-1], row):.2f}" if rows else ""
        rows.append(row)
        print(f"{peers:>7,} {int(row['requests']):>9,} {row['wall_s']:>9.1f} {row['cpu_s']:>7.1f} "
              f"{1000 * row['wall_s'] / max(row['requests'], 1):>11.2f} {row['peak_mib']:>9.0f} {growth:>5}"
              f"{_projection_note(rows[-2], peers) if projected > args.budget_s else ''}", flush=True)
    print("k: time ~ peers^k from the size above (requests grow with peers, so k = 2 is O(peers x requests));"
          " cpu s: the process's own CPU time, what one core would take on a machine shared with other work")
    print(f"uptime at the end: {_uptime()}")
    if args.plot:
        sys.path.insert(0, str(ROOT))
        from sim.plots import plot_scale

        print(f"curve: {plot_scale(rows, args.plot, f'One epoch of the simulator ({args.signatures} signatures)')}")
    if hot_spots:
        print(f"hot spots of the largest size run:\n{hot_spots}")


def _projection_note(last: dict[str, float], peers: int) -> str:
    """A projected size: by the last exponent measured (a floor: the share of the cost that is
    peers x requests grows with size), and by k = 2, that share's own growth (a ceiling)."""
    ceiling = last["wall_s"] * (peers / last["peers"]) ** 2
    return f"  (projected, not run; k = 2 would give {ceiling:,.0f} s)"


def _exponent(a: dict[str, float], b: dict[str, float]) -> float:
    return math.log(b["wall_s"] / a["wall_s"]) / math.log(b["peers"] / a["peers"])


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

if __name__ == "__main__":
    main()
