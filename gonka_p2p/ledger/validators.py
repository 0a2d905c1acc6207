"""Which validators decide each height, as a pure function of ledger state.

The validator set is the participants with positive weight, each voting
with its weight. Height 1 is decided by the genesis participants (all
priorities zero); after block h commits, the set of h + 1 is the set of h
one proposer election later (:meth:`ValidatorSet.next_height`) with the
weights the state holds after h (:meth:`ValidatorSet.updated` for any that
changed, CometBFT's rules for newcomers and removals). So every replica that
applied the same blocks agrees on every height's validators and proposers,
and a restarted replica recomputes them from its stored blocks.
"""

from __future__ import annotations

from gonka_p2p.ledger.consensus_types import Validator, ValidatorSet
from gonka_p2p.ledger.state import LedgerState


class NoValidators(Exception):
    """The state names no participant with positive weight: nobody could ever commit a block."""


def _from_state(state: LedgerState) -> dict[str, Validator]:
    validators = {}
    for address, weight in state.weights().items():
        participant = state.participant(address)
        assert participant is not None, "weights() only lists participants"
        validators[address] = Validator(address, participant.pubkey, weight)
    return validators


def initial_validator_set(state: LedgerState) -> ValidatorSet:
    """The validators of the height after ``state`` when no earlier set is known (genesis)."""
    validators = _from_state(state)
    if not validators:
        raise NoValidators("no participant has a positive weight in this state (check the genesis)")
    return ValidatorSet(validators.values())


def validator_set_after(current: ValidatorSet, state: LedgerState) -> ValidatorSet:
    """The set of the next height, given the set that decided the block ``state`` was built by."""
    wanted = _from_state(state)
    if not wanted:
        raise NoValidators(f"no participant has a positive weight after height {state.height}")
    following = current.next_height()
    changes = [v for v in wanted.values() if following.get(v.address) != v]
    changes += [Validator(v.address, v.public_key, 0) for v in following.validators if v.address not in wanted]
    return following.updated(changes) if changes else following
