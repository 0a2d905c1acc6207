"""Consensus gossip: proposals and votes on the consensus topic, out (coalesced) and in (checked, posted).

**Out.** What the driver broadcasts (already persisted) is published by one
sender task, coalesced into few gossip messages: each proposal on its own
(its body inline, compact or left to be fetched: ``proposals.py``), votes
up to ``VOTES_PER_MESSAGE`` a message. Consensus goes first: while it has
something to publish, ``idle`` is clear and no transaction batch starts
(both share the peers' outbound queues and the network thread), so an
overloaded network queues transactions, not votes.

**In.** The topic validator (run before delivery and forwarding, possibly
on the network thread) relays a message only if every proposal and vote in
it is by a validator, every one of a height not decided here has a good
signature, and at least one of those is due (``Chain.signatures``): not
yet taken by the core, or not passed on for a rebroadcast interval; those
of decided heights ride along unchecked (the sender coalesced a late vote
with the next height's). Otherwise a stranger's one message of a thousand
votes "from" a validator with made-up signatures crossed the whole network
and cost every replica a thousand checks on its loop, and anyone could
re-publish what every replica held, or votes of decided heights, as often
as it liked for all to relay again. Held messages are still passed on once
an interval: the core's rebroadcasts are how a replica cut off by a
partition hears the round again. Each signature is checked once per
replica: the core's check is a lookup.

The handler decodes, resolves each proposal's block, and posts one event to
the driver. What the shell acts on before the core sees a message is
checked here first: a body is fetched or rebuilt only for a signed proposal
(``proposals.py``), and a later height is a reason to start ours only on a
valid signature (``Driver.note_height``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from functools import partial

from gonka_p2p.gossip.service import MessageValidator
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import Proposal, Vote
from gonka_p2p.ledger.consensus_wire import (
    ConsensusMessage,
    ProposalWire,
    VoteWire,
    proposal_from_wire,
    vote_from_wire,
    vote_to_wire,
)
from gonka_p2p.wire.protocols import CONSENSUS_TOPIC
from gonka_p2p.wire.schema import WireError

from gonka_p2p.actors.replica.chain import Chain
from gonka_p2p.actors.replica.params import ReplicaMetrics
from gonka_p2p.actors.replica.proposals import ProposalBodies
from gonka_p2p.actors.replica.runtime import Publish, Runtime
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

VOTES_PER_MESSAGE = 1024


class ConsensusGossip:
    """Publishes the driver's broadcasts and posts what peers publish."""

    def __init__(self, core: ConsensusState, runtime: Runtime, chain: Chain, proposals: ProposalBodies,
                 saw_height: Callable[[int, Callable[[], bool]], None], publish: Publish, idle: asyncio.Event,
                 metrics: ReplicaMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._core = core
        self._runtime = runtime
        self._chain = chain
        self._proposals = proposals
        self._saw_height = saw_height  # (height, whether its message is signed): Driver.note_height
        self._publish = publish
        self.idle = idle  # set while no consensus message waits to be published
        self.idle.set()
        self._metrics = metrics
        self._clock = clock  # the relay's: when a held message is due again (any thread)
        self._outgoing: list[Proposal | Vote] = []
        self._outgoing_ready = asyncio.Event()
        self._publication = itertools.count(time.time_ns())  # see consensus_wire: "Uniqueness on gossip"

    def broadcast(self, message: Proposal | Vote) -> None:
        """Queue a message the driver has persisted; the sender task publishes it."""
        self._outgoing.append(message)
        self._outgoing_ready.set()

    def validator(self) -> MessageValidator:
        """Relay what is signed, undecided and due here (module docstring); safe on the network thread."""
        chain = self._chain

        def validate(sender: str, data: bytes) -> bool:
            try:
                msg = decode_frame(data, ConsensusMessage)
                signed = [(p.proposer, p.height, chain.proposal_sign_bytes(p), p.signature) for p in msg.proposals]
                signed += [(v.validator, v.height, vote.sign_bytes(chain.chain_id), v.signature)
                           for v, vote in ((v, vote_from_wire(v)) for v in msg.votes)]
            except WireError:
                return False
            decided, known, due = chain.state.height, chain.known_validators, False
            if any(signer not in known for signer, _, _, _ in signed):
                return False
            now, every = self._clock(), self._core.params.rebroadcast_interval_ms / 1000
            for signer, height, message, signature in signed:
                if height <= decided:
                    continue  # nothing new, nor worth a check: a late vote beside the next height's
                if not chain.signed_by_validator(signer, message, signature):
                    return False
                due |= chain.relay_due(signer, message, signature, now, every)
            return due

        return validate

    async def on_message(self, sender: str, data: bytes) -> None:
        try:
            msg = decode_frame(data, ConsensusMessage)
            votes = [vote_from_wire(v) for v in msg.votes]
            inline = [proposal_from_wire(p, p.block) for p in msg.proposals if p.inline]
        except WireError:
            return
        self._note_later_heights(msg.proposals, votes)
        for p in msg.proposals:
            if p.inline or p.height < self._core.height:
                continue
            proposal = self._proposals.receive(p, sender)
            if proposal is not None:
                inline.append(proposal)
        core = self._core
        await self._runtime.post_network(lambda: [a for p in inline for a in core.on_proposal(p)]
                                         + [a for v in votes for a in core.on_vote(v)])

    def _note_later_heights(self, proposals: list[ProposalWire], votes: list[Vote]) -> None:
        """Show the driver the messages of later heights, each with the check of its signature, which
        the driver runs only if the message would make it start a height."""
        signed_by, chain_id, height = self._chain.signed_by_validator, self._chain.chain_id, self._core.height
        for p in proposals:
            if p.height > height:
                self._saw_height(p.height, partial(self._chain.signed_proposal, p))
        for v in votes:
            if v.height > height:
                self._saw_height(v.height, partial(signed_by, v.validator, v.sign_bytes(chain_id), v.signature))

    async def send(self) -> None:
        """Publish what the driver broadcast, coalesced into few gossip messages (module docstring)."""
        while True:
            if not self._outgoing:
                self.idle.set()
            await self._outgoing_ready.wait()
            self.idle.clear()
            self._outgoing_ready.clear()
            messages, self._outgoing = self._outgoing, []
            votes = [vote_to_wire(m) for m in messages if isinstance(m, Vote)]
            frames = [self._frame(proposals=[self._proposals.to_wire(m)], votes=[])
                      for m in messages if isinstance(m, Proposal)]
            frames += [self._frame(proposals=[], votes=votes[i:i + VOTES_PER_MESSAGE])
                       for i in range(0, len(votes), VOTES_PER_MESSAGE)]
            for frame in frames:
                await self._publish(CONSENSUS_TOPIC, frame)
                self._metrics.consensus_published += 1

    def _frame(self, proposals: list[ProposalWire], votes: list[VoteWire]) -> bytes:
        return encode_frame(ConsensusMessage(seq=next(self._publication), proposals=proposals, votes=votes))
