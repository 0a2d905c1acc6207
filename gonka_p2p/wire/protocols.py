"""Every stream protocol id and gossip topic the network speaks, in one table.

One line per id: how it travels (a gossipsub topic, or a direct stream of one
request frame then response frames), what travels on it, and how large one
unit of it may be. The schemas live in ``wire/messages.py`` (serving path),
``ledger/consensus_wire.py``, ``ledger/query.py`` and ``ledger/genesis_wire.py``
(ledger). The trailing ``/1`` is the protocol version: a change that old
peers cannot read gets a new id, never a new meaning for this one.

Why each id declares its sizes: memory is bounded before trust. A frame's
length prefix arrives before its payload, so the network service refuses a
frame longer than its protocol allows before reading a byte of it (a peer
asking for the network's status cannot make us buffer 8 MiB), and a gossip
message longer than its topic allows is dropped before its validator decodes
it. Each bound is the largest honest unit its schema admits, rounded up;
an id used by tests or benchmarks only gets the global bounds
(:data:`DEFAULT_FRAMES`, :data:`DEFAULT_TOPIC_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB

# A client's signed InferenceRequest is at most 2 MiB (ExecuteOrder.request, StartInference.request);
# the envelopes and transactions that carry one add well under 64 KiB.
_SIGNED_REQUEST = 2 * MiB + 64 * KiB
# A TokenBatch: <= 1 MiB of text and 4096 rows of <= 20 top-k ids and logprobs (~2.2 MiB).
_TOKEN_FRAME = 4 * MiB
_SMALL_REQUEST = 4 * KiB  # a query naming one hash or height, signed
_LARGEST_FRAME = 8 * MiB  # wire.schema.MAX_MESSAGE_BYTES: no decoder opens more


@dataclass(frozen=True)
class FrameLimits:
    """The longest request frame a served stream reads, and the longest reply frame its opener reads."""

    request: int
    reply: int


STREAMS: dict[str, FrameLimits] = {}
SPARE_KEEPING: set[str] = set()  # stream ids whose openers keep one negotiated stream ready per peer
TOPICS: dict[str, int] = {}  # topic -> longest message, in bytes
DEFAULT_FRAMES = FrameLimits(request=_LARGEST_FRAME, reply=_LARGEST_FRAME)
DEFAULT_TOPIC_BYTES = 1_000_000  # py-libp2p drops RPCs over 1 MiB; envelope overhead is < 1 KiB


def _stream(protocol: str, *, request: int, reply: int, spare: bool = False) -> str:
    STREAMS[protocol] = FrameLimits(request, reply)
    if spare:
        SPARE_KEEPING.add(protocol)
    return protocol


def _topic(topic: str, *, max_bytes: int) -> str:
    TOPICS[topic] = max_bytes
    return topic


def frame_limits(protocol: str) -> FrameLimits:
    """The frame bounds ``protocol`` declares (the global ones for an undeclared id)."""
    return STREAMS.get(protocol, DEFAULT_FRAMES)


def keeps_spare(protocol: str) -> bool:
    """Whether an opener keeps one negotiated ``protocol`` stream ready per peer
    (``gossip/spare_streams.py``): the serving path, which opens one per request."""
    return protocol in SPARE_KEEPING


def topic_max_bytes(topic: str) -> int:
    """The longest message ``topic`` carries (the global bound for an undeclared topic)."""
    return TOPICS.get(topic, DEFAULT_TOPIC_BYTES)


# ---- gossipsub topics ----------------------------------------------------------
# signed Announcement: a peer's addrs (8 x 256 chars), models (16 x 128), capacity (refreshed)
ANNOUNCE_TOPIC = _topic("/gonka/announce/1", max_bytes=8 * KiB)
# ConsensusMessage(seq, proposals, votes) between replicas; a compact block of 20,000 hashes is ~700 KB
CONSENSUS_TOPIC = _topic("/gonka/ledger/consensus/1", max_bytes=DEFAULT_TOPIC_BYTES)
# TxBatch: signed ledger transactions, batched per node up to tx_gossip.MAX_GOSSIP_BYTES
TX_TOPIC = _topic("/gonka/ledger/txs/1", max_bytes=DEFAULT_TOPIC_BYTES)

# ---- streams (one request frame, then response frames) ---------------------------
# client -> TA: InferenceRequest; back: the executor's signed frames, relayed
INFER_PROTOCOL = _stream("/gonka/infer/1", request=_SIGNED_REQUEST, reply=_TOKEN_FRAME, spare=True)
# client -> TA: empty; back: NetworkInfo (<= 4096 live executors and their models)
INFO_PROTOCOL = _stream("/gonka/info/1", request=_SMALL_REQUEST, reply=1 * MiB)
# TA -> executor: ExecuteOrder; back: InferenceStarted, TokenBatch*, InferenceFinished
EXECUTE_PROTOCOL = _stream("/gonka/execute/1", request=_SIGNED_REQUEST, reply=_TOKEN_FRAME, spare=True)
# validator -> executor or TA: ArtifactQuery; back: ArtifactReply (the request and the artifact)
ARTIFACT_PROTOCOL = _stream("/gonka/artifact/1", request=_SMALL_REQUEST, reply=_LARGEST_FRAME)
# client -> executor or TA: AnswerQuery; back: the executor's signed frames of that answer, as kept
ANSWER_PROTOCOL = _stream("/gonka/answer/1", request=_SMALL_REQUEST, reply=_TOKEN_FRAME)
# replica -> peer: SyncRequest; back: CommitRecord* (catch-up: a block of <= 4 MiB and its certificate)
SYNC_PROTOCOL = _stream("/gonka/ledger/sync/1", request=_SMALL_REQUEST, reply=_LARGEST_FRAME)
# replica -> peer: BlockRequest; back: BlockBody (large proposals, <= 4 MiB)
BLOCK_PROTOCOL = _stream("/gonka/ledger/block/1", request=_SMALL_REQUEST, reply=4 * MiB + 64 * KiB)
# joining node -> peer: GenesisRequest; back: GenesisReply (ledger/genesis_wire.py: <= 1 MiB of genesis)
GENESIS_PROTOCOL = _stream("/gonka/ledger/genesis/1", request=_SMALL_REQUEST, reply=1 * MiB + 4 * KiB)
# client -> node: a ledger query or SubmitTx (a StartInference carries a request); back: its reply
QUERY_PROTOCOL = _stream("/gonka/ledger/query/1", request=_SIGNED_REQUEST, reply=1 * MiB)
