"""The OpenAI-compatible HTTP gateway of a transfer agent (``gonka-p2p node --http``).

Theory of operation
-------------------
The gateway is a second front door to the same TA, not a second TA: every
decision the TA makes on the libp2p path (signature, staleness, replay,
model, balance, executor draw, redraws) it makes here too, through
``TransferAgent.admit`` and ``route``. What the gateway adds is translation:

1. Body -> :class:`OpenAIRequest` (``auth.parse_body``), else 400
   naming the parameter.
2. The ``X-Gonka-Request`` header holds the client's signed envelope
   (see ``auth``); missing -> 401. It must say exactly what the body
   says, field by field -> else 401 ``body_mismatch``: the account charged
   is the one that signed, for the request it signed.
3. At most ``max_in_flight`` requests at once; beyond that 429 naming other
   participants whose TAs can take the request.
4. ``admit`` then ``route``; the executor's signed frames are checked with
   the client library's stream verifier (signer, inference id, contiguous
   positions, final response hash) before anything reaches the HTTP client,
   so a TA or executor that alters the output is refused here as a client
   would refuse it.
5. Events -> OpenAI JSON or SSE chunks (``format``).

Every error is OpenAI's ``{"error": {message, type, param, code}}``, with the
status from one table (:data:`ERRORS`) keyed by the same codes the TA and the
wire use. A streamed answer commits to 200 only after the executor's first
frame, so failures before it (no executor, every executor busy) still get
their own status; a failure after it ends the stream with an error event,
which the OpenAI SDKs raise as ``APIError``. No answer holds its connection
open for a stalled executor: the TA cancels that stream after its
``stall_timeout`` and the gateway ends the answer with ``executor_stalled``
(the error event of a streamed answer, 504 for a whole one).

An answer the TA's relay lost is recovered, as the client library recovers
its own: a signed failure after the executor's first frame (the TA's relay
to it broke or went silent: a partition may have cut it while the executor
went on, finished and was paid) is not passed on at once. For up to
``recovery_s`` the gateway reads its own TA's committed ledger; once the
inference settles (the client is charged) it fetches the answer from the
executor over ``/gonka/answer/1``, signing the query with the TA's key (the
executor serves the TA the ledger names, ``actors/answer_server.py``), and
the rest of the answer passes the same checks as a live stream before it
goes on where the stream stopped. If the ledger expires the inference
instead (refunded) or the time runs out, the failure goes out as before,
saying so. A streamed answer sends an SSE comment (``: waiting``) every
:data:`KEEPALIVE_S` meanwhile, which SDKs skip, so a client's idle timeout
does not cut a recovery short.

Lifecycle: :class:`GatewayServer` binds its socket with the node's other
cheap start-up checks, serves as a task the node owns, and stops when the
node does. Each request's route task is owned by its response: a client
that hangs up cancels it, which resets the executor's stream -- at any
point, not only while an answer streams: while the gateway waits for the
executor's first frame, and while it gathers a whole answer (which sends no
byte before its end), it watches the connection too (:func:`_unless_hung_up`).
So a client that gives up is not charged: before the executor's first frame
the TA never submits the Start; after it the executor stops, sends no
Finish, and the Start expires with the escrow refunded. The server
accepts headers up to :data:`MAX_HEADER_BYTES`, since the signed header
carries the whole prompt (a reverse proxy in front must allow as much).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.admission import Rejected
from gonka_p2p.actors.transfer_agent import TransferAgent
from gonka_p2p.client import RECOVERY_TIMEOUT_S, AnswerInDoubt, GonkaClient
from gonka_p2p.openai.auth import CHAIN_HEADER, REQUEST_HEADER, BodyError, Kind, OpenAIRequest, parse_body
from gonka_p2p.openai.format import Answer, Json, Vocabulary, load_vocabulary
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.stream import (
    FinishedEvent,
    GonkaError,
    ProtocolViolation,
    RequestRejected,
    StartedEvent,
    StreamEvent,
    StreamVerifier,
    TokensEvent,
)

# Error code (the TA's, the wire's or the gateway's own) -> (HTTP status, OpenAI error type).
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_body": (400, "invalid_request_error"),
    "malformed": (400, "invalid_request_error"),
    "oversize": (400, "invalid_request_error"),
    "unknown_kind": (400, "invalid_request_error"),
    "unsupported_version": (400, "invalid_request_error"),
    "missing_signature": (401, "authentication_error"),
    "bad_signature": (401, "authentication_error"),
    "body_mismatch": (401, "authentication_error"),
    "stale": (401, "authentication_error"),
    "replay": (401, "authentication_error"),
    "wrong_chain": (401, "authentication_error"),  # signed for another network
    "insufficient_balance": (402, "insufficient_quota"),
    "unknown_model": (404, "invalid_request_error"),
    "body_too_large": (413, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
    "executor_failed": (502, "server_error"),
    "unknown_ta": (502, "server_error"),  # executors do not take this TA's orders
    "protocol_violation": (502, "server_error"),
    "no_executor": (503, "service_unavailable_error"),
    "executor_stalled": (504, "server_error"),  # no token for the TA's stall_timeout: stream cancelled
}
UNKNOWN_ERROR = (500, "server_error")

# A signed request is at most 2 MiB on the wire (ExecuteOrder); JSON escaping can double it.
MAX_BODY_BYTES = 4 * 1024 * 1024
# The header carries that envelope whole, base64 (4/3 of 2 MiB), beside the usual headers.
MAX_HEADER_BYTES = 3 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 64
MAX_ALTERNATIVES = 8
ALTERNATIVES_HEADER = "X-Gonka-Alternatives"
HUNG_UP_STATUS = 499  # nginx's "client closed request": nobody reads it, the logs do
KEEPALIVE_S = 10.0  # a streamed answer waiting on a recovery says so this often

T = TypeVar("T")


class HungUp(Exception):
    """The HTTP client closed its connection before the answer was complete."""


class ApiError(Exception):
    """An error as the HTTP client sees it; status and type come from :data:`ERRORS`."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.status, self.type = ERRORS.get(code, UNKNOWN_ERROR)

    def body(self) -> Json:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ClosingStream(StreamingResponse):
    """Closes its body on every exit, hang-ups included, so the work it owns stops at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with aclosing(self.body_iterator):  # type: ignore[type-var]
            await super().__call__(scope, receive, send)


def _sse(obj: Json) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Gateway:
    """The ASGI app (``.app``) in front of one TA."""

    def __init__(
        self,
        ta: TransferAgent,
        directory: PeerDirectory,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        recovery_s: float = RECOVERY_TIMEOUT_S,
    ) -> None:
        """``recovery_s``: how long an answer the TA's relay lost is sought (0: never)."""
        self._ta = ta
        self._directory = directory
        self._recovery_s = recovery_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._vocabularies: dict[str, Vocabulary | None] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _http_error},  # type: ignore[dict-item]
        )

    async def _models(self, http: Request) -> JSONResponse:
        models = [{"id": m, "object": "model", "created": 0, "owned_by": "gonka-p2p"}
                  for m in self._directory.live_models()]
        return JSONResponse({"object": "list", "data": models}, headers={CHAIN_HEADER: self._ta.chain_id})

    async def _chat(self, http: Request) -> Response:
        return await self._serve(http, "chat")

    async def _completions(self, http: Request) -> Response:
        return await self._serve(http, "completion")

    async def _serve(self, http: Request, kind: Kind) -> Response:
        try:
            request = _parse(kind, await _read_body(http))
            envelope = _matching_envelope(http, request)
            vocab = await self._vocabulary(request)
            events = self._inference(envelope)
            started = await _unless_hung_up(http, anext(events))
        except ApiError as e:
            return e.response()
        except HungUp:
            return Response(status_code=HUNG_UP_STATUS)
        # From here on nothing awaits until ``events`` has an owner that closes it.
        assert isinstance(started, StartedEvent)
        answer = Answer(request, started.inference_id, int(time.time()), vocab)
        headers = {"X-Gonka-Inference-Id": started.inference_id.hex(),
                   "X-Gonka-Executor": started.executor}
        if request.stream:
            return _ClosingStream(_stream(answer, events), media_type="text/event-stream",
                                  headers={**headers, "Cache-Control": "no-cache"})
        try:
            return await _unless_hung_up(http, _whole(answer, events, headers))
        except HungUp:
            return Response(status_code=HUNG_UP_STATUS)

    async def _inference(self, envelope: bytes) -> AsyncGenerator[StreamEvent, None]:
        """Admit ``envelope`` through the TA and yield its verified events (StartedEvent first).

        Holds an in-flight slot and owns the route task until closed; raises only ApiError.
        """
        if self._slots.locked():
            raise self._error("overloaded", "this gateway is at capacity")
        async with self._slots:
            try:
                request = await self._ta.admit(envelope)
            except Rejected as e:
                raise self._error(e.code, str(e)) from None
            # Unbounded, yet bounded by max_tokens: one frame per token, then the end (None).
            frames: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def route() -> None:
                try:
                    await self._ta.route(request, frames.put)
                finally:
                    frames.put_nowait(None)

            task = asyncio.create_task(route())
            verifier = StreamVerifier(request)
            try:
                while (frame := await frames.get()) is not None:
                    try:
                        event = verifier.accept(frame)
                    except RequestRejected as failure:
                        if verifier.executor is None or self._recovery_s <= 0:
                            raise
                        for event in await self._recover(AnswerInDoubt(failure, request, verifier)):
                            yield event
                        return
                    if event is not None:
                        yield event
                    if verifier.done:
                        return
                await task  # the relay ended early: surface its error, if it had one
                raise ProtocolViolation("the TA's relay ended before the answer was complete")
            except GonkaError as e:
                raise self._error(e.code, str(e)) from None
            finally:
                task.cancel()
                await asyncio.wait({task})

    async def _recover(self, doubt: AnswerInDoubt) -> list[StreamEvent]:
        """The rest of the answer ``doubt`` cut, fetched for the HTTP client (see the module doc)."""
        assert doubt.streamed.executor is not None
        reader = GonkaClient(self._ta.key, self._ta.service, ta=doubt.streamed.executor,
                             ledger=self._ta.committed_inference)
        try:
            return await reader.recover(doubt, timeout=self._recovery_s)
        except GonkaError as e:
            raise RequestRejected(str(e), code=doubt.code) from None

    def _error(self, code: str, message: str) -> ApiError:
        """An ApiError; ``overloaded`` also names other participants' TAs to try instead."""
        if code != "overloaded":
            return ApiError(code, message)
        others = [r.announcement.addrs[0] for r in self._directory.live_peers()
                  if r.announcement.addrs][:MAX_ALTERNATIVES]
        where = ("; other transfer agents: " + ", ".join(others)) if others else ""
        return ApiError(code, f"{message}; retry shortly{where}",
                        headers={ALTERNATIVES_HEADER: ", ".join(others), "Retry-After": "1"})

    async def _vocabulary(self, request: OpenAIRequest) -> Vocabulary | None:
        """The tokenizer that names tokens in logprobs, loaded once per model, only when
        logprobs are asked for a model live executors serve (never an arbitrary path)."""
        model = request.model
        if request.top_logprobs is None or model not in self._directory.live_models():
            return None
        if model not in self._vocabularies:
            self._vocabularies[model] = await asyncio.to_thread(load_vocabulary, model)
        return self._vocabularies[model]


