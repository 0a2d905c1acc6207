"""The ledger's rules of arithmetic and time, one pure function each.

Every decision :mod:`gonka_p2p.ledger.state` takes that is a formula rather
than a lookup lives here, as a small function of plain values: how many
coins an inference locks, what it costs, when it expires, when an epoch
ends, which timestamps are fresh. None of them reads or writes state, so
each is tested on its own against its specification (tests/test_ledger_state.py)
and can be quoted in a dispute.

All amounts are integers in coin units; all heights are block numbers; the
only wall-clock quantities are the client's signed ``timestamp_ms`` and the
block's ``time_ms``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import base58
from coincurve import PublicKey

from gonka_p2p.identity import PUBKEY_BYTES

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params
    from gonka_p2p.wire.messages import InferenceRequest

# base58 payload of a secp256k1 peer id: identity multihash (0x00, len 37) of
# protobuf PublicKey{Type=2, Data=<33 bytes>}; see identity.peer_id_from_pubkey.
_PEER_ID_PREFIX = b"\x00\x25\x08\x02\x12\x21"


@lru_cache(maxsize=1 << 16)
def is_account_address(text: str) -> bool:
    """An account address is the peer id of a compressed secp256k1 key.

    Coins sent anywhere else could never be spent (no key signs for them).
    Peer ids carry no checksum, so a typo that still decodes to a curve
    point is a valid (if unowned) address: wallets must confirm addresses.
    """
    if not isinstance(text, str) or not 40 <= len(text) <= 64:
        return False
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return False
    if not (len(raw) == len(_PEER_ID_PREFIX) + PUBKEY_BYTES and raw.startswith(_PEER_ID_PREFIX)
            and base58.b58encode(raw).decode() == text):
        return False
    try:
        PublicKey(raw[len(_PEER_ID_PREFIX):])
    except Exception:  # noqa: BLE001 - coincurve raises several types for bad points
        return False
    return True


def prompt_token_bound(request: InferenceRequest, params: Params) -> int:
    """An upper bound on the prompt's token count, computable without a tokenizer.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2...) maps every token to at
    least one UTF-8 byte, so no text tokenizes into more tokens than it has
    bytes; SentencePiece with byte fallback behaves the same apart from a
    leading-space marker. What the chat template adds around each turn
    (special tokens, newlines, that marker) is bounded by
    ``prompt_overhead_per_turn_tokens`` per turn plus
    ``prompt_overhead_fixed_tokens`` (BOS, generation prompt). So escrow
    computed from this bound covers any honest prompt; a template that adds
    more only means the executor is paid for at most this many prompt tokens
    (the cost is capped at the escrow).
    """
    per_turn = params.prompt_overhead_per_turn_tokens
    body = sum(len(t.role.encode()) + len(t.content.encode()) + per_turn for t in request.messages)
    return body + params.prompt_overhead_fixed_tokens


def escrow_for(prompt_bound: int, max_tokens: int, price: int) -> int:
    """Coins locked at StartInference: the most the inference can cost."""
    assert prompt_bound >= 0 and max_tokens >= 0 and price >= 1
    return (prompt_bound + max_tokens) * price


def inference_cost(prompt_tokens: int, completion_tokens: int, price: int, escrow: int) -> int:
    """Coins the client pays for finished work: the claimed tokens at the price, never above escrow."""
    assert prompt_tokens >= 0 and completion_tokens >= 0 and escrow >= 0
    return min((prompt_tokens + completion_tokens) * price, escrow)


def request_is_fresh(timestamp_ms: int, block_time_ms: int, window_ms: int) -> bool:
    """A client request may start only within ``window_ms`` either side of the block time.

    Bounding the age is what lets the ledger forget an inference id after
    :func:`replay_memory_until` without ever accepting it twice; bounding the
    future side stops a client (or a TA) from pre-dating requests to keep
    their ids alive for ever.
    """
    return abs(block_time_ms - timestamp_ms) <= window_ms


def replay_memory_until(timestamp_ms: int, window_ms: int) -> int:
    """Last block time at which a request with this timestamp is still fresh.

    After it, :func:`request_is_fresh` rejects the request anyway, so its id
    no longer needs remembering.
    """
    return timestamp_ms + window_ms


def inference_deadline(start_height: int, params: Params) -> int:
    """The last height whose block may carry the FinishInference; at its end the inference expires."""
    return start_height + params.inference_deadline_blocks


def held_finish_deadline(held_height: int, params: Params) -> int:
    """A Finish held without its Start is dropped at the end of this height."""
    return held_height + params.inference_deadline_blocks


def is_epoch_end(height: int, params: Params) -> bool:
    """Epoch settlement runs at the end of every block whose height is a multiple of the epoch length."""
    return height > 0 and height % params.epoch_length_blocks == 0


def epoch_after(height: int, params: Params) -> int:
    """The epoch the next block belongs to, once ``height`` is committed (epoch 0 holds heights 1..L)."""
    return height // params.epoch_length_blocks


def sequence_acceptable(expected: int, got: int, *, mempool: bool) -> bool:
    """A block accepts exactly the account's next sequence; a mempool also keeps later ones queued."""
    return got >= expected if mempool else got == expected


def next_block_time(previous_ms: int, proposed_ms: int) -> int:
    """Block time never goes backwards: a proposer's clock behind the last block counts as equal."""
    return max(previous_ms, proposed_ms)
