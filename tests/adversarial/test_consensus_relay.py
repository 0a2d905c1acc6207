"""The consensus topic relays only what a replica can use: signed by a validator, new to it, not decided.

Attack (before): the topic validator checked shapes and membership only and left signatures
to the core, so a stranger's one message of 1,024 votes "from" a validator of the current
height, each with a made-up signature, crossed the whole network and cost every replica
1,024 signature checks on its loop -- a few such messages a second and no replica had time
to vote. And anyone could re-publish votes it had seen, or votes of decided heights, for
every replica to relay again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FAST

from gonka_p2p.actors.replica import Replica
from gonka_p2p.actors.replica import signatures as signatures_module
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.consensus_types import Vote, VoteType, make_proposal, make_vote
from gonka_p2p.ledger.consensus_wire import ConsensusMessage, proposal_to_wire, vote_to_wire
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.wire.unsigned import encode_frame

CHAIN = "gonka-consensus-relay-test"
VALIDATORS = [Keypair.from_seed(f"relay-{i}".encode()) for i in range(4)]
GENESIS = Genesis(chain_id=CHAIN, params=Params(price_per_token={"m": 1}),
                  participants=tuple(GenesisParticipant(k.public_key, 10, models=("m",)) for k in VALIDATORS))


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[Replica]:
    """A replica opened at genesis (height 1 is the next to decide), not running."""
    service = MemoryHub().service(VALIDATORS[0])
    await service.start()
    replica = Replica(service, VALIDATORS[0], GENESIS, tmp_path, FAST)
    await replica.open()
    yield replica
    await replica.close()
    await service.stop()


def vote(key: Keypair, height: int = 1, round: int = 0, forged: bool = False) -> Vote:
    sign = (lambda message: key.sign(message + b"!")) if forged else key.sign
    return make_vote(CHAIN, sign, key.peer_id, VoteType.PREVOTE, height, round, None, 1_000)


def message(*votes: Vote, seq: int = 1) -> bytes:
    return encode_frame(ConsensusMessage(seq=seq, proposals=[], votes=[vote_to_wire(v) for v in votes]))


def test_votes_with_made_up_signatures_are_not_relayed(replica: Replica) -> None:
    relay = replica._consensus.validator()
    forged = [vote(VALIDATORS[1], round=r, forged=True) for r in range(3)]
    assert not relay("stranger", message(*forged))
    assert not relay("stranger", message(vote(VALIDATORS[2]), forged[0]))


def test_a_vote_the_core_took_is_relayed_again_beside_a_new_one_or_once_an_interval(replica: Replica) -> None:
    """Re-published as often as one likes, a vote every replica holds is passed on once per
    rebroadcast interval: what the core's own rebroadcasts need to reach a replica that a
    partition cut off, through replicas that hold the vote."""
    now = [0.0]
    replica._consensus._clock = lambda: now[0]
    relay = replica._consensus.validator()
    first, second = vote(VALIDATORS[1]), vote(VALIDATORS[2])
    assert relay("peer", message(first))
    replica._core.start(1, replica._chain.validators)
    replica._core.on_vote(first)
    assert not relay("stranger", message(first, seq=2))  # re-published: nothing new
    assert relay("peer", message(first, second, seq=3))  # a rebroadcast that brings one new vote
    now[0] += replica._core.params.rebroadcast_interval_ms / 1000
    assert relay("peer", message(first, seq=4))  # a rebroadcast an interval later
    assert not relay("stranger", message(first, seq=5))


def test_a_vote_the_core_dropped_reaches_it_again_in_a_rebroadcast(replica: Replica) -> None:
    """Relayed while the core had not started (a replica catching up): the core dropped it, so
    the vote is still new here, and a rebroadcast of it must reach the core."""
    relay = replica._consensus.validator()
    first = vote(VALIDATORS[1])
    assert relay("peer", message(first))
    replica._core.on_vote(first)
    assert replica._core.ignored["not_started"] == 1
    assert relay("peer", message(first, seq=2))


def test_votes_of_a_decided_height_are_not_relayed_on_their_own(replica: Replica) -> None:
    relay = replica._consensus.validator()
    late = vote(VALIDATORS[1], height=0)
    assert not relay("stranger", message(late))
    assert relay("peer", message(vote(VALIDATORS[1], height=2)))  # later: this replica may be behind
    assert relay("peer", message(late, vote(VALIDATORS[2])))  # coalesced with the next height's


def test_a_signed_proposal_is_relayed_and_an_unsigned_one_is_not(replica: Replica) -> None:
    relay = replica._consensus.validator()
    proposer = next(k for k in VALIDATORS if k.peer_id == replica._chain.validators.proposer(0))
    signed = make_proposal(CHAIN, proposer.sign, proposer.peer_id, 1, 0, -1, b"block")
    forged = make_proposal(CHAIN, lambda m: proposer.sign(m + b"!"), proposer.peer_id, 1, 0, -1, b"block")

    def frame(p, seq=1):
        return encode_frame(ConsensusMessage(seq=seq, proposals=[proposal_to_wire(p, inline=True)], votes=[]))
    assert not relay("stranger", frame(forged))
    assert relay("peer", frame(signed))
    replica._core.start(1, replica._chain.validators)
    replica._core.on_proposal(signed)
    assert not replica._core.ignored
    assert not relay("stranger", frame(signed, seq=2))


def test_a_relayed_vote_costs_its_signature_check_once(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = []
    real = signatures_module.verify_signature
    monkeypatch.setattr(signatures_module, "verify_signature", lambda *a: checked.append(a) or real(*a))
    relay = replica._consensus.validator()
    v = vote(VALIDATORS[1])
    assert relay("peer", message(v))
    replica._core.start(1, replica._chain.validators)
    replica._core.on_vote(v)
    assert not replica._core.ignored, "the core took the vote"
    assert len(checked) == 1
