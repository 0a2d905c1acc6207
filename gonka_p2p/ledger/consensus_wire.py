"""The ledger's wire: consensus messages, transaction batches, sync and block fetches.

Theory of operation
-------------------
The consensus core (:mod:`gonka_p2p.ledger.consensus`) speaks in frozen
dataclasses (``Vote``, ``Proposal``, ``CommitCertificate``, ``Evidence``,
``ValidatorSet``); this module gives each a versioned schema with a total,
bounded decoder (:mod:`gonka_p2p.wire.schema`) and a pair of conversions.
Nothing here checks a signature or a quorum: that is the core's job
(``on_vote``, ``verify_commit``), which takes these decoded values as
untrusted input. A decoder only guarantees types, sizes and shapes, and
raises :class:`~gonka_p2p.wire.schema.WireError` on anything else.

Framing. Consensus votes and proposals, and the transactions in a batch,
are each signed by their author; the wrapper that carries them needs no
signature of its own (gossipsub signs every publication with the
publisher's key and noise authenticates every stream), only a kind and a
version so that a peer on another protocol version is refused, not
misread: :mod:`gonka_p2p.wire.unsigned` carries
``[FRAME_VERSION, kind, schema version, body]``.

Uniqueness on gossip. The core re-broadcasts the same votes on purpose
when a height stalls. Two byte-identical publications must never be taken
for one, so every :class:`ConsensusMessage` carries ``seq``, a
per-process counter (started from the wall clock, so a restarted replica
does not repeat its earlier numbers).

What travels where:

    gossip  /gonka/ledger/consensus/1   ConsensusMessage(seq, proposals, votes)
    gossip  /gonka/ledger/txs/1         TxBatch(txs)
    stream  /gonka/ledger/sync/1        SyncRequest -> CommitRecord*   (catch-up)
    stream  /gonka/ledger/block/1       BlockRequest -> BlockBody       (large proposals)

A proposal carries its block in one of three ways. Small blocks travel
``inline``. A larger ledger block travels ``compact``: its header and the
hashes of its transactions (:class:`CompactBlock`; those the proposer has
not gossiped yet travel whole), which a receiver rebuilds from the
transactions its mempool already got by gossip; any
receiver missing one, and any block too large even so, fetches the body by
its hash over a stream. The proposal's signature covers the block hash, so
a rebuilt or fetched body is checked before it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gonka_p2p.identity import digest
from gonka_p2p.ledger.consensus_types import (
    HASH_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_VALIDATORS,
    CommitCertificate,
    Evidence,
    Proposal,
    Validator,
    ValidatorSet,
    Vote,
    VoteType,
)
from gonka_p2p.ledger.block import (
    MAX_BLOCK_TXS,
    Block,
    PrecommitSignature,
    certificate_of,
    precommit_signatures,
)
from gonka_p2p.ledger.transactions import MAX_PEER_ID, SubmitEvidence
from gonka_p2p.wire.schema import DEFAULT_MAX_BYTES, Malformed, Message, bounded

MAX_BLOCK_BYTES = DEFAULT_MAX_BYTES  # the schema bound; ConsensusParams.max_block_bytes may be tighter
MAX_VOTES_PER_MESSAGE = 4 * MAX_VALIDATORS
MAX_TXS_PER_BATCH = 4096
MAX_SYNC_COUNT = 64


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class VoteWire(Message):
    """A signed prevote (type 1) or precommit (type 2); an empty ``block_hash`` is nil."""

    KIND = "consensus_vote"
    VERSION = 2  # 2: time_ms
    type: int = bounded(min_value=int(VoteType.PREVOTE), max_value=int(VoteType.PRECOMMIT))
    height: int = bounded(min_value=0)
    round: int = bounded(min_value=0)
    block_hash: bytes = bounded(max_len=HASH_BYTES)
    validator: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    signature: bytes = bounded(max_len=MAX_SIGNATURE_BYTES)


@dataclass(frozen=True)
class ProposalWire(Message):
    """A signed proposal; the block travels inline, compact (an encoded :class:`CompactBlock`), or
    neither (``block`` and ``compact`` empty) and is fetched by ``block_hash``."""

    KIND = "consensus_proposal"
    height: int = bounded(min_value=0)
    round: int = bounded(min_value=0)
    pol_round: int = bounded(min_value=-1)
    block_hash: bytes = bounded(max_len=HASH_BYTES)
    inline: bool = bounded()
    block: bytes = bounded(max_len=MAX_BLOCK_BYTES)
    compact: bytes = bounded(max_len=MAX_BLOCK_BYTES)
    proposer: str = bounded(max_len=MAX_PEER_ID)
    signature: bytes = bounded(max_len=MAX_SIGNATURE_BYTES)


@dataclass(frozen=True)
class CompactBlock(Message):
    """A ledger :class:`Block` whose transactions are named by their hashes.

    Each entry is a transaction's hash (``HASH_BYTES`` long), or the
    transaction itself when the proposer has not gossiped it yet (a signed
    transaction is always longer than a hash), so that its peers cannot be
    expected to hold it.
    """

    KIND = "ledger_compact_block"
    VERSION = 2  # 2: last_commit
    height: int = bounded(min_value=1)
    prev_hash: bytes = bounded(max_len=HASH_BYTES)
    proposer: str = bounded(max_len=MAX_PEER_ID)
    time_ms: int = bounded(min_value=0)
    entries: list[bytes] = bounded(max_len=MAX_BLOCK_TXS)
    last_commit_round: int = bounded(min_value=0)
    last_commit: list[PrecommitSignature] = bounded(max_len=MAX_VALIDATORS)


@dataclass(frozen=True)
class CertificateWire(Message):
    KIND = "consensus_certificate"
    VERSION = 2  # 2: precommit times
    height: int = bounded(min_value=0)
    round: int = bounded(min_value=0)
    block_hash: bytes = bounded(max_len=HASH_BYTES)
    signatures: list[PrecommitSignature] = bounded(max_len=MAX_VALIDATORS)


@dataclass(frozen=True)
class EvidenceWire(Message):
    """Two conflicting votes, or two conflicting proposals (with their blocks), by one validator."""

    KIND = "consensus_evidence"
    votes: list[VoteWire] = bounded(max_len=2)
    proposals: list[ProposalWire] = bounded(max_len=2)


@dataclass(frozen=True)
class ValidatorEntry(Message):
    KIND = "consensus_validator"
    address: str = bounded(max_len=MAX_PEER_ID)
    public_key: bytes = bounded(max_len=65)
    power: int = bounded(min_value=1)
    priority: int = bounded()


@dataclass(frozen=True)
class ValidatorSetWire(Message):
    """A validator set with the proposer priorities of its height (what the store persists)."""

    KIND = "consensus_validator_set"
    validators: list[ValidatorEntry] = bounded(max_len=MAX_VALIDATORS)


@dataclass(frozen=True)
class ConsensusMessage(Message):
    """One gossip publication: any number of proposals and votes. ``seq`` makes it unique."""

    KIND = "consensus_gossip"
    seq: int = bounded(min_value=0)
    proposals: list[ProposalWire] = bounded(max_len=4)
    votes: list[VoteWire] = bounded(max_len=MAX_VOTES_PER_MESSAGE)


@dataclass(frozen=True)
class TxBatch(Message):
    """Signed transaction envelopes, gossiped together: gossip costs per message, not per byte."""

    KIND = "ledger_tx_batch"
    txs: list[bytes] = bounded(max_len=MAX_TXS_PER_BATCH)


@dataclass(frozen=True)
class SyncRequest(Message):
    """Catch-up: send me the committed blocks from ``from_height`` on, at most ``max_count``."""

    KIND = "ledger_sync_request"
    from_height: int = bounded(min_value=1)
    max_count: int = bounded(min_value=1, max_value=MAX_SYNC_COUNT)


@dataclass(frozen=True)
class CommitRecord(Message):
    """A committed block with the certificate that proves it (one response frame of a sync)."""

    KIND = "ledger_commit_record"
    height: int = bounded(min_value=1)
    block: bytes = bounded(max_len=MAX_BLOCK_BYTES)
    certificate: CertificateWire


@dataclass(frozen=True)
class BlockRequest(Message):
    KIND = "ledger_block_request"
    block_hash: bytes = bounded(max_len=HASH_BYTES)


@dataclass(frozen=True)
class BlockBody(Message):
    KIND = "ledger_block_body"
    block: bytes = bounded(max_len=MAX_BLOCK_BYTES)


# --------------------------------------------------------------------------- conversions


def vote_to_wire(vote: Vote) -> VoteWire:
    return VoteWire(type=int(vote.type), height=vote.height, round=vote.round, block_hash=vote.block_hash or b"",
                    validator=vote.validator, time_ms=vote.time_ms, signature=vote.signature)


def vote_from_wire(w: VoteWire) -> Vote:
    if len(w.block_hash) not in (0, HASH_BYTES):
        raise Malformed(f"vote block hash must be empty (nil) or {HASH_BYTES} bytes")
    return Vote(VoteType(w.type), w.height, w.round, w.block_hash or None, w.validator, w.time_ms, w.signature)


def proposal_to_wire(p: Proposal, inline: bool, compact: bytes = b"") -> ProposalWire:
    return ProposalWire(height=p.height, round=p.round, pol_round=p.pol_round, block_hash=p.block_hash,
                        inline=inline, block=p.block if inline else b"", compact=b"" if inline else compact,
                        proposer=p.proposer, signature=p.signature)


def compact_block(block: Block, announced: Callable[[bytes], bool]) -> CompactBlock:
    """``block`` with each transaction that ``announced`` (by hash) replaced by its hash."""
    entries = []
    for tx in block.txs:
        tx_hash = digest(tx)
        entries.append(tx_hash if announced(tx_hash) else tx)
    return CompactBlock(height=block.height, prev_hash=block.prev_hash, proposer=block.proposer,
                        time_ms=block.time_ms, entries=entries, last_commit_round=block.last_commit_round,
                        last_commit=block.last_commit)


def expand_block(compact: CompactBlock, lookup: Callable[[bytes], bytes | None], *, max_bytes: int) -> bytes | None:
    """The block's bytes, if ``lookup`` (tx hash -> raw tx) knows every hashed transaction and they
    fit in ``max_bytes``; else None. The bound is checked as the block is built: each 32-byte entry
    may name the same large transaction, so a small compact block could otherwise expand to
    gigabytes."""
    txs: list[bytes] = []
    size = 0
    for entry in compact.entries:
        tx = lookup(entry) if len(entry) == HASH_BYTES else entry
        if tx is None:
            return None
        size += len(tx)
        if size > max_bytes:
            return None
        txs.append(tx)
    return Block(height=compact.height, prev_hash=compact.prev_hash, proposer=compact.proposer,
                 time_ms=compact.time_ms, txs=txs, last_commit_round=compact.last_commit_round,
                 last_commit=compact.last_commit).encode()


def proposal_from_wire(w: ProposalWire, block: bytes) -> Proposal:
    """The core's proposal for ``w`` with its body ``block`` (inline or fetched), which must match its hash."""
    if digest(block) != w.block_hash:
        raise Malformed("the block does not match the proposal's block hash")
    return Proposal(w.height, w.round, w.pol_round, block, w.proposer, w.signature)


