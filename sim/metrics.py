"""What a simulated run measured, read from the ledger's own epoch summaries where it can be.

The simulation loop reports a few events only it can see (a request's
arrival, a peer's first offence, an accusation); everything economic --
who was caught, who forfeited, rewards, reputations, checks and votes -- is
taken from the :class:`~gonka_p2p.ledger.state.EpochSummary` the state
machine wrote at each settlement, so the report is the ledger's verdict on
the run, not the simulator's opinion of it.

A strategy is *sanctioned* in an epoch when the ledger applied the penalty
meant for it: an executor cheat was caught (dispute or epoch test); a silent
executor's miss rate crossed ``miss_rate_limit_ppm`` (its reputation reset:
``rules.miss_rate_exceeded``); a lazy or colluding validator forfeited its
reward; an honest peer was caught (a false conviction). Time to catch runs
from the peer's first offence to the settlement that sanctioned it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from statistics import fmean, median

from gonka_p2p.ledger.genesis import Params
from gonka_p2p.ledger.rules import PPM, miss_rate_exceeded
from gonka_p2p.ledger.records import EpochSummary, ParticipantOutcome

from sim.economics import break_even, gini, honest_bet, profits
from sim.roster import Roster, Strategy


@dataclass(frozen=True)
class StrategyRow:
    strategy: str
    peers: int
    active_epochs: int  # epochs in which it offended (an honest peer: in which it executed)
    sanctioned_epochs: int
    detection: float | None  # sanctioned / active
    offenders: int  # peers that offended at least once
    caught_within_epoch: int  # peers sanctioned in the epoch of their first offence
    blocks_to_catch: float | None  # mean over sanctioned peers, first offence -> settlement
    epochs_to_catch: float | None  # 0: the settlement of the epoch of the first offence
    reward_per_weight: float  # minted reward per unit weight, relative to stable honest peers
    accusations: int  # disputes opened against its executions
    catch_blocks: list[int]  # per sanctioned peer: first offence -> settlement, blocks
    profit: float  # cumulative profit per weight / honest's (sim.economics): above 1, it pays
    cheated_share: float | None  # of the requests its members executed, those they cheated on


@dataclass(frozen=True)
class Report:
    config: dict[str, object]
    strategies: list[StrategyRow]
    network: dict[str, float | int | str]
    per_epoch: dict[str, list[float]]
    reward_curves: dict[str, list[float]]  # strategy -> cumulative reward per weight, by epoch
    profit_curves: dict[str, list[float]]  # strategy -> cumulative profit per weight / honest's
    break_even: list[dict[str, float | bool]]  # sim.economics.break_even for the run's cheaters
    rejected_txs: dict[str, int]  # "kind/reason" -> count
    app_hash: str
    poc: dict[str, object] = field(default_factory=dict)  # sim.poc's measurements, with proof of compute
    digest: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)


def report_digest(report: Report) -> str:
    """SHA-256 of everything the run reported, its final app hash included: equal digests
    mean the same run, bit for bit."""
    body = json.dumps({**asdict(report), "digest": ""}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class Metrics:
    roster: Roster
    params: Params
    summaries: list[EpochSummary] = field(default_factory=list)
    settled_heights: list[int] = field(default_factory=list)  # per summary: its settlement height
    latencies: list[int] = field(default_factory=list)  # blocks, request arrival -> settlement
    first_offence: dict[str, tuple[int, int]] = field(default_factory=dict)  # peer -> (height, epoch)
    offence_epochs: dict[str, set[int]] = field(default_factory=dict)
    accusations: Counter[str] = field(default_factory=Counter)  # executor strategy -> disputes
    refused: int = 0  # requests no executor could take
    silenced: int = 0  # requests a silent executor dropped
    epoch_floor: list[float] = field(default_factory=list)
    epoch_reputation: dict[str, list[float]] = field(default_factory=dict)  # strategy -> mean r
    epoch_p: dict[str, list[float]] = field(default_factory=dict)  # strategy -> mean p_validate
    costs: dict[tuple[str, int], float] = field(default_factory=dict)  # (peer, epoch) -> compute, coins
    served: Counter[str] = field(default_factory=Counter)  # peer -> requests it executed
    cheated: Counter[str] = field(default_factory=Counter)  # peer -> of those, cheated on
    own_requests: Counter[bool] = field(default_factory=Counter)  # self-dealers' own: sent to own executor?
    # epoch -> compute in tokens generated: executions (less what a cheat saves), and the checks and
    # dispute votes of that epoch's inferences (each re-runs the inference's tokens as one prefill, at
    # val_over_gen of generating them): what validation's share of the network's compute is made of
    inference_compute: Counter[int] = field(default_factory=Counter)
    validation_compute: Counter[int] = field(default_factory=Counter)

    def spend(self, peer: str, epoch: int, coins: float) -> None:
        """``peer`` spent ``coins`` of compute on work of ``epoch`` (executing or checking)."""
        self.costs[(peer, epoch)] = self.costs.get((peer, epoch), 0.0) + coins

    def compute(self, peer: str, epoch: int, tokens: float, coins_per_token: float, *, validating: bool) -> None:
        """``peer`` spent compute worth ``tokens`` generated tokens on work of ``epoch``: booked as
        its cost (:meth:`spend`) and towards validation's share of the network's compute."""
        (self.validation_compute if validating else self.inference_compute)[epoch] += tokens
        self.spend(peer, epoch, tokens * coins_per_token)

    def validation_share(self, epochs: list[int]) -> float:
        """Validation's share of the compute spent on ``epochs``' inferences (0 if none ran)."""
        checking = sum(self.validation_compute[e] for e in epochs)
        total = checking + sum(self.inference_compute[e] for e in epochs)
        return checking / total if total else 0.0

    def offence(self, peer: str, height: int, epoch: int) -> None:
        self.first_offence.setdefault(peer, (height, epoch))
        self.offence_epochs.setdefault(peer, set()).add(epoch)

    def epoch_started(self, floor_ppm: int, reputation_ppm: dict[str, int], p_ppm: dict[str, int]) -> None:
        """Record, per strategy, the mean reputation and validation probability at an epoch's start."""
        self.epoch_floor.append(floor_ppm / PPM)
        self._append_means(self.epoch_reputation, reputation_ppm)
        self._append_means(self.epoch_p, p_ppm)

    def _append_means(self, target: dict[str, list[float]], values_ppm: dict[str, int]) -> None:
        groups: dict[str, list[float]] = {}
        for peer in self.roster.peers:
            if peer.peer_id in values_ppm:
                groups.setdefault(str(peer.strategy), []).append(values_ppm[peer.peer_id] / PPM)
        for strategy, values in groups.items():
            target.setdefault(strategy, []).append(fmean(values))

    def settled(self, summary: EpochSummary, height: int) -> None:
        self.summaries.append(summary)
        self.settled_heights.append(height)

    # ------------------------------------------------------------------ the report

    def report(self, config: dict[str, object], rejected: Counter[tuple[str, str]], app_hash: bytes,
               coins: dict[str, float | int | str], bet: tuple[float, float] | None) -> Report:
        """The run's report; ``bet``: (d, s) of its executor cheaters, for the break-even table."""
        peers = self.roster.peers
        rewards = Counter[str]()
        for summary in self.summaries:
            for row in summary.participants:
                rewards[row.peer] += row.executor_reward + row.validator_reward
        caught = {row.peer for s in self.summaries for row in s.participants if row.caught}
        stable = [p for p in peers if p.strategy is Strategy.HONEST and not p.churns
                  and p.peer_id not in caught]
        honest_rpw = (sum(rewards[p.peer_id] for p in stable) / sum(p.weight for p in stable)
                      if stable else 0.0)
        profit = {row.strategy: row for row in profits(peers, stable, self.summaries, self.costs)}
        rows = [self._strategy_row(s, rewards, honest_rpw, profit[str(s)].cumulative) for s in Strategy
                if any(p.strategy is s for p in peers)]
        cheating = [p for p in peers if p.strategy.cheats_as_executor]
        table = None
        if bet is not None and cheating:
            table = honest_bet(stable, self.summaries, self.costs, fmean(p.weight for p in cheating), *bet)
        inferences = sum(s.inferences for s in self.summaries)
        checks = sum(r.checks for s in self.summaries for r in s.participants)
        votes = sum(r.votes for s in self.summaries for r in s.participants)
        per_inference = (checks + votes) / inferences if inferences else 0.0
        latencies = sorted(self.latencies)
        honest_ids = {p.peer_id for p in peers if p.strategy is Strategy.HONEST}
        network: dict[str, float | int | str] = {
            "epochs settled": len(self.summaries),
            "inferences settled": inferences,
            "settled per epoch": inferences / len(self.summaries) if self.summaries else 0.0,
            "expired (refunded)": sum(s.expired for s in self.summaries),
            "requests refused (no executor)": self.refused,
            "requests dropped by silent executors": self.silenced,
            "validations": checks,
            "dispute votes": votes,
            "checks per inference": per_inference,
            "validation compute share": self.validation_share([s.epoch for s in self.summaries]),
            "validation compute share, last epoch": self.validation_share([s.epoch for s in self.summaries[-1:]]),
            "latency mean (blocks)": fmean(latencies) if latencies else 0.0,
            "latency p50 (blocks)": median(latencies) if latencies else 0.0,
            "latency p95 (blocks)": latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0,
            "disputes": sum(s.disputes for s in self.summaries),
            "disputes invalid": sum(s.disputes_invalid for s in self.summaries),
            "honest accused (disputes)": self.accusations[str(Strategy.HONEST)],
            "honest convicted": sum(1 for s in self.summaries for r in s.participants
                                    if r.caught and r.peer in honest_ids),
            "fees refunded": sum(s.fees_refunded for s in self.summaries),
            "self-dealt share of own requests": (self.own_requests[True] / sum(self.own_requests.values())
                                                 if self.own_requests else 0.0),
            **fairness(stable, rewards),
            **coins,
        }
        return Report(
            config=config, strategies=rows, network=network,
            per_epoch={
                "settled": [float(s.inferences) for s in self.summaries],
                "expired": [float(s.expired) for s in self.summaries],
                "checks per inference": [
                    sum(r.checks + r.votes for r in s.participants) / s.inferences if s.inferences else 0.0
                    for s in self.summaries],
                "validation compute share": [self.validation_share([s.epoch]) for s in self.summaries],
                "floor m": self.epoch_floor,
                **{f"reputation {k}": v for k, v in sorted(self.epoch_reputation.items())},
                **{f"p_validate {k}": v for k, v in sorted(self.epoch_p.items())},
            },
            reward_curves=self._reward_curves(),
            profit_curves={s: row.cumulative for s, row in profit.items()},
            break_even=break_even(table, self.params) if table else [],
            rejected_txs={f"{k}/{r}": n for (k, r), n in sorted(rejected.items())},
            app_hash=app_hash.hex())

    def _sanctioned(self, strategy: Strategy, row: ParticipantOutcome) -> bool:
        if strategy is Strategy.SILENT:
            return miss_rate_exceeded(row.expired, row.inferences, self.params)
        if strategy in (Strategy.LAZY, Strategy.COLLUDING, Strategy.FRAMING):
            return bool(row.forfeit)
        return bool(row.caught)

    def _active(self, strategy: Strategy, peer: str, epoch: int, row: ParticipantOutcome) -> bool:
        if strategy is Strategy.HONEST:
            return row.inferences > 0
        return epoch in self.offence_epochs.get(peer, ())

    def _strategy_row(self, strategy: Strategy, rewards: Counter[str], honest_rpw: float,
                      profit: list[float]) -> StrategyRow:
        members = [p for p in self.roster.peers if p.strategy is strategy]
        active = sanctioned = within = offenders = 0
        blocks, epochs = [], []
        for peer in members:
            first_sanction = None
            for summary, height in zip(self.summaries, self.settled_heights, strict=True):
                row = summary.participant(peer.peer_id)
                if row is None or not self._active(strategy, peer.peer_id, summary.epoch, row):
                    continue
                active += 1
                if self._sanctioned(strategy, row):
                    sanctioned += 1
                    if first_sanction is None:
                        first_sanction = (height, summary.epoch)
            offence = self.first_offence.get(peer.peer_id)
            offenders += offence is not None
            if first_sanction is not None and offence is not None:
                blocks.append(first_sanction[0] - offence[0])
                epochs.append(first_sanction[1] - offence[1])
                within += first_sanction[1] == offence[1]
        served = sum(self.served[p.peer_id] for p in members)
        weight = sum(p.weight for p in members)
        rpw = sum(rewards[p.peer_id] for p in members) / weight if weight else 0.0
        return StrategyRow(
            strategy=str(strategy), peers=len(members), active_epochs=active,
            sanctioned_epochs=sanctioned, detection=sanctioned / active if active else None,
            offenders=offenders, caught_within_epoch=within, blocks_to_catch=fmean(blocks) if blocks else None,
            epochs_to_catch=fmean(epochs) if epochs else None,
            reward_per_weight=rpw / honest_rpw if honest_rpw else 0.0,
            accusations=self.accusations[str(strategy)], catch_blocks=blocks,
            profit=profit[-1] if profit else 0.0,
            cheated_share=(sum(self.cheated[p.peer_id] for p in members) / served) if served else None)

    def _reward_curves(self) -> dict[str, list[float]]:
        weight = Counter[str]()
        strategy_of = {}
        for p in self.roster.peers:
            weight[str(p.strategy)] += p.weight
            strategy_of[p.peer_id] = str(p.strategy)
        curves: dict[str, list[float]] = {s: [] for s in sorted(weight)}
        totals = Counter[str]()
        for summary in self.summaries:
            for row in summary.participants:
                totals[strategy_of[row.peer]] += row.executor_reward + row.validator_reward
            for s in curves:
                curves[s].append(totals[s] / weight[s])
        return curves


def fairness(stable: list, rewards: Counter[str]) -> dict[str, float | int]:
    """How the minted reward of honest peers that stayed all run tracks their weight: the worst
    relative deviation of a peer's reward share from its weight share, the Gini coefficient
    of reward per unit weight (0: perfectly proportional), and k in reward ~ weight^k fitted
    on logs (1: proportional)."""
    if len(stable) < 2:
        return {"fair: honest stable peers": len(stable)}
    total_w = sum(p.weight for p in stable)
    total_r = sum(rewards[p.peer_id] for p in stable) or 1
    ratios = [(rewards[p.peer_id] / total_r) / (p.weight / total_w) for p in stable]
    points = [(math.log(p.weight), math.log(rewards[p.peer_id])) for p in stable if rewards[p.peer_id] > 0]
    exponent = float("nan")
    if len(points) >= 2:
        mx, my = fmean(x for x, _ in points), fmean(y for _, y in points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        exponent = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")
    return {"fair: honest stable peers": len(stable),
            "fair: max |reward share / weight share - 1|": max(abs(r - 1) for r in ratios),
            "fair: Gini of reward per weight": gini([rewards[p.peer_id] / p.weight for p in stable]),
            "fair: k in reward ~ weight^k": exponent}
