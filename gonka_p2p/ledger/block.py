"""Blocks as the ledger receives them, the context a transaction is judged in, and its receipt.

A :class:`Block` is the value consensus agrees on: its canonical encoding is
what the validators vote for and its hash what the next block chains on
(``prev_hash``). The ledger gives each transaction in it a :class:`Receipt`,
whether it was applied or rejected; :class:`BlockContext` is what a rule
knows of the block it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from gonka_p2p.identity import digest
from gonka_p2p.ledger.transactions import MAX_PEER_ID, Reason
from gonka_p2p.wire.messages import HASH_BYTES
from gonka_p2p.wire.schema import Malformed, Message, bounded

MAX_BLOCK_TXS = 20_000


@dataclass(frozen=True)
class Block(Message):
    """A block as consensus orders it: the value it agrees on is ``encode()``, its hash that digest.

    ``time_ms`` is the proposer's clock (consensus bounds it; the ledger
    only refuses to let it go backwards); ``txs`` are raw signed transaction
    envelopes, applied in order, each judged on its own.
    """

    KIND = "ledger_block"
    height: int = bounded(min_value=1)
    prev_hash: bytes = bounded(max_len=HASH_BYTES)
    proposer: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    txs: list[bytes] = bounded(max_len=MAX_BLOCK_TXS)

    @cached_property
    def hash(self) -> bytes:
        """SHA-256 of the block's bytes: the same hash consensus votes on."""
        return digest(self.encode())


def decode_block(raw: bytes) -> Block:
    """Decode a block from consensus; raises WireError. Only the canonical encoding is a block,
    so that the hash consensus computed over ``raw`` is the hash the ledger chains on."""
    block = Block.decode(raw)
    if block.encode() != raw:
        raise Malformed("block is not canonically encoded")
    return block


@dataclass(frozen=True)
class Receipt:
    """The outcome of one transaction: ``reason`` is ``Reason.OK`` or why it was rejected."""

    tx_hash: bytes
    reason: Reason
    detail: str = ""
    kind: str = ""
    signer: str = ""
    sequence: int = -1

    @property
    def ok(self) -> bool:
        return self.reason is Reason.OK


@dataclass(frozen=True)
class BlockContext:
    """The block a transaction is judged in: its height and (monotonic) time."""

    height: int
    time_ms: int
    mempool: bool = False  # check_tx: judge against committed state, accept future sequences
    block_hash: bytes = b""  # the block being applied (seeds dispute committees); empty in check_tx