async def _unless_hung_up(http: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or HungUp if the HTTP client hangs up first (``work`` is cancelled,
    which closes the answer's events and with them the executor's stream). Only for the
    stretches where nothing else reads the connection: a streamed body has Starlette's
    own watcher."""
    job = asyncio.ensure_future(work)
    hang_up = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({job, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, hang_up):
            task.cancel()
        await asyncio.wait({job, hang_up})
    if job.cancelled():
        raise HungUp("the HTTP client closed its connection")
    return job.result()


async def _disconnected(http: Request) -> None:
    """Return once the HTTP client has closed its connection (the body is read by then)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _whole(answer: Answer, events: AsyncGenerator[StreamEvent, None],
                 headers: Mapping[str, str]) -> Response:
    """A whole (non-streamed) answer: its JSON once the executor's last frame is verified."""
    async with aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TokensEvent):
                    answer.add(event)
                elif isinstance(event, FinishedEvent):
                    return JSONResponse(answer.whole(event), headers=dict(headers))
        except ApiError as e:
            return e.response()
    raise AssertionError("invariant: a verified stream ends with InferenceFinished")


async def _stream(answer: Answer, events: AsyncGenerator[StreamEvent, None]
                  ) -> AsyncIterator[bytes]:
    """The SSE body: chunks, then the finish chunk, the usage chunk if asked, and [DONE]."""
    async with aclosing(events):
        first = answer.first_chunk()
        if first is not None:
            yield _sse(first)
        try:
            async with aclosing(_with_keepalives(events, KEEPALIVE_S)) as waited:
                async for event in waited:
                    if event is None:
                        yield b": waiting\n\n"
                    elif isinstance(event, TokensEvent):
                        yield _sse(answer.add(event))
                    elif isinstance(event, FinishedEvent):
                        yield _sse(answer.last_chunk(event))
                        if answer.request.include_usage:
                            yield _sse(answer.usage_chunk(event))
                        yield b"data: [DONE]\n\n"
        except ApiError as e:
            yield _sse(e.body())


