"""The messages of the serving path, each a versioned schema.

Flow (see README's architecture picture)::

    client --InferenceRequest--> TA --ExecuteOrder--> executor
    client <--frames relayed---- TA <--InferenceStarted / TokenBatch* / InferenceFinished--
                                        (or InferenceFailed at any point)

The client signs the request; the TA signs the order that wraps it; the
executor signs every frame it produces and the TA relays them unchanged, so
the client (and later a validator) can prove what the executor said and that
the TA altered nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from gonka_p2p.identity import digest
from gonka_p2p.wire.envelope import Signed
from gonka_p2p.wire.schema import Message, bounded, each

MAX_MODELS = 16
MAX_ADDRS = 8
MAX_TURNS = 256
MAX_PROMPT_IDS = 32_768  # tokens; above any served model's context
NONCE_BYTES = 16
HASH_BYTES = 32
MAX_ADDR_CHARS = 256  # a multiaddr with a peer id is ~100 characters
MAX_MODEL_CHARS = 128
MAX_PEER_ID_CHARS = 64
MAX_CHAIN_ID = 64  # characters of a network's name (genesis checks it too)
MAX_TOP_K = 20  # InferenceRequest.logprobs_k's bound
TOKEN_ID = each(min_value=0, max_value=2**32 - 1)  # the artifact stores ids as u32


@dataclass(frozen=True)
class Announcement(Message):
    """A participant says who it is and what it serves; refreshed periodically."""

    KIND = "announcement"
    addrs: list[str] = bounded(max_len=MAX_ADDRS, items=each(max_len=MAX_ADDR_CHARS))
    models: list[str] = bounded(max_len=MAX_MODELS, items=each(max_len=MAX_MODEL_CHARS))
    capacity: int = bounded(min_value=0, max_value=1_000_000)
    seq: int = bounded(min_value=0)


@dataclass(frozen=True)
class ChatTurn(Message):
    KIND = "chat_turn"
    role: str = bounded(max_len=32)
    content: str = bounded(max_len=256 * 1024)


@dataclass(frozen=True)
class InferenceRequest(Message):
    """Signed by the client: what to run, on which network. Its id is :func:`inference_id`.

    ``chain_id`` makes the signature good on one network only; ``nonce`` (exactly
    :data:`NONCE_BYTES`, fresh per request) makes it one inference there."""

    KIND = "inference_request"
    VERSION = 2  # 2: chain_id; nonce exactly NONCE_BYTES; id from (chain, client, nonce)
    chain_id: str = bounded(max_len=MAX_CHAIN_ID)
    model: str = bounded(max_len=MAX_MODEL_CHARS)
    messages: list[ChatTurn] = bounded(max_len=MAX_TURNS)
    max_tokens: int = bounded(min_value=1, max_value=32768)
    temperature: float = bounded(min_value=0.0, max_value=10.0)
    top_p: float = bounded(min_value=0.0, max_value=1.0)
    top_k: int = bounded(min_value=0, max_value=1_000_000)
    logprobs_k: int = bounded(min_value=5, max_value=MAX_TOP_K)
    timestamp_ms: int = bounded(min_value=0)
    nonce: bytes = bounded(max_len=NONCE_BYTES)

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES:  # the decoder turns this into Malformed
            raise ValueError(f"nonce must be exactly {NONCE_BYTES} bytes, not {len(self.nonce)}")


_INFERENCE_ID_DOMAIN = b"gonka-p2p/inference-id/v1\x00"


def inference_id(request: Signed[InferenceRequest]) -> bytes:
    """The id of the inference a signed request asks for: SHA-256 over the chain, the
    client's key and the nonce, all three signed by the client.

    Nothing else enters it -- not the envelope's bytes, not the prompt -- so nobody
    but the client can make a second id for a request (there is no other encoding to
    try), and the client itself gets one inference per nonce per network: a second
    request under the same nonce is the same inference, which the ledger starts once.
    The chain id is length-prefixed, the key and the nonce have fixed sizes, so no two
    (chain, key, nonce) triples hash the same bytes."""
    chain = request.message.chain_id.encode()
    return digest(_INFERENCE_ID_DOMAIN + len(chain).to_bytes(2, "big") + chain
                  + request.signer + request.message.nonce)


@dataclass(frozen=True)
class ExecuteOrder(Message):
    """Signed by the TA: run this client request. ``request`` is the client's envelope, verbatim."""

    KIND = "execute_order"
    request: bytes = bounded(max_len=2 * 1024 * 1024)


