"""Ledger benchmark: 4 replicas over real libp2p on 127.0.0.1, under a load of signed transfers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ledger_bench.py        # three runs of 20 s (below)
    .venv/bin/python benchmarks/ledger_bench.py --runs 400:0.05 --duration 5   # a quick look

Topology: four **separate processes** (this file with ``--worker i``), each
one :class:`Replica` (consensus, mempool, SQLite store with
``synchronous=FULL``) on its own :class:`Libp2pService`, every pair
connected. Separate processes because that is how nodes run, and because
each Python process has one GIL: four replicas in one process would
measure the GIL. Each process also runs its share of the load generator
in-process: transfers between funded accounts, all signed *before* the
clock starts (signing is the client's cost, not the ledger's), submitted
with :meth:`Replica.submit` at ``rate / 4`` tx/s in 10 ms ticks. A
transaction's latency is from ``submit`` to the moment its block is stored
and applied on the replica it was submitted to.

Each run is ``RATE:FLUSH``: offered tx/s over all replicas, and the
replicas' ``tx_flush_s`` (at most one gossiped transaction batch per
replica per interval, the first at once; 0.2 s is the replicas' default,
0.05 s shows what small batches cost in py-libp2p CPU). The default runs
are 1,200 tx/s with 0.2 s and 0.05 s batching, then 600 and 300 tx/s.

Reported per run: committed tx/s (transactions committed over the window
from the first submit to the last commit), commit latency p50/p99, the
machine's load average around the run (it is shared: other work on it
slows every number here), and where each replica's time went -- stateless checks of
gossiped transactions (signatures), mempool admission and re-checks, block
building and validation, applying blocks, SQLite (blocks, and the synced
safety writes before each vote), waiting on gossip publication, and the
rest of the process's CPU (mostly py-libp2p: gossipsub, noise, yamux),
with how long heights took and how many rounds they needed.

Results go to ``--out`` (default ``benchmarks/results/ledger_bench.{md,json}``).
``BENCH_LOG=1`` writes each replica's debug log (heights, proposals,
timeouts) to ``worker<i>.log`` in the run's temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gonka_p2p.actors.replica import ReplicaParams  # noqa: E402
from gonka_p2p.identity import Keypair  # noqa: E402
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params, load_genesis, save_genesis  # noqa: E402

REPLICAS = 4
ACCOUNTS_PER_REPLICA = 64
CHAIN = "gonka-bench"
TICK_S = 0.01


def keys() -> tuple[list[Keypair], list[Keypair]]:
    validators = [Keypair.from_seed(f"bench-validator-{i}".encode()) for i in range(REPLICAS)]
    accounts = [Keypair.from_seed(f"bench-account-{i}".encode()) for i in range(REPLICAS * ACCOUNTS_PER_REPLICA)]
    return validators, accounts


# --------------------------------------------------------------------------- worker (one replica process)


async def worker(args: argparse.Namespace) -> None:
    if os.environ.get("BENCH_LOG"):
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("libp2p").setLevel(logging.WARNING)
        logging.getLogger("multiaddr").setLevel(logging.WARNING)
    from gonka_p2p.actors.replica import Replica
    from gonka_p2p.gossip.libp2p_service import Libp2pService
    from gonka_p2p.ledger.transactions import Transfer
    from gonka_p2p.wire.envelope import seal

    workdir = Path(args.dir)
    genesis = load_genesis(workdir / "genesis.json")
    validators, accounts = keys()
    me = validators[args.worker]
    mine = accounts[args.worker::REPLICAS]
    service = Libp2pService(me, "/ip4/127.0.0.1/tcp/0")
    await service.start()
    replica = Replica(service, me, genesis, workdir / f"replica{args.worker}",
                      ReplicaParams(commit_wait_s=args.commit_wait, tx_flush_s=args.flush))
    await replica.open()
    print("ADDR", service.listen_addrs[0], flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    peers = (await reader.readline()).decode().split()[1:]
    for addr in peers[:args.worker]:
        await service.connect(addr)

    # Sign the whole load before the clock starts.
    total = int(args.rate / REPLICAS * args.duration)
    txs = []
    for n in range(total):
        sender = mine[n % len(mine)]
        to = accounts[(accounts.index(sender) + 1) % len(accounts)]
        txs.append(seal(Transfer(chain_id=CHAIN, to=to.peer_id, amount=1, sequence=n // len(mine)), sender))

    run = asyncio.create_task(replica.run())
    print("READY", flush=True)
    await reader.readline()  # GO
    submitted: dict[bytes, float] = {}
    latencies: list[float] = []
    commit_times: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    metrics0 = asdict(replica.metrics)

    def done(tx_hash: bytes, future: asyncio.Future) -> None:  # type: ignore[type-arg]
        if not future.cancelled() and future.exception() is None:
            now = time.perf_counter()
            latencies.append(now - submitted[tx_hash])
            commit_times.append(now)

    per_tick = args.rate / REPLICAS * TICK_S
    sent = 0
    refused = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - t0) / TICK_S * per_tick) + 1)
        while sent < due:
            raw = txs[sent]
            sent += 1
            try:
                tx_hash = replica.submit(raw)
            except Exception:  # noqa: BLE001 - counted and reported
                refused += 1
                continue
            submitted[tx_hash] = time.perf_counter()
            future = asyncio.ensure_future(replica.wait_for_commit(tx_hash))
            future.add_done_callback(lambda f, h=tx_hash: done(h, f))
        await asyncio.sleep(TICK_S)
    load_end = time.perf_counter()
    deadline = load_end + args.drain
    while len(latencies) < len(submitted) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    cpu = time.process_time() - cpu0
    metrics = {k: v - metrics0[k] for k, v in asdict(replica.metrics).items()}
    result = {
        "worker": args.worker, "submitted": len(submitted), "refused": refused, "committed": len(latencies),
        "start": t0, "load_end": load_end, "last_commit": max(commit_times, default=t0),
        "latencies": [round(x, 4) for x in latencies], "cpu_s": cpu, "metrics": metrics, "height": replica.height,
    }
    print("RESULT", json.dumps(result), flush=True)
    await reader.readline()  # STOP: everybody has reported, so nobody loses a peer mid-measurement
    print("HASH", replica.height, (replica.app_hash_at(replica.height) or b"").hex(), flush=True)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await replica.close()
    await service.stop()


# --------------------------------------------------------------------------- orchestrator


async def expect(proc: asyncio.subprocess.Process, word: str, timeout: float) -> str:
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        if not line:
            raise RuntimeError(f"a worker exited while we waited for {word}")
        if line.startswith(word + " ") or line.strip() == word:
            return line[len(word):].strip()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


async def orchestrate(args: argparse.Namespace, rate: float, flush: float) -> dict:  # type: ignore[type-arg]
    workdir = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    validators, accounts = keys()
    genesis = Genesis(chain_id=CHAIN, params=Params(price_per_token={"m": 1}, epoch_length_blocks=10_000),
                      participants=tuple(GenesisParticipant(k.public_key, 10) for k in validators),
                      allocations={a.peer_id: 10**12 for a in accounts})
    save_genesis(genesis, workdir / "genesis.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", str(i), "--dir", str(workdir), "--rate", str(rate),
        "--duration", str(args.duration), "--drain", str(args.drain), "--commit-wait", str(args.commit_wait),
        "--flush", str(flush), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=open(workdir / f"worker{i}.log", "wb"), env=env, limit=1 << 26) for i in range(REPLICAS)]
    load_before = os.getloadavg()[0]
    try:
        addrs = [await expect(p, "ADDR", 60) for p in procs]
        for p in procs:
            p.stdin.write(("PEERS " + " ".join(addrs) + "\n").encode())  # type: ignore[union-attr]
        for p in procs:
            await expect(p, "READY", 300)
        await asyncio.sleep(3)  # gossip meshes form on the 1 s heartbeat
        for p in procs:
            p.stdin.write(b"GO\n")  # type: ignore[union-attr]
        results = [json.loads(await expect(p, "RESULT", args.duration + args.drain + 120)) for p in procs]
        for p in procs:
            p.stdin.write(b"STOP\n")  # type: ignore[union-attr]
        hashes = [await expect(p, "HASH", 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    await asyncio.wait_for(p.wait(), 30)
                except TimeoutError:
                    p.kill()
    summary = summarize(results, hashes)
    summary.update(rate_offered=rate, flush_s=flush, duration_s=args.duration, commit_wait_s=args.commit_wait,
                   load_average=(load_before, os.getloadavg()[0]))
    return summary


def summarize(results: list[dict], hashes: list[str]) -> dict:  # type: ignore[type-arg]
    latencies = [x for r in results for x in r["latencies"]]
    start = min(r["start"] for r in results)  # perf_counter is CLOCK_MONOTONIC: comparable across processes
    end = max(r["last_commit"] for r in results)
    committed = sum(r["committed"] for r in results)
    per_replica = []
    for r in results:
        m = r["metrics"]
        accounted = m["tx_checks_s"] + m["mempool_s"] + m["build_s"] + m["validate_s"] + m["apply_s"]
        per_replica.append({
            "replica": r["worker"], "cpu_s": r["cpu_s"], "tx_checks_s": m["tx_checks_s"],
            "mempool_s": m["mempool_s"], "build_validate_s": m["build_s"] + m["validate_s"],
            "apply_s": m["apply_s"], "sqlite_blocks_s": m["store_block_s"] + m["snapshot_s"],
            "sqlite_safety_s": m["store_safety_s"], "safety_writes": m["safety_writes"],
            "publish_wait_s": m["publish_s"], "other_cpu_s": max(0.0, r["cpu_s"] - accounted),
            "gossip_out": m["consensus_published"] + m["batches_published"],
            "batches_in": m["batches_checked"], "heights": m["heights"], "rounds": m["rounds"],
            "rebuilt": m["proposals_rebuilt"], "fetched": m["bodies_fetched"],
            "height_ms": 1000 * m["height_s"] / max(1, m["heights"]),
            "to_prevote_ms": 1000 * m["to_prevote_s"] / max(1, m["phased_heights"]),
            "to_precommit_ms": 1000 * m["to_precommit_s"] / max(1, m["phased_heights"]),
            "to_decision_ms": 1000 * m["to_decision_s"] / max(1, m["phased_heights"]),
            "store_ms": 1000 * m["store_block_s"] / max(1, m["heights"] + m["catchup_blocks"]),
            "commit_ms": 1000 * m["commit_s"] / max(1, m["heights"]),
        })
    summary = {
        "submitted": sum(r["submitted"] for r in results),
        "refused": sum(r["refused"] for r in results), "committed": committed,
        "window_s": end - start, "committed_tx_per_s": committed / (end - start),
        "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies, default=float("nan")),
        "mean_txs_per_block": committed / max(1, statistics.mean(p["heights"] for p in per_replica)),
        "final_heights_and_hashes": hashes, "replicas": per_replica,
        "cores": os.cpu_count(),
    }
    return summary


def render(runs: list[dict]) -> str:  # type: ignore[type-arg]
    lines = [
        f"# Ledger benchmark: {REPLICAS} replica processes over libp2p on 127.0.0.1 ({runs[0]['cores']} cores)",
        "",
        "| offered tx/s | tx flush | committed tx/s | p50 ms | p99 ms | txs/block | ms/height | extra rounds | "
        "load avg (before, after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in runs:
        r = s["replicas"]
        lines.append(
            f"| {s['rate_offered']:.0f} | {s['flush_s']} s | {s['committed_tx_per_s']:.0f} | "
            f"{s['latency_p50_s'] * 1000:.0f} | {s['latency_p99_s'] * 1000:.0f} | {s['mean_txs_per_block']:.0f} | "
            f"{statistics.mean(x['height_ms'] for x in r):.0f} | {sum(x['rounds'] for x in r)} | "
            f"{s['load_average'][0]:.1f}, {s['load_average'][1]:.1f} |")
    for s in runs:
        lines += ["", *render_run(s)]
    return "\n".join(lines) + "\n"


def render_run(s: dict) -> list[str]:  # type: ignore[type-arg]
    lines = [
        f"## {s['rate_offered']:.0f} tx/s offered for {s['duration_s']} s, tx flush {s['flush_s']} s",
        "",
        f"commit_wait {s['commit_wait_s']} s; submitted {s['submitted']}, refused {s['refused']}, "
        f"committed {s['committed']}",
        "",
        f"**committed {s['committed_tx_per_s']:.0f} tx/s** over {s['window_s']:.1f} s; "
        f"commit latency **p50 {s['latency_p50_s'] * 1000:.0f} ms**, p99 {s['latency_p99_s'] * 1000:.0f} ms, "
        f"max {s['latency_max_s'] * 1000:.0f} ms; {s['mean_txs_per_block']:.0f} txs per block",
        "",
        "Where each replica's time went, in seconds over the load window. CPU: the process's total, "
        "then by part -- signature and schema checks of gossiped transactions, mempool admission and "
        "re-checks, building and validating blocks, applying them; `rest` is everything else, mostly "
        "py-libp2p (gossipsub, noise, yamux) and the in-process load generator. Waits (wall time): "
        "SQLite commits of blocks and of the safety state (synced before each vote), gossip publication, "
        "and the mean time from a height's start to its commit. Gossip: messages this replica published "
        "(consensus and transaction batches) / transaction batches it received, duplicates included; "
        "large proposals rebuilt from the mempool / fetched by stream.",
        "",
        "| replica | CPU | sig checks | mempool | build+validate | apply | rest | SQLite blocks | "
        "SQLite safety (writes) | publish wait | gossip out / batches in | proposals rebuilt / fetched | "
        "heights | rounds | ms/height |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["replicas"]:
        lines.append(
            f"| {r['replica']} | {r['cpu_s']:.1f} | {r['tx_checks_s']:.2f} | {r['mempool_s']:.2f} | "
            f"{r['build_validate_s']:.2f} | {r['apply_s']:.2f} | {r['other_cpu_s']:.1f} | "
            f"{r['sqlite_blocks_s']:.2f} | {r['sqlite_safety_s']:.2f} ({r['safety_writes']}) | "
            f"{r['publish_wait_s']:.2f} | {r['gossip_out']} / {r['batches_in']} | "
            f"{r['rebuilt']} / {r['fetched']} | {r['heights']} | "
            f"{r['rounds']} | {r['height_ms']:.0f} |")
    lines += [
        "",
        "A height, phase by phase (mean ms over the heights where the replica signed both votes): from its "
        "start to the replica's prevote (the proposal built or gossiped, rebuilt, validated, and the "
        "safety state synced), to its precommit (> 2/3 prevotes heard), to the decision (> 2/3 precommits "
        "heard), then the block stored (synced) and the rest of the commit (apply, mempool re-check).",
        "",
        "| replica | to prevote | to precommit | to decision | store block | rest of commit |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["replicas"]:
        lines.append(f"| {r['replica']} | {r['to_prevote_ms']:.0f} | {r['to_precommit_ms']:.0f} | "
                     f"{r['to_decision_ms']:.0f} | {r['store_ms']:.0f} | {r['commit_ms'] - r['store_ms']:.0f} |")
    lines += ["", "final (height, app hash) per replica: " + "; ".join(s["final_heights_and_hashes"])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["1200:0.2", "1200:0.05", "600:0.2", "300:0.2"],
                        help="RATE:FLUSH per run: offered tx/s over all replicas, ReplicaParams.tx_flush_s")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    parser.add_argument("--drain", type=float, default=15.0, help="seconds to wait for the last commits")
    parser.add_argument("--commit-wait", type=float, default=0.0, help="ReplicaParams.commit_wait_s")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ledger_bench"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--flush", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        asyncio.run(worker(args))
        return
    runs = []
    for spec in args.runs:
        rate, _, flush = spec.partition(":")
        runs.append(asyncio.run(orchestrate(args, float(rate), float(flush or ReplicaParams().tx_flush_s))))
        print(*render_run(runs[-1]), sep="\n", flush=True)
    text = render(runs)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