async def _with_keepalives(events: AsyncGenerator[StreamEvent, None], every: float
                           ) -> AsyncGenerator[StreamEvent | None, None]:
    """``events``, and None each time ``every`` seconds pass without one. The next event is
    awaited in a task of its own, so that waiting for it can time out without cancelling it."""
    pending: asyncio.Future[StreamEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})


async def _read_body(http: Request) -> bytes:
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError("body_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
    return bytes(body)


def _parse(kind: Kind, body: bytes) -> OpenAIRequest:
    try:
        return parse_body(kind, json.loads(body))
    except BodyError as e:
        raise ApiError("invalid_body", str(e), e.param) from None
    except (ValueError, RecursionError):  # json.loads raises RecursionError on deep nesting
        raise ApiError("invalid_body", "the body is not valid JSON") from None


def _matching_envelope(http: Request, request: OpenAIRequest) -> bytes:
    """The signed envelope from the header, if it is well signed and says what the body says."""
    header = http.headers.get(REQUEST_HEADER)
    if not header:
        raise ApiError("missing_signature", f"no {REQUEST_HEADER} header: sign each request "
                                            "with gonka_p2p.openai.auth.GonkaAuth")
    try:
        envelope = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character in the header
        raise ApiError("missing_signature", f"{REQUEST_HEADER} is not base64") from None
    try:
        signed = open_envelope(envelope, InferenceRequest)
    except WireError as e:
        raise ApiError(e.code, f"{REQUEST_HEADER}: {e}") from None
    reason = request.mismatch(signed.message)
    if reason is not None:
        raise ApiError("body_mismatch", f"{reason}; was the body changed after signing?")
    return envelope


async def _http_error(http: Request, exc: HTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in OpenAI's error shape too."""
    code = "not_found" if exc.status_code == 404 else "http_error"
    return JSONResponse({"error": {"message": f"{http.method} {http.url.path}: {exc.detail}",
                                   "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=exc.status_code, headers=exc.headers)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the node owns SIGINT/SIGTERM and stops us."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """An ASGI app served over HTTP inside a node's lifetime.

    ``bind`` comes early, beside the node's other cheap checks, so a busy
    port fails start-up in one sentence before any model loads; ``serve`` is
    a task the node owns; ``stop`` asks it to return (in-flight answers get
    ``grace_s`` to finish); ``close`` releases a socket that never served.
    """

    def __init__(self, app: Any, host: str, port: int, grace_s: int = 5) -> None:
        self.host = host
        self.port = port
        self._socket: socket.socket | None = None
        self._server = _EmbeddedServer(uvicorn.Config(
            app, lifespan="off", log_config=None, log_level="warning", access_log=False,
            timeout_graceful_shutdown=grace_s,
            # h11 (pure Python, always installed with uvicorn) whose 16 KiB header limit
            # would refuse any prompt longer than a few pages: the header holds the prompt.
            http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ))

    def bind(self) -> None:
        """Listen on (host, port); raises OSError (port in use, bad address). Port 0 picks one."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.create_server((self.host, self.port), family=family)
        self.port = self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def serve(self) -> None:
        assert self._socket is not None, "bind() first"
        await self._server.serve(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
