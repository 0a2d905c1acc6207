"""The epoch test, carried across epochs: one executor's three Wald runs continue where the
last settlement left them until they decide.

Theory of operation. At each settlement the ledger folds an executor's
checked inferences of the epoch (one :class:`~gonka_p2p.ledger.rules.Observation`
each) into two restarted Bernoulli SPRTs in integer micro-nats
(:func:`~gonka_p2p.ledger.rules.wald_step_micro`): the failure test counts
failed inferences, the flag test failed-or-suspicious ones; and, where the
genesis pins the model's distance run, each inference's log-likelihood ratio
from its mean distance into a third (``distance_test.py``). One epoch's
evidence is enough for any cheat that fails or looks suspicious often, but
not for a subtle one close to honest noise: at a pinned bf16, int8 weights
sit about 25 % above the honest distance, so a few of its outputs are
suspicious and an epoch of ~30 checks rarely reaches the accusing bound
(``benchmarks/results/detection_matrix.md``, tokens to detect). A test that
forgets at every epoch boundary never catches it; one that carries its
log-likelihood ratios does, in as many epochs as its evidence needs.

The rule, per executor and test, at each settlement:

- start from the carried ratio (0 for a new executor), step through the
  epoch's observations in their canonical order;
- reaching the cheating bound accuses (the executor is caught for this
  epoch, exactly as an in-epoch accusation was): both runs reset to 0, the
  question is decided;
- reaching the honest bound restarts the run from 0, as within an epoch;
- otherwise the run ends the epoch undecided and carries ``max(0, llr)``:
  evidence against an executor carries over, good behaviour buys no credit
  for later epochs (the restart already bounds that credit within one
  epoch; dropping it at the boundary makes the carried test only stricter,
  never laxer, than running the whole history as one restarted test).

An executor caught by other means (a dispute, equivocation) is decided too:
its runs reset. Pure integers, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gonka_p2p.ledger.rules import Observation, wald_add_micro, wald_step_micro

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params

Carry = tuple[int, int, int]  # micro-nats: (failure, flag, distance run), each in [0, cheating bound)
NO_CARRY: Carry = (0, 0, 0)


@dataclass(frozen=True, slots=True)
class EpochTest:
    """One executor's epoch test at a settlement: accused or not, and what it carries on."""

    accused: bool
    carry: Carry


def run_epoch_test(observations: Sequence[Observation], carried: Carry, params: Params,
                   distance_llrs: Sequence[int] = ()) -> EpochTest:
    """The three Wald runs from ``carried`` (see the module docstring): two over
    ``observations``, the distance run over ``distance_llrs`` (micro-nats, one per checked
    inference of a model with a pinned distance run, ``distance_test.output_llr_micro``). The
    runs are independent, so each is stepped through on its own; any run accusing accuses, and
    an accusation resets all three."""
    failures, flags, distance = carried
    assert all(0 <= run < params.sprt_cheating_bound_micro for run in carried)
    for observation in observations:
        failures, failed_accuses = wald_step_micro(
            failures, observation is Observation.FAILED,
            params.sprt_failed_hit_llr_micro, params.sprt_failed_miss_llr_micro, params)
        flags, flag_accuses = wald_step_micro(
            flags, observation is not Observation.CLEAN,
            params.sprt_far_hit_llr_micro, params.sprt_far_miss_llr_micro, params)
        if failed_accuses or flag_accuses:
            return EpochTest(True, NO_CARRY)
    for llr in distance_llrs:
        distance, distance_accuses = wald_add_micro(distance, llr, params)
        if distance_accuses:
            return EpochTest(True, NO_CARRY)
    return EpochTest(False, (max(0, failures), max(0, flags), max(0, distance)))
