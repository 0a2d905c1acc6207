"""The consensus state machine's message log: everything admitted at one height, indexed the
way the Tendermint rules ask for it (``consensus.ConsensusState`` keeps one per height)."""

from __future__ import annotations

from collections.abc import Callable

from gonka_p2p.ledger.consensus_types import Proposal, Vote, VoteType


class MessageLog:
    """Everything admitted at one height, indexed the way the rules ask ("empty message log" resets it).

    Votes are tallied per value, as in the paper: "2f+1 PREVOTE for id(v)"
    is the power of the distinct validators that signed a prevote for v. An
    equivocator's second vote is therefore counted for *its* value (never
    twice for one value, and once only in the "any" tallies). Without that, a
    byzantine validator that shows half the network one prevote and the other
    half another makes a proof-of-lock it helped form unverifiable for the
    second half, and a replica locked on it could never be unlocked.
    """

    def __init__(self) -> None:
        self.proposals: dict[int, Proposal] = {}  # round -> the first valid proposal of that round
        self.senders: dict[int, dict[str, int]] = {}  # round -> validator -> power (line 55)
        self._first: dict[tuple[int, VoteType], dict[str, Vote]] = {}  # each validator's first vote
        self._any: dict[tuple[int, VoteType], int] = {}
        self._by_value: dict[tuple[int, VoteType, bytes | None], dict[str, Vote]] = {}
        self._power: dict[tuple[int, VoteType, bytes | None], int] = {}

    def first_vote(self, round: int, vote_type: VoteType, validator: str) -> Vote | None:
        return self._first.get((round, vote_type), {}).get(validator)

    def has_vote(self, vote: Vote) -> bool:
        return vote.validator in self._by_value.get((vote.round, vote.type, vote.block_hash), {})

    def supported(self, vote: Vote) -> bool:
        """Somebody already voted for this value in this round: an equivocating vote for it is worth keeping."""
        return bool(self._by_value.get((vote.round, vote.type, vote.block_hash)))

    def add_vote(self, vote: Vote, power: int) -> None:
        first = self._first.setdefault((vote.round, vote.type), {})
        if vote.validator not in first:
            first[vote.validator] = vote
            self._any[(vote.round, vote.type)] = self._any.get((vote.round, vote.type), 0) + power
            self.senders.setdefault(vote.round, {})[vote.validator] = power
        key = (vote.round, vote.type, vote.block_hash)
        voters = self._by_value.setdefault(key, {})
        assert vote.validator not in voters, "a validator counts once per value"
        voters[vote.validator] = vote
        self._power[key] = self._power.get(key, 0) + power

    def add_proposal(self, proposal: Proposal, power: int) -> None:
        assert proposal.round not in self.proposals, "one proposal per round"
        self.proposals[proposal.round] = proposal
        self.senders.setdefault(proposal.round, {})[proposal.proposer] = power

    def power_for(self, round: int, vote_type: VoteType, block_hash: bytes | None) -> int:
        return self._power.get((round, vote_type, block_hash), 0)

    def power_any(self, round: int, vote_type: VoteType) -> int:
        return self._any.get((round, vote_type), 0)

    def votes_for(self, round: int, vote_type: VoteType, block_hash: bytes | None) -> list[Vote]:
        return list(self._by_value.get((round, vote_type, block_hash), {}).values())

    def votes_in_round(self, round: int) -> list[Vote]:
        return [v for (r, _, _), voters in self._by_value.items() if r == round for v in voters.values()]

    def precommit_quorums(self, is_quorum: Callable[[int], bool]) -> list[tuple[int, bytes, str]]:
        """(round, block hash, one of its precommitters) for each non-nil block with a precommit quorum."""
        return [(r, h, next(iter(self._by_value[(r, t, h)]))) for (r, t, h), power in self._power.items()
                if t is VoteType.PRECOMMIT and h is not None and is_quorum(power)]

    def future_rounds(self, validator: str, current: int) -> list[int]:
        return [r for r, who in self.senders.items() if r > current and validator in who]
