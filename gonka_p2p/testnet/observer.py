"""The observer: what each participant's replica says, over its client protocol, during and after a run.

Run by the harness inside the observer namespace. ``watch`` polls every
participant's status (height, epoch, app hash, equivocations seen, every
participant's weight) once per interval and writes one JSON line per answer
or failure, until the harness stops it; the invariant checker reads from
these lines whether replicas agreed at each height, how long the network
took to commit again after each perturbation, and when a joiner gained
weight and a leaver lost it. ``settle`` asks the ledger about every request
the load generator sent, until none is still running (or ``settle_s``
passes), and writes the final statuses.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from gonka_p2p.identity import Keypair
from gonka_p2p.testnet.peers import Peers, append_jsonl, read_args

UNRESOLVED = ("started", "finished")  # a status that will still change


async def watch(peers: Peers, out: Path, interval: float) -> None:
    async def poll(i: int) -> None:
        try:
            s = await asyncio.wait_for(peers.ask(i, lambda c: c.status()), 5.0)
            append_jsonl(out, {"t": time.time(), "node": i, "height": s.height, "app_hash": s.app_hash.hex(),
                               "evidence": s.evidence, "epoch": s.epoch,
                               "weights": {p.peer_id: p.weight for p in s.participants}})
        except Exception as e:  # a node down, frozen or cut off is an observation, not an end
            append_jsonl(out, {"t": time.time(), "node": i, "error": type(e).__name__})

    while True:
        started = time.monotonic()
        await asyncio.gather(*(poll(i) for i in range(len(peers.addrs))))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def ledger_status(peers: Peers, inference_id: bytes) -> dict[str, Any] | None:
    """The first answering participant's record of the inference; None when none answers."""
    for i in range(len(peers.addrs)):
        try:
            r = await asyncio.wait_for(peers.ask(i, lambda c: c.inference(inference_id)), 10.0)
        except Exception:
            continue
        return {"status": r.status if r.found else "absent", "executor": r.executor, "cost": r.cost,
                "escrow": r.escrow, "height": r.height, "asked": i}
    return None


async def settle(peers: Peers, requests: Path, out: Path, settle_s: float) -> None:
    sent = [json.loads(line) for line in requests.read_text().splitlines() if line.strip()]
    ids = [r["id"] for r in sent if "id" in r]
    final: dict[str, dict[str, Any] | None] = {}
    deadline = time.monotonic() + settle_s
    while True:
        for rid in ids:
            if final.get(rid) is None or final[rid]["status"] in UNRESOLVED:  # type: ignore[index]
                final[rid] = await ledger_status(peers, bytes.fromhex(rid))
        pending = [r for r in ids if final[r] is None or final[r]["status"] in UNRESOLVED]  # type: ignore[index]
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(3.0)
    nodes = []
    for i in range(len(peers.addrs)):
        try:
            s = await asyncio.wait_for(peers.ask(i, lambda c: c.status()), 10.0)
            nodes.append({"node": i, "height": s.height, "evidence": s.evidence})
        except Exception as e:
            nodes.append({"node": i, "error": type(e).__name__})
    out.write_text(json.dumps({"inferences": final, "nodes": nodes}))


async def main(mode: str, args: dict[str, Any]) -> None:
    key = Keypair.load(Path(args["key"]))
    async with Peers(key, args["ip"], args["addrs"], args["chain_id"]) as peers:
        if mode == "watch":
            await watch(peers, Path(args["out"]), args["interval"])
        else:
            await settle(peers, Path(args["requests"]), Path(args["out"]), args["settle_s"])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], read_args(sys.argv[2])))