@dataclass(frozen=True)
class InferenceStarted(Message):
    """First frame of a stream, signed by the executor.

    ``addrs`` are the executor's own dialable addresses: a client whose relay breaks may never
    have met the executor (it talks only to its TA), and a TA that fails can no longer tell it
    the ledger's record, which names them too. With them the client dials the executor and asks
    its ledger and its kept answer directly (``client.py``)."""

    KIND = "inference_started"
    VERSION = 2  # 2: addrs
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    ta: str = bounded(max_len=64)
    prompt_tokens: int = bounded(min_value=0)
    addrs: list[str] = field(default_factory=list,
                             metadata=each(max_len=MAX_ADDRS, items=each(max_len=MAX_ADDR_CHARS)))


@dataclass(frozen=True)
class TokenBatch(Message):
    """Generated tokens with their evidence, signed by the executor.

    ``start`` is the position of the first token; positions are contiguous
    across batches so a receiver detects gaps and reordering.
    """

    KIND = "token_batch"
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    start: int = bounded(min_value=0)
    token_ids: list[int] = bounded(max_len=4096, items=TOKEN_ID)
    logprobs: list[float] = bounded(max_len=4096)
    top_ids: list[list[int]] = bounded(max_len=4096, items=each(max_len=MAX_TOP_K, items=TOKEN_ID))
    top_logprobs: list[list[float]] = bounded(max_len=4096, items=each(max_len=MAX_TOP_K))
    text: str = bounded(max_len=1024 * 1024)


@dataclass(frozen=True)
class InferenceFinished(Message):
    """Last frame, signed by the executor: the commitment it will stand behind on the ledger.

    ``prompt_ids`` (the tokenized prompt, which the TA need not be able to compute)
    completes, with the relayed TokenBatches, the artifact the TA keeps for validators."""

    KIND = "inference_finished"
    VERSION = 2  # 2: prompt_ids
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    finish_reason: str = bounded(max_len=16)
    prompt_tokens: int = bounded(min_value=0)
    completion_tokens: int = bounded(min_value=0)
    response_hash: bytes = bounded(max_len=HASH_BYTES)  # response_hash(completion ids)
    prompt_ids: list[int] = bounded(max_len=MAX_PROMPT_IDS, items=TOKEN_ID)


def response_hash(completion_ids: list[int]) -> bytes:
    """What the executor signs as "the answer": the digest of the completion token ids."""
    return digest(msgpack.packb(list(completion_ids)))


@dataclass(frozen=True)
class InferenceFailed(Message):
    """Terminal error frame, signed by whoever failed the request (TA or executor)."""

    KIND = "inference_failed"
    code: str = bounded(max_len=32)
    message: str = bounded(max_len=1024)


@dataclass(frozen=True)
class NetworkInfo(Message):
    """A TA's view of the network, signed: its chain id (what clients sign requests for, unless
    they pin their own) and which live executors serve which models."""

    KIND = "network_info"
    VERSION = 2  # 2: chain_id
    chain_id: str = bounded(max_len=MAX_CHAIN_ID)
    executors: list[str] = bounded(max_len=4096, items=each(max_len=MAX_PEER_ID_CHARS))
    executor_models: list[list[str]] = bounded(
        max_len=4096, items=each(max_len=MAX_MODELS, items=each(max_len=MAX_MODEL_CHARS)))


@dataclass(frozen=True)
class ArtifactQuery(Message):
    """A validator asks the executor for an inference's evidence; signed by the validator."""

    KIND = "artifact_query"
    inference_id: bytes = bounded(max_len=HASH_BYTES)


@dataclass(frozen=True)
class ArtifactReply(Message):
    """The executor's answer: the client's signed request (the prompt) and the artifact bytes."""

    KIND = "artifact_reply"
    request: bytes = bounded(max_len=2 * 1024 * 1024)
    artifact: bytes = bounded(max_len=8 * 1024 * 1024)


@dataclass(frozen=True)
class AnswerQuery(Message):
    """A client asks the executor (or the TA that relayed it) for its own answer; signed by the
    client key that signed the request, for the peer that reads the reply.

    ``reader`` is the libp2p peer id of the stream's opener: the server answers only that
    opener, so a query overheard, or a reply of one passed on, is no use to anyone else
    (libp2p authenticates the opener). ``timestamp_ms`` bounds how long a leaked query
    can be tried at all. The reply is the executor's signed response frames, verbatim,
    or one InferenceFailed signed by the server."""

    KIND = "answer_query"
    inference_id: bytes = bounded(max_len=HASH_BYTES)
    reader: str = bounded(max_len=MAX_PEER_ID_CHARS)
    timestamp_ms: int = bounded(min_value=0)
