"""The economics of cheating: does a strategy earn more than an honest peer of the same weight?

A peer's profit in an epoch is what the ledger paid it (fees for its settled
inferences plus its minted executor and validator rewards, from the epoch's
settlement summary) minus the compute it spent (the simulator's cost model:
``compute_cost_per_token`` per billable token executed, less the share a
cheat saves, and ``val_over_gen`` of that per token checked). A strategy's
*relative profit* is its profit per unit weight over the stable honest
peers' (1: as honest; above 1: the strategy pays).

The break-even table is the one-epoch bet a cheater makes, evaluated with the
ledger's own validation rate (:func:`~gonka_p2p.ledger.rules.validation_ppm`):
cheating on a share q of N inferences, each checked with probability p(r, m)
and failed when checked with probability d, it is caught with probability
P = 1 - (1 - p d)^(q N) and then loses the epoch's income I; it saves
q s C of compute C. It pays iff (1 - P) I - (1 - q s) C > I - C, i.e.
P I < q s C. The bet ignores the reputation reset that follows a catch (a
caught cheater is then checked at 100 %), so it is the cheater's best case.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean

from gonka_p2p.ledger.genesis import Params
from gonka_p2p.ledger.records import EpochSummary
from gonka_p2p.ledger.rules import PPM, validation_ppm

from sim.roster import Peer

BREAK_EVEN_Q = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
BREAK_EVEN_REPUTATION = (0.0, 0.5, 0.9, 1.0)
BREAK_EVEN_FLOOR = (0.01, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class Profit:
    strategy: str
    per_epoch: list[float]  # profit per weight / honest profit per weight, each settled epoch
    cumulative: list[float]  # the same ratio over epochs 0..e
    pays: bool  # cumulative ratio at the end above 1


def _income(summary: EpochSummary, peer: str) -> int:
    row = summary.participant(peer)
    return 0 if row is None else row.fees_paid + row.executor_reward + row.validator_reward


def profits(peers: tuple[Peer, ...], honest: list[Peer], summaries: list[EpochSummary],
            costs: dict[tuple[str, int], float]) -> list[Profit]:
    """Relative profit of each strategy against ``honest`` (the stable honest peers), by epoch."""
    def per_weight(group: list[Peer], summary: EpochSummary) -> float:
        weight = sum(p.weight for p in group)
        return sum(_income(summary, p.peer_id) - costs.get((p.peer_id, summary.epoch), 0.0)
                   for p in group) / weight if weight else 0.0

    rows = []
    honest_curve = [per_weight(honest, s) for s in summaries]
    for strategy in sorted({str(p.strategy) for p in peers}):
        members = [p for p in peers if str(p.strategy) == strategy]
        curve = [per_weight(members, s) for s in summaries]
        ratios = [c / h if h else 0.0 for c, h in zip(curve, honest_curve, strict=True)]
        cumulative, total, honest_total = [], 0.0, 0.0
        for c, h in zip(curve, honest_curve, strict=True):
            total, honest_total = total + c, honest_total + h
            cumulative.append(total / honest_total if honest_total else 0.0)
        rows.append(Profit(strategy, ratios, cumulative, bool(cumulative) and cumulative[-1] > 1.0))
    return rows


@dataclass(frozen=True)
class Bet:
    """What an honest peer of the cheaters' weight takes per epoch (measured in the run)."""

    income: float  # coins
    compute: float  # coins
    inferences: float
    detect: float  # d: chance a checked cheated inference fails
    saving: float  # s: share of compute the cheat saves


def honest_bet(honest: list[Peer], summaries: list[EpochSummary], costs: dict[tuple[str, int], float],
               weight: float, detect: float, saving: float) -> Bet | None:
    """The stable honest peers' mean income, compute and inferences per epoch, scaled to
    ``weight`` (epoch 0 left out: it mints nothing)."""
    paid = [s for s in summaries if s.epoch > 0]
    total = sum(p.weight for p in honest)
    if not paid or not total:
        return None
    scale = weight / total / len(paid)
    income = sum(_income(s, p.peer_id) for s in paid for p in honest) * scale
    compute = sum(costs.get((p.peer_id, s.epoch), 0.0) for s in paid for p in honest) * scale
    inferences = sum(row.inferences for s in paid for p in honest
                     if (row := s.participant(p.peer_id)) is not None) * scale
    return Bet(income, compute, inferences, detect, saving)


def catch_probability(bet: Bet, q: float, reputation: float, floor: float, params: Params) -> float:
    p = validation_ppm(round(reputation * PPM), round(floor * PPM), params) / PPM
    return 1.0 - (1.0 - p * bet.detect) ** (q * bet.inferences)


def break_even(bet: Bet, params: Params) -> list[dict[str, float | bool]]:
    """For each (q, reputation, floor): the chance of being caught within the epoch, the
    expected gain of cheating over honesty in coins per epoch, and whether it pays."""
    rows: list[dict[str, float | bool]] = []
    for q in BREAK_EVEN_Q:
        for reputation in BREAK_EVEN_REPUTATION:
            for floor in BREAK_EVEN_FLOOR:
                caught = catch_probability(bet, q, reputation, floor, params)
                gain = q * bet.saving * bet.compute - caught * bet.income
                rows.append({"q": q, "reputation": reputation, "floor": floor, "P(caught)": caught,
                             "gain": gain, "pays": gain > 0})
    return rows


def gini(values: list[float]) -> float:
    """0: all equal; towards 1: one takes everything (values clipped at 0)."""
    xs = sorted(max(v, 0.0) for v in values)
    n, mean = len(xs), fmean(xs) if xs else 0.0
    if n < 2 or not mean:
        return 0.0
    return sum((2 * i - n + 1) * x for i, x in enumerate(xs)) / (n * n * mean)

