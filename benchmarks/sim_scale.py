"""How the researchers' simulator scales: one full epoch at 10, 100, 1,000 and 10,000 peers.

Each size runs in a fresh process (so its peak memory is its own): honest peers,
one epoch of 100 blocks, ``--requests-per-peer`` (3) requests per peer -- 30,000 at
10,000 peers, the issue's target of <= 60 s on one core -- then the epoch's
settlement, on the real ledger with real signatures (``--signatures keyed-hash``: the
stand-in of :mod:`sim.signatures`). The table gives wall time,
peak resident memory, milliseconds per request and the local growth exponent k
(time ~ size^k between one size and the next); a size that would run past
``--budget-s`` by the previous one's exponent is projected, not run, and marked so.
``--profile`` prints the cProfile hot spots of the largest size run (profiled, so slower).

    OMP_NUM_THREADS=1 python benchmarks/sim_scale.py            # 10 .. 10,000 (projected past the budget)
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
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    simulation = Simulation(config)
    simulation.run()
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    out = {"peers": peers, "requests": requests, "wall_s": wall,
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
    parser.add_argument("--budget-s", type=float, default=900.0,
                        help="skip (and project) a size whose projected time exceeds this")
    parser.add_argument("--signatures", choices=("real", "keyed-hash"), default="real",
                        help="secp256k1, or the keyed hash standing in for it (default %(default)s)")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_size(args.child, args.child * args.requests_per_peer, args.signatures, args.profile)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, object]] = []
    hot_spots = ""
    for peers in sizes:
        projected = None
        if len(rows) >= 2:
            a, b = rows[-2], rows[-1]
            k = math.log(float(b["wall_s"]) / float(a["wall_s"])) / math.log(int(b["peers"]) / int(a["peers"]))
            projected = float(b["wall_s"]) * (peers / int(b["peers"])) ** k
        if projected is not None and projected > args.budget_s:
            rows.append({"peers": peers, "requests": peers * args.requests_per_peer, "wall_s": projected,
                         "peak_mib": float("nan"), "projected": True})
            continue
        command = [sys.executable, __file__, "--child", str(peers),
                   "--requests-per-peer", str(args.requests_per_peer), "--signatures", args.signatures,
                   *(["--profile"] if args.profile else [])]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
        hot_spots = result.pop("profile", hot_spots)
        rows.append(result)
    if hot_spots:
        print(f"hot spots of the largest size run:\n{hot_spots}")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"sim scale: one epoch of 100 blocks, {args.requests_per_peer} requests per peer, {args.signatures} "
          f"signatures (uptime: {load})")
    print(f"{'peers':>7} {'requests':>9} {'wall s':>9} {'ms/request':>11} {'peak MiB':>9} {'k':>5}")
    for i, row in enumerate(rows):
        k = ""
        if i:
            k = f"{math.log(float(row['wall_s']) / float(rows[i - 1]['wall_s'])) / math.log(int(row['peers']) / int(rows[i - 1]['peers'])):.2f}"
        mark = "  (projected)" if row.get("projected") else ""
        print(f"{row['peers']:>7,} {row['requests']:>9,} {float(row['wall_s']):>9.1f} "
              f"{1000 * float(row['wall_s']) / max(int(row['requests']), 1):>11.2f} "
              f"{float(row['peak_mib']):>9.0f} {k:>5}{mark}")
    print("k: time ~ peers^k from the size above (requests grow with peers, so k = 2 is O(peers x requests))")


if __name__ == "__main__":
    main()
