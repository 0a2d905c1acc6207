"""The load generator: signed chat requests at a steady rate, round-robin over the participants.

Run by the harness inside the client namespace (``python -m
gonka_p2p.testnet.load ARGS.json``). A request is signed before it is sent,
so its inference id is known whatever happens next; each outcome is one
JSON line: ``ok`` (the whole answer arrived and the client library verified
every signature, position and the final hash) or ``error`` with the reason.
Either way the line carries the executor named in the signed start, the
number of verified tokens received and ``answer``: the response hash of
those token ids (what a committed ``FinishInference`` signs), so that the
judge can tell a request whose tokens all arrived but whose last frame was
lost from one charged for an answer the client never got. The ledger's side
of each request is judged later by the observer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from gonka_p2p.client import build_request
from gonka_p2p.identity import Keypair
from gonka_p2p.testnet.peers import Peers, append_jsonl, read_args
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id, response_hash
from gonka_p2p.wire.stream import StartedEvent, TokensEvent


async def one_request(peers: Peers, ta: int, n: int, args: dict[str, Any], out: Path) -> None:
    raw = build_request(peers.key, [("user", f"Count to three, request {n}.")], peers.chain_id,
                        model=args["model"], max_tokens=args["max_tokens"])
    record: dict[str, Any] = {"n": n, "ta": ta, "id": inference_id(open_envelope(raw, InferenceRequest)).hex(),
                              "sent": time.time()}
    token_ids: list[int] = []
    executor = ""

    async def stream() -> None:
        nonlocal executor
        async for event in (await peers.client(ta)).stream_request(raw, timeout=args["timeout_s"]):
            if isinstance(event, StartedEvent):
                executor = event.executor
            elif isinstance(event, TokensEvent):
                token_ids.extend(event.token_ids)

    try:
        await asyncio.wait_for(peers.ask(ta, lambda _: stream()), args["timeout_s"])
        record |= {"outcome": "ok"}
    except Exception as e:  # every failure is an outcome to record, none ends the load
        record |= {"outcome": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    append_jsonl(out, record | {"executor": executor, "tokens": len(token_ids),
                                "answer": response_hash(token_ids).hex(), "done": time.time()})


async def run(args: dict[str, Any]) -> None:
    out = Path(args["out"])
    key = Keypair.load(Path(args["key"]))
    async with Peers(key, args["ip"], args["addrs"], args["chain_id"]) as peers:
        interval, end = 1.0 / args["rate"], time.monotonic() + args["duration_s"]
        in_flight: set[asyncio.Task[None]] = set()
        n, next_at = 0, time.monotonic()
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            if len(in_flight) >= args["concurrency"]:
                append_jsonl(out, {"n": n, "outcome": "skipped", "sent": time.time()})
            else:
                task = asyncio.create_task(one_request(peers, n % len(args["addrs"]), n, args, out))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            n += 1
        await asyncio.gather(*in_flight)


if __name__ == "__main__":
    asyncio.run(run(read_args(sys.argv[1])))
