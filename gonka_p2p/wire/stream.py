"""Checking an executor's signed response stream, frame by frame.

The client library and the OpenAI gateway both read an answer that an
untrusted TA relays from an untrusted executor, and both apply the same
rules, here: every frame must be signed by the executor that sent
``InferenceStarted``, refer to this request's inference id, continue the
token positions without gaps, and the final ``InferenceFinished`` must hash
the tokens received (:func:`~gonka_p2p.wire.messages.response_hash`).
So a TA that alters the output, or an executor that changes its story, is
caught by whoever reads the stream. Pure: bytes in, events out, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import (
    InferenceFailed,
    InferenceFinished,
    InferenceStarted,
    TokenBatch,
    response_hash,
)
from gonka_p2p.wire.schema import WireError


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

    def __init__(self, inference_id: bytes) -> None:
        self.inference_id = inference_id
        self.executor: str | None = None
        self.executor_addrs: list[str] = []  # where the executor says it is dialed (InferenceStarted)
        self.token_ids: list[int] = []
        self.done = False

    def accept(self, frame: bytes) -> StreamEvent | None:
        try:
            signed = open_envelope(frame, InferenceStarted, TokenBatch, InferenceFinished,
                                   InferenceFailed)
        except WireError as e:
            raise ProtocolViolation(f"bad frame: {e}") from None
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
            n = len(msg.token_ids)
            if not (len(msg.logprobs) == len(msg.top_ids) == len(msg.top_logprobs) == n):
                raise ProtocolViolation("a token batch's per-token lists differ in length")
            if msg.start != len(self.token_ids):
                raise ProtocolViolation(f"token positions jump from {len(self.token_ids)} to {msg.start}")
            self.token_ids += msg.token_ids
            return TokensEvent(msg.text, list(msg.token_ids), list(msg.logprobs),
                               [list(x) for x in msg.top_ids], [list(x) for x in msg.top_logprobs])
        if msg.completion_tokens != len(self.token_ids) or msg.response_hash != response_hash(self.token_ids):
            raise ProtocolViolation("the executor's final hash does not match the tokens streamed")
        self.done = True
        return FinishedEvent(msg.finish_reason, msg.prompt_tokens, msg.completion_tokens,
                             msg.response_hash)
