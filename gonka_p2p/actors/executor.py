"""The executor actor: runs a TA's order through the engine and streams signed evidence.

Protocol ``/gonka/execute/1``: one request frame (an :class:`ExecuteOrder`
signed by the TA that opened the stream, wrapping the client's signed
request), then response frames, each signed by this executor:
``InferenceStarted``, ``TokenBatch``... and ``InferenceFinished``, or an
``InferenceFailed`` at any point. The executor re-verifies the client's
signature itself: it never runs a request a client did not sign.

Signed requests are public (every ``StartInference`` in a block carries one),
so a valid signature does not make an order paid work. Before any compute the
executor refuses, each with its own code: a request for another network
(``wrong_chain``), an order whose signer is not a registered participant on
the committed ledger (``unknown_ta``: nobody could be charged for it), an
order this node is not the ledger's executor draw for at any attempt the
ledger allows (``not_drawn``: the ledger would refuse the TA's Start naming
it, so the work would go unpaid), a request outside the freshness window
(``stale``), one already started on the ledger or already taken here within
the window (``replay``) -- the last three are the checks of
``actors/admission.py``, which the TA makes too. Tokens go
out as the engine makes them, one per frame while the stream keeps up and
batched when it falls behind (:class:`TokenBatches`), with incrementally
decoded text (:class:`TextStream`).

The artifact (prompt ids, per-token evidence, parameters, seed) is kept, with
the client's signed request, in the node's :class:`ArtifactStore`, served to
validators (``actors/artifact_server.py``); the last frame carries the prompt
ids so that the relaying TA can keep a copy too. ``on_finished`` is the seam
where the ledger's ``FinishInference`` is submitted -- off the client's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from gonka_p2p.actors.admission import Rejected, ReplayGuard, check_request
from gonka_p2p.actors.artifact_store import ArtifactStore, EvidenceStoreFull
from gonka_p2p.gossip.service import NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine, EngineError, TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.executor_draw import is_drawn, may_execute
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import (
    MAX_ADDRS,
    ExecuteOrder,
    InferenceFailed,
    InferenceFinished,
    InferenceRequest,
    InferenceStarted,
    TokenBatch,
    inference_id,
    response_hash,
)
from gonka_p2p.wire.protocols import EXECUTE_PROTOCOL
from gonka_p2p.wire.schema import WireError

log = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 256  # per TokenBatch frame when a stream catches up (wire limit: 4096)
STREAMS_PER_HELD_TOKEN = 8  # under load, each frame after the first holds one more token per this many streams
MAX_HELD_TOKENS = 4  # ... up to this many


def tokens_per_frame(streams: int) -> int:
    """How many tokens each TokenBatch after the first waits for, with ``streams`` answers
    streaming from this executor. Every frame is signed here, then read, verified and sent
    again by the TA and read and verified by the client, on the cores (and, here, under the
    GIL) the engine decodes on: at 32 streams that cost a tenth of the engine's tokens/s
    (benchmarks/serving_bench.py). A frame of k tokens costs about what one of 1 costs, and
    delays a token by at most k - 1 engine steps; the first token never waits, so TTFT is
    untouched, and below STREAMS_PER_HELD_TOKEN streams nothing waits at all."""
    return min(MAX_HELD_TOKENS, 1 + streams // STREAMS_PER_HELD_TOKEN)

FinishedHook = Callable[[Signed[InferenceRequest], InferenceArtifact, bytes], Awaitable[None]]


def sampling_params(req: InferenceRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p or 1.0,
        top_k=req.top_k, logprobs_k=req.logprobs_k,
    )


class ExecutorActor:
    def __init__(
        self,
        service: NetworkService,
        key: Keypair,
        engines: dict[str, Engine],
        artifacts: ArtifactStore,
        chain_id: str,
        max_concurrent: int = 16,
        on_finished: FinishedHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._key = key
        self.engines = engines
        self.artifacts = artifacts
        self.chain_id = chain_id
        self._slots = asyncio.Semaphore(max_concurrent)
        self._streaming = 0  # answers being generated and sent now
        self._on_finished = on_finished
        self._clock = clock
        self._ledger: LedgerState | None = None
        self._taken = ReplayGuard()  # requests run (or running) here within the window
        self.served = 0

    def start(self) -> None:
        self._service.set_stream_handler(EXECUTE_PROTOCOL, self._handle)

    def on_commit(self, state: LedgerState) -> None:
        """Commit listener: orders are checked against the committed state (read synchronously)."""
        self._ledger = state

    def _fail(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)

    async def _handle(self, opener: str, frame: bytes, send: SendFrame) -> None:
        try:
            order = open_envelope(frame, ExecuteOrder)
            request = open_envelope(order.message.request, InferenceRequest)
        except WireError as e:
            await send(self._fail(e.code, f"executor rejected the order: {e}"))
            return
        if order.signer_id != opener:
            await send(self._fail("bad_signature", "order not signed by the peer that sent it"))
            return
        engine = self.engines.get(request.message.model)
        try:
            # No await from here to the guard's record: two copies of one order cannot both pass.
            self._refuse_unpaid(opener, request)
            if engine is None:
                raise Rejected("unknown_model", f"this executor does not serve {request.message.model!r}")
            if self._slots.locked():
                raise Rejected("overloaded", "executor is at capacity")
            if self.artifacts.full:  # it could not keep the evidence, and unproven work is punished
                raise Rejected("overloaded", "executor's evidence store is full")
            inference_id = check_request(request, self.chain_id, self._ledger, self._taken,
                                         int(self._clock() * 1000))
        except Rejected as e:
            await send(self._fail(e.code, str(e)))
            return
        async with self._slots:
            self._streaming += 1
            try:
                await self._run(engine, opener, request, inference_id, send)
            finally:
                self._streaming -= 1

    def _refuse_unpaid(self, ta: str, request: Signed[InferenceRequest]) -> None:
        """Raise Rejected unless the ledger would accept ``ta``'s StartInference naming this node."""
        ledger = self._ledger
        if ledger is None:  # an ad-hoc network charges nothing: anyone may order
            return
        if ta not in ledger.registry:
            raise Rejected("unknown_ta", f"{ta} is not a participant of {self.chain_id!r}: "
                                         "it cannot start the inference it orders")
        iid, me, model, height = inference_id(request), self._key.peer_id, request.message.model, ledger.height + 1
        if not may_execute(ledger, me) or not any(
                is_drawn(ledger, model, ta, iid, attempt, me, height)
                for attempt in range(ledger.params.max_executor_attempts)):
            raise Rejected("not_drawn", "the ledger's executor draw for this request is another "
                                        f"executor at every attempt up to {ledger.params.max_executor_attempts}")

    async def _run(self, engine: Engine, ta: str, request: Signed[InferenceRequest],
                   inference_id: bytes, send: SendFrame) -> None:
        req = request.message
        try:
            params = sampling_params(req)
            prompt_ids = engine.encode_chat([(t.role, t.content) for t in req.messages])
            engine.local_model.check_request(prompt_ids, params.max_tokens)
        except (ValueError, EngineError) as e:
            await send(self._fail("malformed", f"cannot prepare the request: {e}"))
            return
        # Generation starts before InferenceStarted goes out: the engine's prefill
        # overlaps the frame's trip instead of waiting behind it.
        batches = await TokenBatches.start(engine.generate(prompt_ids, params, seed=inference_id),
                                           at_least=lambda: tokens_per_frame(self._streaming))
        text = TextStream(engine.decode)
        steps: list[TokenStep] = []
        answer: list[bytes] = []  # the frames as signed, kept for the client (actors/answer_server.py)

        async def emit(frame: bytes) -> None:
            answer.append(frame)
            await send(frame)

        try:
            await emit(seal(InferenceStarted(inference_id=inference_id, ta=ta, prompt_tokens=len(prompt_ids),
                                             addrs=self._service.listen_addrs[:MAX_ADDRS]), self._key))
            async for batch in batches:
                await emit(seal(TokenBatch(
                    inference_id=inference_id, start=len(steps),
                    token_ids=[s.token_id for s in batch], logprobs=[s.logprob for s in batch],
                    top_ids=[list(s.top_ids) for s in batch],
                    top_logprobs=[list(s.top_logprobs) for s in batch],
                    text=text.add([s.token_id for s in batch]),
                ), self._key))
                steps += batch
        except EngineError as e:
            await send(self._fail("executor_failed", f"engine failed: {e}"))
            return
        finally:
            await batches.aclose()
        stopped = any(s.token_id in engine.eos_token_ids for s in steps)
        finish_reason = "stop" if stopped else "length"
        artifact = InferenceArtifact(engine.model_name, tuple(prompt_ids), params,
                                     inference_id, tuple(steps))
        rhash = response_hash(artifact.completion_ids)
        finished = seal(InferenceFinished(
            inference_id=inference_id, finish_reason=finish_reason,
            prompt_tokens=len(prompt_ids), completion_tokens=len(steps), response_hash=rhash,
            prompt_ids=list(prompt_ids),
        ), self._key)
        try:  # on disk before the work is claimed
            await self.artifacts.put(request, artifact, [*answer, finished])
        except EvidenceStoreFull as e:
            await send(self._fail("executor_failed", f"{e}: this inference is not claimed"))
            return
        await send(finished)
        self.served += 1
        if self._on_finished is not None:
            await self._on_finished(request, artifact, rhash)


