"""The executor's verified events in the shapes OpenAI's API returns.

Pure functions and one small stateful :class:`Answer` per request: no I/O,
so the shapes are tested without a server. Where the network differs from
OpenAI, the shape stays OpenAI's and the meaning is the network's:

* ``logprob`` values are the executor's signed evidence: the raw
  (temperature 1, untruncated) distribution, the same numbers validators
  check -- not the distribution after temperature/top_p.
* The network streams token ids; the text of a token for ``logprobs`` comes
  from the model's tokenizer (:class:`Vocabulary`), loaded on the gateway.
  Special tokens (end of sequence) are left out, as their text is not in the
  content either. A byte-level token that is not valid UTF-8 on its own is
  shown as OpenAI shows it: ``bytes:\\xe2\\x80``. Without a tokenizer a token
  reads ``token_id:<id>`` with ``bytes`` null.
* Completions' ``text_offset`` counts characters into the completion text
  (the prompt is a chat turn, not a text prefix), from the executor's own
  decoded pieces, so offsets agree with ``text`` exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from gonka_p2p.inference.engine import EngineError
from gonka_p2p.openai.auth import OpenAIRequest
from gonka_p2p.wire.stream import FinishedEvent, TokensEvent

log = logging.getLogger(__name__)

Json = dict[str, Any]

# (request kind, is a streaming chunk) -> OpenAI's "object" field.
_OBJECTS = {
    ("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
    ("completion", False): "text_completion", ("completion", True): "text_completion",
}


class Vocabulary:
    """Token ids to the text and bytes OpenAI's logprobs show, from the model's tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import ByteLevel
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self._tokenizer = tokenizer
        self._special = frozenset(tokenizer.all_special_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and isinstance(backend.decoder, ByteLevel)
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()} if byte_level else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes | None:
        """The token's bytes; None for an id outside the vocabulary (only a lying executor sends one)."""
        if not 0 <= token_id < len(self._tokenizer):
            return None
        if self._byte_of is None:
            return self._tokenizer.decode([token_id]).encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        return bytes(self._byte_of[c] for c in piece)


def load_vocabulary(model: str) -> Vocabulary | None:
    """The tokenizer of ``model`` if this machine can load it (blocking: call in a thread)."""
    from gonka_p2p.inference.models import load_local_model

    try:
        return Vocabulary(load_local_model(model).tokenizer)
    except EngineError as e:
        log.warning("no tokenizer for %s on this gateway (%s); logprobs show token ids", model, e)
        return None


def token_json(token_id: int, logprob: float, vocab: Vocabulary | None) -> Json:
    """``{"token", "logprob", "bytes"}`` as in OpenAI's chat logprobs."""
    raw = None if vocab is None else vocab.token_bytes(token_id)
    if raw is None:
        return {"token": f"token_id:{token_id}", "logprob": logprob, "bytes": None}
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return {"token": text, "logprob": logprob, "bytes": list(raw)}


@dataclass(frozen=True)
class Position:
    """One generated token with its evidence, as the executor signed it."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text: str  # the executor's decoded piece for this position (may be "" for a partial byte)


def positions(event: TokensEvent) -> list[Position]:
    """Split a token batch into positions; the batch's text goes with its first token."""
    return [
        Position(t, lp, list(zip(ids, lps, strict=True)), event.text if i == 0 else "")
        for i, (t, lp, ids, lps) in enumerate(
            zip(event.token_ids, event.logprobs, event.top_ids, event.top_logprobs,
                strict=True))
    ]


def usage_json(finished: FinishedEvent) -> Json:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


@dataclass
class Answer:
    """One request's answer, built piece by piece: streamed as chunks or returned whole."""

    request: OpenAIRequest
    inference_id: bytes
    created: int
    vocab: Vocabulary | None
    text: str = ""
    _chat_logprobs: list[Json] = field(default_factory=list)
    _completion_logprobs: Json = field(default_factory=lambda: {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})

    @property
    def id(self) -> str:
        prefix = "chatcmpl-" if self.request.kind == "chat" else "cmpl-"
        return prefix + self.inference_id.hex()

    def _envelope(self, choices: list[Json], chunk: bool) -> Json:
        out: Json = {
            "id": self.id, "object": _OBJECTS[self.request.kind, chunk],
            "created": self.created, "model": self.request.model, "system_fingerprint": None,
            "choices": choices,
        }
        if chunk and self.request.include_usage:
            out["usage"] = None  # as OpenAI: every chunk but the last carries usage: null
        return out

    def add(self, event: TokensEvent) -> Json:
        """Record a batch; returns its streaming chunk."""
        logprobs = self._logprobs(positions(event))
        self.text += event.text
        if self.request.kind == "chat":
            choice = {"index": 0, "delta": {"content": event.text}, "logprobs": logprobs,
                      "finish_reason": None}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": logprobs, "finish_reason": None}
        return self._envelope([choice], chunk=True)

    def _logprobs(self, new: list[Position]) -> Json | None:
        """The logprobs of ``new`` positions, also kept for the whole answer."""
        n = self.request.top_logprobs
        if n is None:
            return None
        if self.request.kind == "chat":
            content = [self._chat_entry(p, n) for p in new if self._shown(p)]
            self._chat_logprobs += content
            return {"content": content, "refusal": None}
        part: Json = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = len(self.text)
        for p in new:
            if self._shown(p):
                part["tokens"].append(token_json(p.token_id, p.logprob, self.vocab)["token"])
                part["token_logprobs"].append(p.logprob)
                part["top_logprobs"].append(
                    {token_json(t, lp, self.vocab)["token"]: lp for t, lp in p.top[:n]})
                part["text_offset"].append(offset)
            offset += len(p.text)
        for key, values in part.items():
            self._completion_logprobs[key] += values
        return part

    def _shown(self, p: Position) -> bool:
        return self.vocab is None or not self.vocab.is_special(p.token_id)

    def _chat_entry(self, p: Position, n: int) -> Json:
        return {**token_json(p.token_id, p.logprob, self.vocab),
                "top_logprobs": [token_json(t, lp, self.vocab) for t, lp in p.top[:n]]}

    def first_chunk(self) -> Json | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if self.request.kind != "chat":
            return None
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}], chunk=True)

    def last_chunk(self, finished: FinishedEvent) -> Json:
        if self.request.kind == "chat":
            choice: Json = {"index": 0, "delta": {}, "logprobs": None,
                            "finish_reason": finished.finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None,
                      "finish_reason": finished.finish_reason}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, finished: FinishedEvent) -> Json:
        return {**self._envelope([], chunk=True), "usage": usage_json(finished)}

    def whole(self, finished: FinishedEvent) -> Json:
        """The non-streaming response, after every batch was ``add``-ed."""
        logprobs: Json | None = None
        if self.request.top_logprobs is not None:
            logprobs = ({"content": self._chat_logprobs, "refusal": None}
                        if self.request.kind == "chat" else self._completion_logprobs)
        if self.request.kind == "chat":
            choice: Json = {"index": 0, "message": {"role": "assistant", "content": self.text,
                                                    "refusal": None},
                            "logprobs": logprobs, "finish_reason": finished.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": logprobs,
                      "finish_reason": finished.finish_reason}
        return {**self._envelope([choice], chunk=False), "usage": usage_json(finished)}
