"""The chain's consensus, simulated for an economic run: when each block commits, and whether safely.

Theory of operation
-------------------
A scenario with ``[consensus] validators = N`` runs, before its economic
loop, the byzantine consensus simulator (:mod:`sim.consensus_sim`, the real
:class:`~gonka_p2p.ledger.consensus.ConsensusState` in N replicas) for every
height the economic run needs, from the same seed: ``byzantine_share`` of the
replicas equivocate (conflicting twins, invalid proposals), withhold their
votes or crash (send nothing), and ``partitions`` windows split the replicas in two halves (neither
holds 2/3, so no block commits meanwhile) at random times and heal
``partition_ms`` later at most. What comes out is one virtual
commit time per height -- the first honest replica's -- which becomes that
block's time on the ledger (:class:`sim.chain.Chain`), and a verdict:

* ``unsafe``: two honest replicas committed different blocks at one height
  (or an honest one broke an invariant); the chain stops there; or byzantine
  power is >= 1/3 and no fork happened to show -- the protocol promises
  nothing then, and the report says so rather than pass silently;
* ``stalled``: some height was never committed within ``stall_ms`` of
  virtual time after the one before; the economic run stops at the last
  committed block, so what would have settled later never does;
* ``safe``: every height committed, byzantine power below 1/3.

So a partition or a crash delays blocks, and with them every transaction,
settlement and reward; request latency in milliseconds then carries the
delay (and a request older than the freshness window when its block finally
commits is refused as stale, as on the real chain). Serving is modelled per
block: the traffic a stall would hold back lands in the block after it.

The same faults reach the serving layer (:class:`ConsensusOutcome` keeps
them for the economic loop): participant *i* of the roster runs replica
*i* mod N, so it sits on that replica's side of every partition -- a TA
cannot reach an executor across one while it holds, and routes to the next
draw on its own side, or refuses -- and a participant whose replica crashed
is down for the whole run, as executor, TA and validator alike.

Replicas hold equal power (the byzantine share is a count); the economic
peers' weights are not consensus power in this model.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import fmean

from sim.config import SimConfig
from sim.consensus_sim import Network, Scenario, SimFailure, Simulation


@dataclass(frozen=True)
class ConsensusOutcome:
    verdict: str  # "safe" | "stalled" | "unsafe"
    why: str
    commit_ms: tuple[int, ...]  # virtual ms at which heights 1, 2, ... committed (first honest replica)
    byzantine_power: float
    evidence: int  # equivocations the replicas reported
    max_round: int
    partitions: tuple[tuple[int, int], ...] = ()  # [start, end) virtual ms windows
    sides: tuple[int, ...] = ()  # each replica's side (0/1) of every partition
    crashed: tuple[int, ...] = ()  # replicas that sent nothing (byzantine, crash mode)

    def apart(self, a: int, b: int, at_ms: int) -> bool:
        """Are the participants running replicas ``a`` and ``b`` (indices mod N) cut apart at ``at_ms``?"""
        n = len(self.sides)
        return bool(n) and self.sides[a % n] != self.sides[b % n] and any(
            start <= at_ms < end for start, end in self.partitions)

    @property
    def heights(self) -> int:
        return len(self.commit_ms)

    def lines(self) -> dict[str, float | int | str]:
        """The report's consensus lines: the verdict and how long blocks took."""
        gaps = sorted(b - a for a, b in zip((0, *self.commit_ms), self.commit_ms))
        return {"consensus: verdict": self.verdict, "consensus: why": self.why,
                "consensus: byzantine power": round(self.byzantine_power, 4),
                "consensus: heights committed": self.heights,
                "commit latency mean (ms)": round(fmean(gaps), 1) if gaps else 0.0,
                "commit latency p99 (ms)": gaps[int(0.99 * (len(gaps) - 1))] if gaps else 0,
                "commit latency max (ms)": gaps[-1] if gaps else 0,
                "consensus: evidence of equivocation": self.evidence,
                "consensus: highest round": self.max_round}


def consensus_scenario(config: SimConfig, heights: int) -> Scenario:
    """The consensus run of ``config``'s seed: N equal replicas, the byzantine ones, the two
    halves and the partition windows drawn from the seed, spread over the run's expected duration."""
    rng = random.Random(f"consensus/{config.seed}")
    n = config.validators
    order = list(range(n))
    rng.shuffle(order)
    byzantine = tuple(sorted(order[:math.ceil(config.byzantine_share * n - 1e-9)]))
    span = heights * config.max_delay_ms  # within a healthy run (a height takes ~1.7 delays), ms
    windows = []
    for _ in range(config.partitions):
        start = rng.randrange(max(span, 1))
        windows.append((start, start + rng.randint(config.partition_ms // 2, config.partition_ms)))
    halves = order[n // 2:]  # a balanced split: neither side holds the 2/3 that commits
    network = Network(min_delay_ms=1, max_delay_ms=config.max_delay_ms, partitions=tuple(sorted(windows)),
                      partition_sides=tuple(int(i in halves) for i in range(n)))
    return Scenario(seed=config.seed, powers=(1,) * n, byzantine=byzantine, network=network,
                    target_heights=heights, liveness_window_ms=heights * config.stall_ms,
                    byzantine_mode=config.byzantine, bound_byzantine=False, stall_ms=config.stall_ms,
                    real_signatures=config.real_signatures)


def run_consensus(config: SimConfig, heights: int) -> ConsensusOutcome:
    """Run the chain's consensus for ``heights`` heights; never raises on a protocol failure
    (that is the verdict)."""
    scenario = consensus_scenario(config, heights)
    simulation = Simulation(scenario)
    failure = None
    try:
        simulation.run()
    except SimFailure as e:
        failure = str(e)
    first: dict[int, int] = {}
    for replica in simulation.honest:
        for height, at in replica.commit_times.items():
            first[height] = min(at, first.get(height, at))
    commit_ms: list[int] = []
    while len(commit_ms) + 1 in first and len(commit_ms) < heights:
        at = first[len(commit_ms) + 1]
        if commit_ms and at - commit_ms[-1] > config.stall_ms:
            break
        commit_ms.append(at)
    power = len(scenario.byzantine) / config.validators
    if failure is not None:
        verdict, why = "unsafe", failure
    elif len(commit_ms) < heights:
        verdict, why = "stalled", (f"no commit of height {len(commit_ms) + 1} within {config.stall_ms} ms "
                                   f"(byzantine power {power:.2f}, {scenario.byzantine_mode})")
    elif not scenario.tolerated:
        verdict, why = "unsafe", (f"byzantine power {power:.2f} >= 1/3: no fork showed in this run, "
                                  f"but the protocol excludes none")
    else:
        verdict, why = "safe", f"{heights} heights, no fork, byzantine power {power:.2f} < 1/3"
    network = scenario.network
    return ConsensusOutcome(verdict, why, tuple(commit_ms), power, len(simulation.evidence),
                            simulation.stats["max_round"], network.partitions, network.partition_sides,
                            scenario.byzantine if scenario.byzantine_mode == "crash" else ())
