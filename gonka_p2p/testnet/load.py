"""The load generator: signed chat requests at a steady rate, round-robin over the participants
(those that left for good are passed over from their ``leaves`` time on: a client of a TA that
left picks another, and 44 of run 26's 100 failures were requests sent to the one that had).

Run by the harness inside the client namespace (``python -m
gonka_p2p.testnet.load ARGS.json``). A share of the requests (``http_share``,
spread evenly) goes through the TA's OpenAI gateway with the official
``openai`` SDK, streamed every other one; the rest through the libp2p client
library. Either way a request is signed before it is sent, so its inference
id is known whatever happens next, and each outcome is one JSON line: ``ok``
(the whole answer arrived verified) or ``error`` with the reason. The line
carries the executor named in the signed start, the number of verified
tokens received, ``via`` (``libp2p`` or ``http``) and, on the libp2p path,
``answer``: the response hash of those token ids (what a committed
``FinishInference`` signs), so that the judge can tell a request whose tokens
all arrived but whose last frame was lost from one charged for an answer the
client never got. The HTTP API shows text, not token ids, so an HTTP line has
no ``answer``: the gateway verified every frame (signer, position, final
hash) before passing it on, and the judge compares the executor and the
token count (the usage of a finished answer; of a cut one, its logprobs
entries, where special tokens such as the end of sequence are not shown, so
a cut answer that ended in one reads one token short). ``hung`` marks a request that reached ``timeout_s`` without
an end: neither the TA's stall timeout nor the client's ``idle_s`` cut it. A libp2p request whose
stream broke is then recovered by the client library from the ledger and the executor's kept
answer, for at most the manifest's ``recovery_s`` (before its first frame only if some executor
started: the ledger says within the client's grace); it hangs only past both bounds
(on a chain slowed to a block every 40 s, the 30-minute run called recovering clients hung). So is
one whose TA said, after the start, that its relay to the executor failed (``AnswerInDoubt``): in
a partition the executor may finish and be paid beyond the cut (the short scenario lost a request
so); the line then says ``in_doubt``, and ``recovered`` if the answer came. An HTTP request's
answer is recovered the same way by the TA's gateway (``--answer-recovery``, set to ``recovery_s``),
so it too hangs only past both bounds.
The ledger's side of each request is judged later by the observer.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import openai

from gonka_p2p.client import AnswerInDoubt, GonkaClient, build_request
from gonka_p2p.identity import Keypair
from gonka_p2p.openai.auth import REQUEST_HEADER, parse_body
from gonka_p2p.testnet.peers import Peers, append_jsonl, read_args
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id, response_hash
from gonka_p2p.wire.stream import StartedEvent, StreamEvent, TokensEvent


def prompt(n: int) -> list[tuple[str, str]]:
    return [("user", f"Count to three, request {n}.")]


def via_http(n: int, share: float) -> bool:
    """Whether request ``n`` goes through the gateway: ``share`` of them, spread evenly."""
    return int((n + 1) * share) > int(n * share)


async def libp2p_request(peers: Peers, ta: int, n: int, args: dict[str, Any]) -> dict[str, Any]:
    raw = build_request(peers.key, prompt(n), peers.chain_id, model=args["model"], max_tokens=args["max_tokens"])
    record: dict[str, Any] = {"id": inference_id(open_envelope(raw, InferenceRequest)).hex(), "via": "libp2p"}
    token_ids: list[int] = []

    def take(event: StreamEvent) -> None:
        if isinstance(event, StartedEvent):
            record["executor"] = event.executor
        elif isinstance(event, TokensEvent):
            token_ids.extend(event.token_ids)

    async def stream(client: GonkaClient) -> None:
        try:
            async for event in client.stream_request(raw, timeout=args["idle_s"],
                                                          recovery_timeout=args["recovery_s"]):
                take(event)
        except AnswerInDoubt as doubt:  # the executor may have finished beyond a cut relay
            record["in_doubt"] = f"{doubt.code}: {doubt}"[:300]
            for event in await client.recover(doubt, timeout=args["recovery_s"]):
                take(event)
            record["recovered"] = True

    try:
        await bounded(peers.ask(ta, stream), args["timeout_s"] + args["recovery_s"], record)
    finally:
        record |= {"tokens": len(token_ids), "answer": response_hash(token_ids).hex()}
    return record


async def http_request(key: Keypair, chain_id: str, url: str, n: int, args: dict[str, Any]) -> dict[str, Any]:
    """One chat request through the gateway at ``url`` with the ``openai`` SDK: the envelope signed
    here (what ``GonkaAuth`` would sign) so that its id is known before it is sent; no SDK retry,
    since a resent envelope is a replay."""
    stream = n % 2 == 0
    body = {"model": args["model"], "messages": [{"role": r, "content": c} for r, c in prompt(n)],
            "max_tokens": args["max_tokens"], "logprobs": True, "top_logprobs": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    envelope = parse_body("chat", body).sign(key, chain_id)
    record: dict[str, Any] = {"id": inference_id(open_envelope(envelope, InferenceRequest)).hex(),
                              "via": "http", "stream": stream, "tokens": 0}
    # A whole answer sends no byte before its end, so only the hang bound covers it; a stream is cut
    # after idle_s of silence, as the libp2p client cuts a silent TA.
    timeout = httpx.Timeout(args["idle_s"] if stream else None, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as http:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", http_client=http, max_retries=0)
        headers = {REQUEST_HEADER: base64.b64encode(envelope).decode()}

        async def ask() -> None:
            raw = await client.chat.completions.with_raw_response.create(
                **body, extra_headers=headers)  # type: ignore[call-overload]
            record["executor"] = raw.headers.get("x-gonka-executor", "")
            answer = raw.parse()
            if not stream:
                record["tokens"] = answer.usage.completion_tokens
                return
            async for chunk in answer:
                for choice in chunk.choices:
                    record["tokens"] += len(choice.logprobs.content or []) if choice.logprobs else 0
                if chunk.usage is not None:  # the last chunk: the count special tokens included
                    record["tokens"] = chunk.usage.completion_tokens

        await bounded(ask(), args["timeout_s"] + args["recovery_s"], record)  # the gateway recovers too
    return record


async def bounded(question: Awaitable[None], timeout_s: float, record: dict[str, Any]) -> None:
    """Await ``question``; its outcome goes into ``record``. Running into ``timeout_s`` is a hang."""
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            await question
        record["outcome"] = "ok"
    except Exception as e:  # every failure is an outcome to record, none ends the load
        hung = isinstance(e, TimeoutError) and deadline.expired()
        record |= {"outcome": "error", "error": "no end within the request's timeout" if hung else
                   f"{type(e).__name__}: {e}"[:300], "hung": hung}


async def one_request(peers: Peers, ta: int, n: int, args: dict[str, Any], out: Path) -> None:
    sent = time.time()
    if via_http(n, args["http_share"]) and args["http"][ta]:  # "": a TA behind a NAT, no gateway to reach
        record = await http_request(peers.key, peers.chain_id, args["http"][ta], n, args)
    else:
        record = await libp2p_request(peers, ta, n, args)
    append_jsonl(out, {"n": n, "ta": ta, "sent": sent, "executor": "", **record, "done": time.time()})


def next_ta(tas: list[int], n: int, leaves: dict[int, float], elapsed_s: float) -> int:
    """Request ``n``'s TA: the round-robin's, or the next one that has not left by ``elapsed_s``."""
    staying = [ta for ta in tas if leaves.get(ta, float("inf")) > elapsed_s] or tas
    return staying[n % len(staying)]


async def run(args: dict[str, Any]) -> None:
    out = Path(args["out"])
    key = Keypair.load(Path(args["key"]))
    async with Peers(key, args["ip"], args["addrs"], args["chain_id"]) as peers:
        started = time.monotonic()
        interval, end = 1.0 / args["rate"], started + args["duration_s"]
        in_flight: set[asyncio.Task[None]] = set()
        n, next_at = 0, started
        leaves = {int(ta): at_s for ta, at_s in args.get("leaves", {}).items()}
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            if len(in_flight) >= args["concurrency"]:
                append_jsonl(out, {"n": n, "outcome": "skipped", "sent": time.time()})
            else:
                ta = next_ta(args["tas"], n, leaves, time.monotonic() - started)
                task = asyncio.create_task(one_request(peers, ta, n, args, out))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            n += 1
        await asyncio.gather(*in_flight)


if __name__ == "__main__":
    asyncio.run(run(read_args(sys.argv[1])))
