"""The transfer agent (TA): the client's entry point into the network.

Protocol ``/gonka/infer/1``: a client opens a stream with its signed
:class:`InferenceRequest`; the TA answers with the executor's signed frames,
relayed byte for byte, or with one ``InferenceFailed`` signed by the TA.

Admission (in this order, each failure a distinct error code): the envelope
decodes and its signature holds (``malformed`` / ``bad_signature``); the
request's sampling parameters are ones every executor samples with
(``malformed``); the request is for this network, fresh, and neither started on the committed
ledger nor received here within the window (``wrong_chain`` / ``stale`` /
``replay``, :func:`~gonka_p2p.actors.admission.check_request`: a TA that
restarts forgets what it received, the ledger does not); some live executor
serves the model (``unknown_model``); the admission hook (balance, later
the ledger) accepts it.

Routing: the executor is drawn by :func:`~gonka_p2p.ledger.rules.choose_executor`
(through :func:`~gonka_p2p.ledger.executor_draw.routing_draws`, the order the
simulator routes in too), seeded by the
inference id and the attempt number, never this node. With a ledger the draw
runs over the weights the committed state holds for the model
(:func:`~gonka_p2p.ledger.executor_draw.executor_weights`): it is the draw the
ledger recomputes for ``StartInference``, so the TA cannot put another
executor in its place. Attempt k is tried only if its draw is live and not
already tried; if the executor fails *before its first token* the TA moves
to the next attempt (up to ``attempts``, the genesis
``max_executor_attempts``); after that the client gets ``no_executor``.
Without a ledger the draw runs over the directory's live peers. The
``on_start`` hook (the ledger's ``StartInference``, naming the executor and
its attempt) is called when the executor's first frame arrives; it only
submits (admission to the local mempool) and returns, so no frame ever waits
for a block, and the TA has no background task of its own.

A client that goes away is not charged for an answer it gave up on: the
network service cancels the handler of a stream whose opener left (reset,
disconnected), at whatever it waits for, and a failed send to the client
(:class:`ClientGone`) ends the relay too; either way the executor's stream
is reset, so the executor stops and sends no Finish. Gone before the
executor's first frame, the client is never started on the ledger; after
it, the Start expires at its deadline, refunded. (The OpenAI gateway
cancels the same way when its HTTP client hangs up.)

Relaying: each executor frame is checked as the client will check it
(:class:`~gonka_p2p.wire.stream.StreamVerifier`: one signer, contiguous
positions, at most ``max_tokens`` tokens of ``logprobs_k`` alternatives each,
bounded text, a final hash over the tokens) before it is passed on; an
executor that breaks a rule is cut off like one whose stream failed, so no
TA buffers an answer longer than the client asked for.

Stalls: the executor's first frame must come within ``first_frame_timeout``
(dial, admission, its queue; the node's ``first_frame_timeout``: an executor
sends ``InferenceStarted`` before it generates, so a long wait is a dial
across a partition, a frozen process or one saturated by proving compute;
a whole-answer HTTP client, which has no idle timeout of its own, may wait
attempts x that bound, so testnets set it short), and every later one
within ``stall_timeout`` of the one before. An executor that goes silent mid-stream (frozen, or
withholding tokens) has its stream cancelled, the client gets
``executor_stalled`` and the TA counts it (``stalled``). Nothing is
refunded here: the ledger holds a Start without a Finish, which expires
at its deadline with the escrow returned to the client.

Evidence: from the frames it relays (the executor's signed TokenBatches and
the prompt ids of its InferenceFinished) the TA rebuilds the artifact the
executor committed to and keeps it in ``artifacts`` for validators
(:func:`relayed_artifact`), so that work stays verifiable when its executor
goes silent; beside it, the frames as the executor signed them, for a client
whose stream broke after the executor finished (``actors/answer_server.py``).
That copy is a spare (``ArtifactStore.put(copy=True)``): it never replaces
evidence kept under the same inference id, nor marks the store full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from gonka_p2p.actors.admission import Rejected, ReplayGuard, check_request
from gonka_p2p.actors.artifact_store import ArtifactStore
from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.executor import sampling_params
from gonka_p2p.gossip.service import NetworkError, NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.ledger.executor_draw import executor_weights, routing_draws
from gonka_p2p.ledger.query import InferenceReply
from gonka_p2p.ledger.query_answer import inference_reply
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import (
    ExecuteOrder,
    InferenceFailed,
    InferenceFinished,
    InferenceRequest,
    NetworkInfo,
    TokenBatch,
    inference_id,
    response_hash,
)
from gonka_p2p.wire.protocols import EXECUTE_PROTOCOL, INFER_PROTOCOL, INFO_PROTOCOL
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.stream import EXECUTOR_FRAMES, ProtocolViolation, StreamVerifier

log = logging.getLogger(__name__)

# An executor's refusal with one of these codes is about the request itself or its TA
# (``actors/admission.py``): another executor would refuse it too, so the client gets it
# at once. Any other refusal (``overloaded``, ``unknown_model``...) is about that executor:
# the TA draws another.
TERMINAL_REFUSALS = frozenset({"malformed", "bad_signature", "oversize",
                               "wrong_chain", "stale", "replay", "unknown_ta"})

# Returns None to admit, or (code, message) to reject.
AdmissionHook = Callable[[Signed[InferenceRequest]], Awaitable[tuple[str, str] | None]]
# Submits and returns: it must never wait for a block (the stream waits for it).
StartHook = Callable[[Signed[InferenceRequest], str, int], None]  # (request, executor, attempt)


class ClientGone(Exception):
    """The client's side of the stream failed; nothing more can reach it."""


