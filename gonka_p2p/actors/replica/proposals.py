"""Proposal bodies: the block this replica proposes, the check of a block others propose, and how bodies travel.

**Building** reaps the mempool into a block capped by ``max_block_txs`` and
``max_block_bytes``, with the commit of the block before it and the time that
commit decides (BFT time: ``commit_checks.bft_time_ms``). **Validating** is
consensus's valid(v): would an honest proposer have built this block on our
state (decoding, chaining, a last commit that proves the previous block, the
time it decides, proposer, stateless transaction checks)? So the proposer
chooses no block time; only block 1, which has no commit before it, takes the
proposer's clock, bounded by ours plus ``max_clock_drift_ms``.

**Travel.** A proposal carries its block inline when it is at most
``inline_block_bytes``; otherwise as a compact block (header + transaction
hashes) that receivers rebuild from their mempools, which gossip has
already filled; a receiver missing a transaction fetches the body by hash
from the proposer (or any peer holding it) over ``/gonka/ledger/block/1``,
after checking the proposal's signature over that hash.

Memory: bodies are held (to serve them to peers) only for the height being
decided and the next, and are dropped when their height commits
(``forget_below``); fetches in flight likewise. A body is rebuilt or
fetched only for a proposal the core would take (``_claim``), checked
before any work on it: within the core's round lookahead, by that round's
proposer, signed; and, like the core's log, at most two bodies per
proposer and round (the second is evidence) and at most
``max_future_rounds`` rounds per proposer above the core's. That bounds
what one validator can make us fetch and hold, and what anyone can make
us expand from an unsigned compact block.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from gonka_p2p.gossip.service import NetworkError, NetworkService, SendFrame, StreamReset
from gonka_p2p.identity import digest
from gonka_p2p.ledger.block import Block, decode_block, precommit_signatures
from gonka_p2p.ledger.commit_checks import bft_time_ms, verify_commit
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import InvalidCommit, Proposal
from gonka_p2p.ledger.consensus_wire import (
    BlockBody,
    BlockRequest,
    CompactBlock,
    ProposalWire,
    compact_block,
    expand_block,
    proposal_from_wire,
    proposal_to_wire,
)
from gonka_p2p.ledger.mempool import Mempool
from gonka_p2p.ledger.state import BlockMismatch, check_block
from gonka_p2p.ledger.transactions import decode_tx
from gonka_p2p.wire.protocols import BLOCK_PROTOCOL
from gonka_p2p.wire.schema import WireError

from gonka_p2p.actors.replica.chain import Chain
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.runtime import Runtime
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

log = logging.getLogger(__name__)

BODIES_PER_PROPOSAL = 2  # per (height, round, proposer): the first, and a conflicting second (evidence)


class ProposalBodies:
    """Builds, checks, compacts, rebuilds, fetches and serves the blocks that proposals carry."""

    def __init__(self, peer_id: str, service: NetworkService, core: ConsensusState, runtime: Runtime,
                 chain: Chain, mempool: Mempool, announced: Callable[[bytes], bool],
                 clock: Callable[[], float], params: ReplicaParams, metrics: ReplicaMetrics) -> None:
        self._peer_id = peer_id
        self._service = service
        self._core = core
        self._runtime = runtime
        self._chain = chain
        self._mempool = mempool
        self._announced = announced  # whether peers have our transaction with this hash already
        self._clock = clock
        self._params = params
        self._metrics = metrics
        self._bodies: dict[bytes, tuple[int, bytes]] = {}  # block hash -> (height, block) we can serve
        # (height, round, proposer) -> hashes of the bodies rebuilt, fetched or being fetched for it
        self._claimed: dict[tuple[int, int, str], set[bytes]] = {}

    def forget_below(self, height: int) -> None:
        """Drop the bodies and fetches of decided heights."""
        self._bodies = {h: b for h, b in self._bodies.items() if b[0] >= height}
        self._claimed = {k: c for k, c in self._claimed.items() if k[0] >= height}

    # ---- our proposals -------------------------------------------------------------------

    def build(self, height: int) -> bytes:
        """The block we propose at ``height``: as many mempool transactions as the caps allow."""
        started = time.thread_time()
        state = self._chain.state
        txs = self._mempool.reap(state, self._params.max_block_txs, self._params.max_block_bytes - 4096)
        last = self._chain.last_certificate
        if last is None:
            block = Block(height=height, prev_hash=state.last_block_hash, proposer=self._peer_id,
                          time_ms=max(int(self._clock() * 1000), state.time_ms + 1), txs=txs).encode()
        else:
            assert self._chain.last_validators is not None, "a committed height has its validators"
            block = Block(height=height, prev_hash=state.last_block_hash, proposer=self._peer_id,
                          time_ms=bft_time_ms(state.time_ms, last, self._chain.last_validators), txs=txs,
                          last_commit_round=last.round, last_commit=precommit_signatures(last)).encode()
        self._bodies[digest(block)] = (height, block)
        self._metrics.build_s += time.thread_time() - started
        return block

    def to_wire(self, p: Proposal) -> ProposalWire:
        """Inline if small; else compact if that is small enough; the body stays here to be fetched."""
        inline = len(p.block) <= self._params.inline_block_bytes
        compact = b""
        if not inline:
            self._bodies[p.block_hash] = (p.height, p.block)
            block = decode_block(p.block)  # we validated or built it
            compact = compact_block(block, self._announced).encode()
            if len(compact) > self._params.compact_block_bytes:
                compact = b""
        return proposal_to_wire(p, inline, compact)

    # ---- others' proposals ---------------------------------------------------------------

    def is_valid(self, height: int, raw: bytes) -> bool:
        """Would an honest proposer have built this block on our state? (consensus's valid(v))"""
        started = time.thread_time()
        try:
            return self._check_block(height, raw)
        finally:
            self._metrics.validate_s += time.thread_time() - started

    def _check_block(self, height: int, raw: bytes) -> bool:
        state = self._chain.state
        try:
            block = decode_block(raw)
            check_block(state, block)
        except (WireError, BlockMismatch) as e:
            log.info("block at height %d rejected: %s", height, e)
            return False
        if block.height != height or self._chain.validators.get(block.proposer) is None:
            return False
        if not self._time_is_decided(block):
            return False
        if len(set(block.txs)) != len(block.txs):
            return False
        for tx in block.txs:
            try:
                if decode_tx(tx, state.params.max_tx_bytes).message.chain_id != self._chain.chain_id:
                    return False
            except WireError:
                return False
        return True

    def _time_is_decided(self, block: Block) -> bool:
        """Its last commit proves the block before it, and its time is the BFT time of that commit."""
        state, last_validators = self._chain.state, self._chain.last_validators
        if last_validators is None:  # block 1: nothing decided a time before it
            if state.time_ms < block.time_ms <= int(self._clock() * 1000) + self._params.max_clock_drift_ms:
                return True
            log.info("block 1 rejected: time %d outside (%d, now + drift]", block.time_ms, state.time_ms)
            return False
        certificate = block.last_certificate()
        try:
            verify_commit(last_validators, state.height, state.last_block_hash, certificate,
                          self._chain.signatures.verify, chain_id=self._chain.chain_id)
        except InvalidCommit as e:
            log.info("block at height %d rejected: its last commit %s", block.height, e)
            return False
        decided = bft_time_ms(state.time_ms, certificate, last_validators)
        if block.time_ms != decided:
            log.info("block at height %d rejected: time %d, its last commit decides %d", block.height,
                     block.time_ms, decided)
            return False
        return True

    def receive(self, p: ProposalWire, relay: str) -> Proposal | None:
        """A gossiped proposal without its block: the block held or rebuilt here, else fetched (None now)."""
        held = self._bodies.get(p.block_hash)  # a rebroadcast, or a body we already rebuilt or fetched
        if held is not None:
            try:
                return proposal_from_wire(p, held[1])
            except WireError:
                return None
        if not self._claim(p):
            return None
        proposal = self._rebuild(p)
        if proposal is None:
            log.debug("proposal %d/%d from %s: fetching its block", p.height, p.round, p.proposer[-6:])
            self._fetch(p, relay)
        return proposal

    def _claim(self, p: ProposalWire) -> bool:
        """Whether to rebuild or fetch the body of ``p``, which then counts against its proposer's room.

        Only for a proposal the core would take (module docstring), cheapest
        checks first and the signature last. Where we know the height's
        validators (the one being decided) the signer must be the round's
        proposer; for the next height, whose set the commit may still change,
        a validator of ours, as the core's buffer asks.
        """
        core = self._core
        if not core.height <= p.height <= core.height + 1:
            return False
        current = core.round if p.height == core.height else 0
        if p.round > current + core.params.max_round_lookahead:
            return False
        if p.height == self._chain.state.height + 1 and self._chain.validators.proposer(p.round) != p.proposer:
            return False
        key = (p.height, p.round, p.proposer)
        claimed = self._claimed.get(key, set())
        if p.block_hash in claimed or len(claimed) >= BODIES_PER_PROPOSAL:
            return False
        if p.round > current and not claimed:
            ahead = {r for h, r, who in self._claimed if (h, who) == (p.height, p.proposer) and r > current}
            if len(ahead) >= core.params.max_future_rounds:
                return False
        if not self._chain.signed_proposal(p):
            return False
        self._claimed.setdefault(key, set()).add(p.block_hash)
        return True

    def _release(self, p: ProposalWire) -> None:
        """No body came for ``p``: a later copy of it may try again."""
        self._claimed.get((p.height, p.round, p.proposer), set()).discard(p.block_hash)

    def _rebuild(self, p: ProposalWire) -> Proposal | None:
        """A compact proposal's block from the transactions our mempool holds, if it holds them all.

        A block with more entries than we would propose, or larger than
        consensus allows, is fetched instead of built here.
        """
        if not p.compact:
            return None
        try:
            compact = CompactBlock.decode(p.compact)
            if len(compact.entries) > self._params.max_block_txs:
                return None
            raw = expand_block(compact, self._mempool.raw, max_bytes=self._core.params.max_block_bytes)
            proposal = proposal_from_wire(p, raw) if raw is not None else None
        except WireError:
            return None
        if proposal is not None:
            self._bodies[p.block_hash] = (p.height, proposal.block)  # others may fetch it from us
            self._metrics.proposals_rebuilt += 1
        return proposal

    def _fetch(self, p: ProposalWire, relay: str) -> None:
        """A proposal too large for gossip (claimed, so checked): fetch its block by hash."""
        others = [peer for peer in self._service.connected_peers() if peer not in (p.proposer, relay)]
        random.shuffle(others)  # every peer that validated the proposal holds the body too
        if self._runtime.spawn(self._fetch_from(p, [p.proposer, relay, *others])) is None:
            self._release(p)

    async def _fetch_from(self, p: ProposalWire, peers: list[str]) -> None:
        request = encode_frame(BlockRequest(block_hash=p.block_hash))
        for peer in dict.fromkeys(peers):
            try:
                body = decode_frame(await self._service.request(peer, BLOCK_PROTOCOL, request,
                                                                self._params.body_timeout_s), BlockBody)
                proposal = proposal_from_wire(p, body.block)
            except (NetworkError, TimeoutError, WireError) as e:
                log.debug("block %s from %s: %r", p.block_hash.hex()[:12], peer, e)
                continue
            self._bodies[p.block_hash] = (p.height, body.block)
            self._metrics.bodies_fetched += 1
            log.debug("proposal %d/%d: fetched its %d-byte block from %s", p.height, p.round, len(body.block),
                      peer[-6:])
            core = self._core
            await self._runtime.post_network(lambda: core.on_proposal(proposal))
            return
        # Nobody answered in time: the proposer re-broadcasts the proposal while its height is open,
        # and that copy may try again.
        self._release(p)

    async def serve(self, opener: str, frame: bytes, send: SendFrame) -> None:
        """A proposal's body: of this height (held in memory) or, for a late peer, already committed."""
        request = decode_frame(frame, BlockRequest)
        held = self._bodies.get(request.block_hash)
        block = held[1] if held is not None else await self._chain.store.block_by_hash(request.block_hash)
        if block is None:
            raise StreamReset("no such block here")  # the opener tries elsewhere
        await send(encode_frame(BlockBody(block=block)))
