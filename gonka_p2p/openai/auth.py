"""Binding an OpenAI-shaped HTTP request to a signed InferenceRequest.

Theory of operation
-------------------
The network runs only signed :class:`InferenceRequest` envelopes, and the
account charged is the one that signed. An OpenAI SDK sends a JSON body with
an API key, and the key of a ledger account must never leave its owner. So
the *client* signs: :class:`GonkaAuth` is an ``httpx`` auth hook that reads
the outgoing body, builds the envelope the body stands for
(:meth:`OpenAIRequest.sign`, i.e. ``client.build_request``) and attaches it,
base64, in the ``X-Gonka-Request`` header. The SDK itself is unmodified::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused",
                           http_client=httpx.Client(auth=GonkaAuth(key)))

The envelope signs the network's chain id. ``GonkaAuth(key, chain_id)`` pins
it; without a pin it asks the gateway once (``GET <base>/models`` answers it
in the ``X-Gonka-Chain-Id`` header) -- see the client library's module doc
for why a key funded on several networks should pin.

The gateway parses the same body with the same :func:`parse_body` and passes
the envelope on only if it says exactly what the body says
(:meth:`OpenAIRequest.mismatch`): otherwise a client could be charged for one
prompt and shown the answer to another. One function maps a body to the
signed fields on both sides, so client and gateway can never disagree about
a default.

Signed: model, messages (a completions prompt becomes one user turn: the
wire has no raw-prompt mode, executors always apply the chat template),
max_tokens, temperature, top_p and ``logprobs_k`` = max(5, top logprobs
asked). Not signed: ``stream``, ``stream_options`` and whether logprobs are
shown -- they shape the answer, not what runs or what it costs. Parameters
the network cannot honour (``n`` > 1, ``stop``, tools, penalties...) are
refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator
from dataclasses import dataclass, fields
from typing import Any, Literal

import httpx

from gonka_p2p.client import build_request
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.messages import InferenceRequest

REQUEST_HEADER = "X-Gonka-Request"
CHAIN_HEADER = "X-Gonka-Chain-Id"  # on the gateway's /models answer: the chain id requests sign
DEFAULT_MAX_TOKENS = 256
MIN_LOGPROBS_K = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

Kind = Literal["chat", "completion"]

# The wire's own bound, so an over-long request is a 400 naming max_tokens.
_WIRE_MAX_TOKENS = next(
    f.metadata["max"] for f in fields(InferenceRequest) if f.name == "max_tokens")

# Parameters the network cannot honour, with the values that mean "not used".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class BodyError(ValueError):
    """The body is not a request the network can run; ``param`` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    """What a chat or completions body asks for: the part that is signed, and the answer's shape."""

    kind: Kind
    model: str
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    temperature: float
    top_p: float
    top_logprobs: int | None  # None: the answer carries no logprobs
    stream: bool
    include_usage: bool

    @property
    def logprobs_k(self) -> int:
        return max(MIN_LOGPROBS_K, self.top_logprobs or 0)

    def _signed(self) -> dict[str, Any]:
        return {
            "model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": 0, "logprobs_k": self.logprobs_k,
        }

    def sign(self, key: Keypair, chain_id: str) -> bytes:
        """The InferenceRequest envelope this body stands for on ``chain_id``, signed with ``key``."""
        return build_request(key, list(self.messages), chain_id, **self._signed())

    def mismatch(self, signed: InferenceRequest) -> str | None:
        """Why ``signed`` does not say what this body says, or None when it does."""
        turns = tuple((t.role, t.content) for t in signed.messages)
        if turns != self.messages:
            return "the signed request's messages differ from the body's"
        for name, wanted in self._signed().items():
            got = getattr(signed, name)
            if got != wanted:
                return f"the signed request has {name}={got!r} but the body implies {wanted!r}"
        return None


def parse_body(kind: Kind, body: object) -> OpenAIRequest:
    """Validate a decoded JSON body; raises :class:`BodyError` with the offending param."""
    if not isinstance(body, dict):
        raise BodyError("the request body must be a JSON object")
    for name, harmless in _UNSUPPORTED.items():
        if body.get(name) not in harmless:
            raise BodyError(f"{name!r} is not supported by gonka-p2p", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError("'model' must be a non-empty string", "model")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise BodyError("'stream_options' must be an object and needs 'stream': true",
                        "stream_options")
    max_tokens = _integer(body, "max_tokens", 1, _WIRE_MAX_TOKENS)
    if kind == "chat":
        messages = _chat_messages(body.get("messages"))
        max_tokens = _integer(body, "max_completion_tokens", 1, _WIRE_MAX_TOKENS) or max_tokens
        top_logprobs = _chat_logprobs(body)
    else:
        messages = (("user", _prompt(body.get("prompt"))),)
        top_logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return OpenAIRequest(
        kind=kind, model=model, messages=messages, max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_logprobs=top_logprobs, stream=stream,
        include_usage=_boolean(options or {}, "include_usage"),
    )


def _chat_messages(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise BodyError("'messages' must be a non-empty list", "messages")
    turns = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BodyError(f"{where} must be an object with a string 'role'", where)
        turns.append((message["role"], _content(message.get("content"), f"{where}.content")))
    return tuple(turns)


def _content(value: object, where: str) -> str:
    """A string, or a list of text parts joined by newlines (images, audio: refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    raise BodyError(f"{where} must be a string or a list of text parts", where)


def _prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BodyError("'prompt' must be one string (batches and token ids are not supported)",
                        "prompt")
    return value


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_CHAT_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise BodyError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BodyError(f"{name!r} must be a boolean", name)
    return value


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BodyError(f"{name!r} must be an integer from {lo} to {hi}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise BodyError(f"{name!r} must be a number from {lo:g} to {hi:g}", name)
    return float(value)


def endpoint_kind(path: str) -> Kind | None:
    """Which signed endpoint ``path`` is (any base-URL prefix), or None for unsigned ones."""
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completion"
    return None


class GonkaAuth(httpx.Auth):
    """Signs each chat/completions request with ``key``; works for httpx.Client and AsyncClient.

    A body it cannot map goes out unsigned: the gateway then answers with the
    400 that names the bad parameter, which says more than a missing header.
    Each send is signed afresh (new nonce), so the SDK's retries are not replays.
    """

    requires_request_body = True

    def __init__(self, key: Keypair, chain_id: str | None = None) -> None:
        """``chain_id`` pins the network; None: the gateway's, asked before the first request."""
        self.key = key
        self.chain_id = chain_id

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = request.url.path
        kind = endpoint_kind(path)
        if request.method == "POST" and kind is not None:
            if self.chain_id is None:
                base = path[:path.rindex("/chat/completions" if kind == "chat" else "/completions")]
                info = yield httpx.Request("GET", request.url.copy_with(path=base + "/models", query=None))
                self.chain_id = info.headers.get(CHAIN_HEADER)
            try:
                if self.chain_id is None:  # unsigned: the gateway's 401 says what is missing
                    raise ValueError("the gateway did not state its chain id")
                envelope = parse_body(kind, json.loads(request.content)).sign(self.key, self.chain_id)
            except ValueError:  # BodyError, bad JSON and bad UTF-8 alike
                pass
            else:
                request.headers[REQUEST_HEADER] = base64.b64encode(envelope).decode()
        yield request