def certificate_to_wire(c: CommitCertificate) -> CertificateWire:
    return CertificateWire(height=c.height, round=c.round, block_hash=c.block_hash,
                           signatures=precommit_signatures(c))


def certificate_from_wire(w: CertificateWire) -> CommitCertificate:
    """The certificate as the core checks it (``verify_commit`` judges it; here only shapes)."""
    if len(w.block_hash) != HASH_BYTES:
        raise Malformed(f"certificate block hash must be {HASH_BYTES} bytes")
    return certificate_of(w.height, w.round, w.block_hash, w.signatures)


def evidence_to_wire(e: Evidence) -> EvidenceWire:
    pair = (e.first, e.second)
    if all(isinstance(m, Vote) for m in pair):
        return EvidenceWire(votes=[vote_to_wire(m) for m in pair], proposals=[])  # type: ignore[arg-type]
    return EvidenceWire(votes=[], proposals=[proposal_to_wire(m, inline=True) for m in pair])  # type: ignore[arg-type]


def evidence_from_wire(w: EvidenceWire) -> Evidence:
    if len(w.votes) == 2 and not w.proposals:
        return Evidence(vote_from_wire(w.votes[0]), vote_from_wire(w.votes[1]))
    if len(w.proposals) == 2 and not w.votes:
        first, second = (proposal_from_wire(p, p.block) for p in w.proposals)
        return Evidence(first, second)
    raise Malformed("evidence holds exactly two votes or two proposals")


