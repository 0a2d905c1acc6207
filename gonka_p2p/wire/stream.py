"""Checking an executor's signed response stream, frame by frame.

The client library and the OpenAI gateway both read an answer that an
untrusted TA relays from an untrusted executor, and both apply the same
rules, here: every frame must be signed by the executor that sent
``InferenceStarted``, refer to this request's inference id, continue the
token positions without gaps, and the final ``InferenceFinished`` must hash
the tokens received (:func:`~gonka_p2p.wire.messages.response_hash`).
So a TA that alters the output, or an executor that changes its story, is
caught by whoever reads the stream. The client's signed request bounds the
answer, and the verifier holds the executor to it: at most ``max_tokens``
tokens, every position with exactly ``logprobs_k`` alternatives (what the
artifact holds, and what OpenAI's logprobs pair up), no empty batch, and at
most :data:`MAX_TEXT_PER_TOKEN` characters of text per token -- without
these an executor could stream for as long as it keeps the stall timer
fed, and every reader would buffer it. The TA relaying the stream runs the
same checks, so it cuts such an executor off rather than relay it. Pure:
bytes in, events out, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from gonka_p2p.wire.envelope import Signed, open_envelope
from gonka_p2p.wire.messages import (
    InferenceFailed,
    InferenceFinished,
    InferenceRequest,
    InferenceStarted,
    TokenBatch,
    inference_id,
    response_hash,
)
from gonka_p2p.wire.schema import Message, WireError

EXECUTOR_FRAMES = (InferenceStarted, TokenBatch, InferenceFinished, InferenceFailed)
# A token's text is one tokenizer piece, a few to a few dozen characters; an incomplete UTF-8
# sequence held back to the next batch moves characters, it does not add them.
MAX_TEXT_PER_TOKEN = 1024


class GonkaError(Exception):
    """Base of every error a reader of the network's answers raises (the client library and the
    OpenAI gateway); ``code`` is stable, the message is for people."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class RequestRejected(GonkaError):
    """The TA or the executor refused or failed the request (see ``code``)."""


class ProtocolViolation(GonkaError):
    """A frame was unsigned, mis-signed, out of order or inconsistent: someone misbehaved."""

    code = "protocol_violation"


@dataclass(frozen=True)
class StartedEvent:
    inference_id: bytes
    executor: str
    prompt_tokens: int


@dataclass(frozen=True)
class TokensEvent:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(frozen=True)
class FinishedEvent:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    response_hash: bytes


StreamEvent = StartedEvent | TokensEvent | FinishedEvent


class StreamVerifier:
    """Checks one response stream frame by frame (see the module docstring).

    ``accept`` each frame in arrival order: it returns the event the frame carries, raises
    :class:`RequestRejected` on a signed refusal and :class:`ProtocolViolation` on anything
    that breaks the rules; ``done`` turns True with the verified final frame."""

    def __init__(self, request: Signed[InferenceRequest]) -> None:
        self.inference_id = inference_id(request)
        self.max_tokens = request.message.max_tokens
        self.logprobs_k = request.message.logprobs_k
        self.executor: str | None = None
        self.executor_addrs: list[str] = []  # where the executor says it is dialed (InferenceStarted)
        self.token_ids: list[int] = []
        self.text_chars = 0
        self.done = False

    def accept(self, frame: bytes) -> StreamEvent | None:
        try:
            signed = open_envelope(frame, *EXECUTOR_FRAMES)
        except WireError as e:
            raise ProtocolViolation(f"bad frame: {e}") from None
        return self.accept_signed(signed)

    def accept_signed(self, signed: Signed[Message]) -> StreamEvent | None:
        """``accept`` for a frame already opened (one of :data:`EXECUTOR_FRAMES`)."""
        msg = signed.message
        if isinstance(msg, InferenceFailed):
            raise RequestRejected(msg.message, code=msg.code)
        if self.executor is None:
            if not isinstance(msg, InferenceStarted):
                raise ProtocolViolation("stream did not begin with InferenceStarted")
            self.executor, self.executor_addrs = signed.signer_id, list(msg.addrs)
        elif signed.signer_id != self.executor:
            raise ProtocolViolation("a frame was signed by someone other than the executor")
        if msg.inference_id != self.inference_id:
            raise ProtocolViolation("a frame refers to another inference")
        if isinstance(msg, InferenceStarted):
            if self.token_ids:
                raise ProtocolViolation("InferenceStarted after tokens")
            return StartedEvent(msg.inference_id, self.executor, msg.prompt_tokens)
        if isinstance(msg, TokenBatch):
            self._check_batch(msg)
            self.token_ids += msg.token_ids
            self.text_chars += len(msg.text)
            return TokensEvent(msg.text, list(msg.token_ids), list(msg.logprobs),
                               [list(x) for x in msg.top_ids], [list(x) for x in msg.top_logprobs])
        if msg.completion_tokens != len(self.token_ids) or msg.response_hash != response_hash(self.token_ids):
            raise ProtocolViolation("the executor's final hash does not match the tokens streamed")
        self.done = True
        return FinishedEvent(msg.finish_reason, msg.prompt_tokens, msg.completion_tokens,
                             msg.response_hash)

    def _check_batch(self, msg: TokenBatch) -> None:
        n, k = len(msg.token_ids), self.logprobs_k
        if n == 0:
            raise ProtocolViolation("an empty token batch")
        if not (len(msg.logprobs) == len(msg.top_ids) == len(msg.top_logprobs) == n):
            raise ProtocolViolation("a token batch's per-token lists differ in length")
        if any(len(ids) != k or len(lps) != k for ids, lps in zip(msg.top_ids, msg.top_logprobs)):
            raise ProtocolViolation(f"a position's alternatives are not the {k} the request asked for")
        if msg.start != len(self.token_ids):
            raise ProtocolViolation(f"token positions jump from {len(self.token_ids)} to {msg.start}")
        total = len(self.token_ids) + n
        if total > self.max_tokens:
            raise ProtocolViolation(f"the executor sent more than the request's max_tokens ({self.max_tokens})")
        if self.text_chars + len(msg.text) > MAX_TEXT_PER_TOKEN * total:
            raise ProtocolViolation(f"over {MAX_TEXT_PER_TOKEN} characters of text per token")