class ExecutorStalled(Exception):
    """The executor started, then sent nothing for ``stall_timeout`` seconds."""


def relayed_artifact(request: Signed[InferenceRequest], batches: list[TokenBatch],
                     finished: InferenceFinished) -> InferenceArtifact | None:
    """The artifact the executor committed to, rebuilt from the frames it signed, or None
    when they do not add up (a gap in the positions, or a response hash or token count
    other than the tokens streamed): the TA keeps only evidence that matches the claim."""
    params = sampling_params(request.message)
    k = params.logprobs_k
    steps: list[TokenStep] = []
    for batch in batches:
        columns = (batch.token_ids, batch.logprobs, batch.top_ids, batch.top_logprobs)
        if batch.start != len(steps) or len({len(c) for c in columns}) != 1:
            return None
        if any(len(ids) != k or len(lps) != k for ids, lps in zip(batch.top_ids, batch.top_logprobs)):
            return None  # the artifact's rows hold exactly k alternatives
        steps += [TokenStep(t, lp, tuple(ids), tuple(lps)) for t, lp, ids, lps in zip(*columns)]
    if len(steps) != finished.completion_tokens or len(finished.prompt_ids) != finished.prompt_tokens:
        return None
    artifact = InferenceArtifact(request.message.model, tuple(finished.prompt_ids), params,
                                 inference_id(request), tuple(steps))
    return artifact if response_hash(artifact.completion_ids) == finished.response_hash else None