def evidence_transaction(e: Evidence, chain_id: str, sequence: int) -> SubmitEvidence | None:
    """The ledger transaction that proves ``e``, to be sealed by whoever submits it; None for two
    proposals. Only votes are punished: a second proposal alone cannot fork a BFT chain, and
    every replica that voted on either block already holds it."""
    first, second = e.first, e.second
    if not (isinstance(first, Vote) and isinstance(second, Vote)):
        return None
    return SubmitEvidence(chain_id=chain_id, offender=first.validator, vote_type=int(first.type),
                          height=first.height, round=first.round, first_block_hash=first.block_hash or b"",
                          first_time_ms=first.time_ms, first_signature=first.signature,
                          second_block_hash=second.block_hash or b"", second_time_ms=second.time_ms,
                          second_signature=second.signature, sequence=sequence)


def validator_set_to_wire(vs: ValidatorSet) -> ValidatorSetWire:
    prio = vs.priorities
    return ValidatorSetWire(validators=[
        ValidatorEntry(address=v.address, public_key=v.public_key, power=v.power, priority=prio[v.address])
        for v in vs.validators])


def validator_set_from_wire(w: ValidatorSetWire) -> ValidatorSet:
    try:
        return ValidatorSet([Validator(e.address, e.public_key, e.power) for e in w.validators],
                            {e.address: e.priority for e in w.validators})
    except ValueError as e:
        raise Malformed(f"not a validator set: {e}") from None
