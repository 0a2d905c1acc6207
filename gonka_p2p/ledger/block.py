"""Blocks as the ledger receives them, the context a transaction is judged in, and its receipt.

A :class:`Block` is the value consensus agrees on: its canonical encoding is
what the validators vote for and its hash what the next block chains on
(``prev_hash``). The ledger gives each transaction in it a :class:`Receipt`,
whether it was applied or rejected; :class:`BlockContext` is what a rule
knows of the block it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from gonka_p2p.identity import digest
from gonka_p2p.ledger.consensus_types import (
    MAX_SIGNATURE_BYTES,
    MAX_VALIDATORS,
    CommitCertificate,
    Vote,
    VoteType,
)
from gonka_p2p.ledger.transactions import MAX_PEER_ID, Reason
from gonka_p2p.wire.messages import HASH_BYTES
from gonka_p2p.wire.schema import Malformed, Message, bounded, each

MAX_BLOCK_TXS = 20_000


@dataclass(frozen=True)
class PrecommitSignature(Message):
    """One precommit of a commit: everything else it signed is its certificate's."""

    KIND = "consensus_precommit_signature"
    VERSION = 2  # 2: time_ms
    validator: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    signature: bytes = bounded(max_len=MAX_SIGNATURE_BYTES)


def precommit_signatures(certificate: CommitCertificate) -> list[PrecommitSignature]:
    return [PrecommitSignature(validator=v.validator, time_ms=v.time_ms, signature=v.signature)
            for v in certificate.precommits]


def certificate_of(height: int, round: int, block_hash: bytes,
                   signatures: list[PrecommitSignature]) -> CommitCertificate:
    """The certificate as the consensus core checks it (``verify_commit`` judges it)."""
    return CommitCertificate(height, round, block_hash, tuple(
        Vote(VoteType.PRECOMMIT, height, round, block_hash, s.validator, s.time_ms, s.signature)
        for s in signatures))


@dataclass(frozen=True)
class Block(Message):
    """A block as consensus orders it: the value it agrees on is ``encode()``, its hash that digest.

    ``last_commit`` is the commit of the block before it (precommits of round
    ``last_commit_round`` for ``prev_hash``; empty at height 1, and in blocks a
    ledger is driven with outside consensus), and ``time_ms`` the BFT time
    those precommits decide (``commit_checks.bft_time_ms``): every replica checks
    both before it votes, so the proposer chooses neither. The ledger itself
    only refuses to let time go backwards. ``txs`` are raw signed transaction
    envelopes, applied in order, each judged on its own.
    """

    KIND = "ledger_block"
    VERSION = 2  # 2: last_commit
    height: int = bounded(min_value=1)
    prev_hash: bytes = bounded(max_len=HASH_BYTES)
    proposer: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    txs: list[bytes] = bounded(max_len=MAX_BLOCK_TXS)
    last_commit_round: int = field(default=0, metadata=each(min_value=0))
    last_commit: list[PrecommitSignature] = field(default_factory=list, metadata=each(max_len=MAX_VALIDATORS))

    @cached_property
    def hash(self) -> bytes:
        """SHA-256 of the block's bytes: the same hash consensus votes on."""
        return digest(self.encode())

    def last_certificate(self) -> CommitCertificate:
        """The commit of the block before this one, as the consensus core checks it."""
        return certificate_of(self.height - 1, self.last_commit_round, self.prev_hash, self.last_commit)


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