class TransferAgent:
    def __init__(
        self,
        service: NetworkService,
        key: Keypair,
        directory: PeerDirectory,
        chain_id: str,
        attempts: int = 3,
        first_frame_timeout: float = 60.0,
        stall_timeout: float = 30.0,
        admit: AdmissionHook | None = None,
        on_start: StartHook | None = None,
        clock: Callable[[], float] = time.time,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self._service = service
        self._key = key
        self._directory = directory
        self.chain_id = chain_id
        self._replays = ReplayGuard()
        self._ledger: LedgerState | None = None
        self._attempts = attempts
        self._first_frame_timeout = first_frame_timeout
        self._stall_timeout = stall_timeout
        self._admit = admit
        self._on_start = on_start
        self._clock = clock
        self._artifacts = artifacts
        self.relayed = 0
        self.stalled = 0  # executors that went silent mid-stream, each cancelled and reported

    def start(self) -> None:
        self._service.set_stream_handler(INFER_PROTOCOL, self._handle)
        self._service.set_stream_handler(INFO_PROTOCOL, self._handle_info)

    def on_commit(self, state: LedgerState) -> None:
        """Commit listener: admission reads the committed state (synchronously, see the module doc
        of ``actors/admission.py``)."""
        self._ledger = state

    @property
    def key(self) -> Keypair:
        """This node's key: the OpenAI gateway signs with it what it asks for its HTTP clients."""
        return self._key

    @property
    def service(self) -> NetworkService:
        return self._service

    def committed_inference(self, inference_id: bytes) -> InferenceReply | None:
        """How the committed ledger holds ``inference_id``; None on a node without a ledger."""
        return inference_reply(self._ledger, inference_id) if self._ledger is not None else None

    async def _handle_info(self, opener: str, frame: bytes, send: SendFrame) -> None:
        peers = [r for r in self._directory.live_peers() if r.announcement.models]
        await send(seal(NetworkInfo(
            chain_id=self.chain_id, executors=[r.peer_id for r in peers],
            executor_models=[list(r.announcement.models) for r in peers],
        ), self._key))

    def _failed(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)

    async def admit(self, frame: bytes) -> Signed[InferenceRequest]:
        """All admission checks; raises Rejected with the client-facing reason."""
        try:
            request = open_envelope(frame, InferenceRequest)
        except WireError as e:
            raise Rejected(e.code, f"request rejected: {e}") from None
        req = request.message
        try:  # what every executor would refuse, and what the TA rebuilds the artifact with
            sampling_params(req)
        except ValueError as e:
            raise Rejected("malformed", f"request rejected: {e}") from None
        check_request(request, self.chain_id, self._ledger, self._replays, int(self._clock() * 1000))
        if not self._directory.executor_weights(req.model):
            served = ", ".join(self._directory.live_models()) or "none"
            raise Rejected("unknown_model", f"no live executor serves {req.model!r} "
                                            f"(models served now: {served})")
        if self._admit is not None:
            verdict = await self._admit(request)
            if verdict is not None:
                raise Rejected(*verdict)
        return request

    async def _handle(self, opener: str, frame: bytes, send: SendFrame) -> None:
        try:
            request = await self.admit(frame)
        except Rejected as e:
            await send(self._failed(e.code, str(e)))
            return
        try:
            await self.route(request, send)
        except ClientGone:
            log.info("client %s went away mid-stream", opener)

    async def route(self, request: Signed[InferenceRequest], send: SendFrame) -> None:
        """Try the draws in turn, relay the first that starts; move on while nothing reached
        the client. A draw already tried, not live, barred by the ledger, or not announcing the
        model is skipped (it would refuse) but named in the failure, if every draw fails."""
        order = seal(ExecuteOrder(request=request.raw), self._key)
        me, iid, model = self._service.peer_id, inference_id(request), request.message.model
        tried = 0
        refusals: list[str] = []

        def weights() -> dict[str, int]:
            return (self._directory.executor_weights(model) if self._ledger is None
                    else executor_weights(self._ledger, model))

        for draw in routing_draws(weights, me, iid, self._attempts, self._ledger):
            tried += 1
            executor = draw.executor
            if draw.barred or not self._directory.serves(executor, model):
                refusals.append(f"{executor[-8:]}: not live, barred, or not serving {model!r}")
                continue
            outcome = await self._relay(executor, draw.attempt, order, request, send)
            if outcome == "done":
                self.relayed += 1
                return
            if outcome == "failed_mid_stream":
                return
            refusals.append(f"{executor[-8:]}: {outcome}")
        if refusals and all(r.endswith(": overloaded") for r in refusals):
            await _to_client(send, self._failed("overloaded", "every executor drawn is at capacity; "
                                                              "retry later or use another TA"))
            return
        why = f" ({'; '.join(refusals)})" if refusals else ""
        await _to_client(send, self._failed("no_executor", "no live executor could take the request: "
                                                           f"{tried} distinct of {self._attempts} draws{why}"))

    async def _relay(
        self, executor: str, attempt: int, order: bytes, request: Signed[InferenceRequest],
        send: SendFrame,
    ) -> str:
        """Relay one executor's stream.

        Returns 'done' (relayed to the end, or a terminal refusal passed on),
        'failed_mid_stream' (the client got an error), or why the executor
        could not start ('overloaded', 'unreachable', ...): the caller redraws.
        """
        started = False
        verifier = StreamVerifier(request)  # what the client will check, checked before relaying
        batches: list[TokenBatch] = []
        relayed: list[bytes] = []  # the executor's frames as signed: the answer kept for the client
        try:
            async with contextlib.aclosing(self._executor_frames(executor, order)) as frames:
                async for frame in frames:
                    signed = open_envelope(frame, *EXECUTOR_FRAMES)
                    if signed.signer_id != executor:
                        raise WireError("frame not signed by the executor")
                    msg = signed.message
                    if isinstance(msg, InferenceFailed) and not started:
                        log.info("executor %s declined: %s", executor, msg.code)
                        if msg.code in TERMINAL_REFUSALS:
                            await _to_client(send, frame)
                            return "done"
                        return msg.code
                    if not isinstance(msg, InferenceFailed):
                        verifier.accept_signed(signed)
                    if not started:
                        started = True
                        if self._on_start is not None:
                            self._on_start(request, executor, attempt)
                    if isinstance(msg, InferenceFinished):  # kept before the client hears it is done
                        await self._keep_artifact(request, batches, msg, [*relayed, frame])
                    await _to_client(send, frame)
                    relayed.append(frame)
                    if isinstance(msg, TokenBatch):
                        batches.append(msg)
                    elif isinstance(msg, InferenceFinished | InferenceFailed):
                        return "done"
        except ExecutorStalled as e:
            self._directory.mark_failed(executor)
            self.stalled += 1
            log.warning("executor %s stalled on %s (%s); stream cancelled", executor,
                        inference_id(request).hex()[:12], e)
            await _to_client(send, self._failed("executor_stalled", f"executor {executor} stalled: {e}"))
            return "failed_mid_stream"
        except (NetworkError, TimeoutError, WireError, ProtocolViolation) as e:
            self._directory.mark_failed(executor)
            if not started:
                log.info("executor %s failed before streaming (%s); redrawing", executor, e)
                return "unreachable"
            await _to_client(send, self._failed(
                "executor_failed", f"executor {executor} failed mid-stream: {e}"))
            return "failed_mid_stream"
        if not started:
            return "closed"
        await _to_client(send, self._failed(
            "executor_failed", f"executor {executor} closed the stream early"))
        return "failed_mid_stream"

    async def _executor_frames(self, executor: str, order: bytes) -> AsyncIterator[bytes]:
        """The executor's frames: the first within ``first_frame_timeout``, each later one within
        ``stall_timeout``, else ExecutorStalled. The stream is reset however this ends early."""
        frames = self._service.open_stream(executor, EXECUTE_PROTOCOL, order,
                                           timeout=max(self._first_frame_timeout, self._stall_timeout))
        async with contextlib.aclosing(frames):
            limit, started = self._first_frame_timeout, False
            while True:
                deadline = asyncio.timeout(limit)
                try:
                    async with deadline:
                        frame = await anext(frames)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if started and deadline.expired():
                        raise ExecutorStalled(f"no token for {limit:g} s") from None
                    raise
                yield frame
                limit, started = self._stall_timeout, True

    async def _keep_artifact(self, request: Signed[InferenceRequest], batches: list[TokenBatch],
                             finished: InferenceFinished, answer: list[bytes]) -> None:
        if self._artifacts is None:
            return
        artifact = relayed_artifact(request, batches, finished)
        if artifact is None:
            log.info("executor frames of %s do not add up to an artifact; not kept",
                     inference_id(request).hex()[:12])
            return
        await self._artifacts.put(request, artifact, answer, copy=True)  # the executor keeps its own


async def _to_client(send: SendFrame, frame: bytes) -> None:
    """Send to the client; its failures must not be blamed on the executor."""
    try:
        await send(frame)
    except NetworkError as e:
        raise ClientGone(str(e)) from e