class TextStream:
    """Incremental detokenization: each batch's text from a short window of ids.

    Decoding the whole completion for every token costs O(n^2) over an
    answer. Here each call decodes only the ids since the last emitted text
    (plus the previous piece, as context for tokenizers whose pieces read
    differently at the start of a string), so the cost per token stays flat.
    A trailing incomplete UTF-8 sequence (decoded as U+FFFD) is held back
    until the next token completes it. The pieces concatenate to what
    ``decode`` gives for the whole completion (tested).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids up to here have been emitted as text

    def add(self, token_ids: list[int]) -> str:
        self._ids += token_ids
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]


@dataclass
class _End:
    error: Exception | None


class TokenBatches:
    """The engine's tokens, pulled by a task of their own, handed out in batches.

    The task starts pulling at construction, so the engine starts computing
    at once. Each batch is every token that arrived while the consumer was
    busy with the previous one (at most ``limit``): a consumer that keeps up
    gets one token per batch, so no token waits for another; one that falls
    behind (a slow stream, a busy process) catches up with fewer, larger
    TokenBatch frames -- each signed, relayed and verified once -- instead of
    a growing backlog of one-token frames. Every batch after the first also
    waits until it holds ``at_least()`` tokens (or the answer ends): fewer
    frames per token under load (:func:`tokens_per_frame`). ``aclose`` stops
    the engine's generation if it is still running.
    """

    def __init__(self, steps: AsyncIterator[TokenStep], limit: int = MAX_BATCH_TOKENS,
                 at_least: Callable[[], int] = lambda: 1) -> None:
        self._queue: asyncio.Queue[TokenStep | _End] = asyncio.Queue()
        self._limit = limit
        self._at_least = at_least
        self._first = True
        self._end: _End | None = None
        self._task = asyncio.create_task(self._pump(steps))

    async def _pump(self, steps: AsyncIterator[TokenStep]) -> None:
        # Cancelling this task cancels the engine's generator where it waits,
        # and its cleanup aborts the request.
        try:
            async for step in steps:
                self._queue.put_nowait(step)
        except Exception as e:  # handed to the consumer
            self._queue.put_nowait(_End(e))
        else:
            self._queue.put_nowait(_End(None))

    @classmethod
    async def start(cls, steps: AsyncIterator[TokenStep], limit: int = MAX_BATCH_TOKENS,
                    at_least: Callable[[], int] = lambda: 1) -> TokenBatches:
        """Batches whose pump has already run to its first wait: the engine holds the request
        before the caller sends anything. A task only created runs at the caller's next wait, so
        InferenceStarted was signed and sent first (0.3-5 ms of every TTFT, traced on the
        serving bench)."""
        batches = cls(steps, limit, at_least)
        await asyncio.sleep(0)  # the pump's first step is already scheduled, so it runs now
        return batches

    def __aiter__(self) -> TokenBatches:
        return self

    async def __anext__(self) -> list[TokenStep]:
        batch: list[TokenStep] = []
        hold = 1 if self._first else min(max(self._at_least(), 1), self._limit)
        self._first = False
        while self._end is None and len(batch) < self._limit:
            if len(batch) >= hold and self._queue.empty():
                break
            item = self._queue.get_nowait() if len(batch) >= hold else await self._queue.get()
            if isinstance(item, _End):
                self._end = item
            else:
                batch.append(item)
        if batch:
            return batch
        assert self._end is not None
        if self._end.error is not None:
            raise self._end.error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])  # not `await task`: our own cancellation must propagate
