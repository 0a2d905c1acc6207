"""Deterministic simulation of a network of Tendermint validators, replayable from one seed.

Theory of operation
-------------------
N replicas, each a :class:`~gonka_p2p.ledger.consensus.ConsensusState`
driven exactly as a replica actor would drive it, exchange messages through
a simulated network on *virtual* time: one priority queue of (time, sequence
number, thunk) holds every pending delivery, timer and application answer,
and the loop pops them in order. Every random choice -- voting powers, which
validators are byzantine, block contents, delays, drops, duplicates, the
partition window, what a byzantine validator sends to whom -- is drawn from
``random.Random`` streams seeded by the scenario's one seed and consumed in
that single event order, so ``simulate(Scenario.random(seed, n))`` replays
bit for bit, and a failing seed is a complete bug report (``python -m
sim.consensus_sim --seed S --validators N``).

The network: each message is delayed uniformly in [min, max] ms, may be
duplicated, and before ``stabilize_ms`` (the paper's GST) may be dropped or
cut by partition windows that form and heal, each splitting the validators
into two sides. After GST nothing is lost, which is when the protocol must
make progress.

Byzantine validators (fewer than 1/3 of the power, unless the scenario lifts
that bound to see what breaks) run an honest core but, when they
*equivocate*, sign for every message they broadcast a conflicting twin
(another block, an invalid block, another vote) and send each peer one of
the two at random -- for another validator's vote they relay, the twin is a
forgery that signature checks must reject; they sometimes propose invalid
blocks and never serve catch-up requests. When they *withhold*, they send no
vote at all (and still propose); when they *crash*, they send nothing.

Invariants are checked where state changes, not only at the end: an honest
commit that conflicts with another honest commit at the same height, or
commits an invalid block, raises :class:`SafetyViolation` at once; an honest
replica whose signed positions do not strictly increase, or evidence against
an honest validator, raises :class:`InvariantViolation`. Every failure names
its seed.

Signatures: by default a keyed hash stands in for secp256k1 (a hundred times
faster; forgeable by anyone holding the public key, which no simulated actor
does -- byzantine validators only sign as themselves). ``real_signatures``
swaps in coincurve keys from :class:`gonka_p2p.identity.Keypair`.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from gonka_p2p.identity import Keypair, verify_signature
from gonka_p2p.ledger.commit_checks import verify_commit, verify_evidence
from gonka_p2p.ledger.consensus import ConsensusState
from gonka_p2p.ledger.consensus_types import (
    NEVER_SIGNED,
    Action,
    Broadcast,
    Commit,
    CommitCertificate,
    ConsensusParams,
    Evidence,
    PersistSafety,
    Proposal,
    ReportEvidence,
    RequestCommit,
    RequestProposal,
    SafetyState,
    ScheduleTimeout,
    SignFn,
    Validator,
    ValidatorSet,
    ValidateBlock,
    Vote,
    make_proposal,
    make_vote,
)

CHAIN_ID = "gonka-sim"
INVALID_PREFIX = b"INVALID"

SIM_PARAMS = ConsensusParams(
    timeout_propose_ms=400, timeout_propose_delta_ms=100,
    timeout_prevote_ms=200, timeout_prevote_delta_ms=100,
    timeout_precommit_ms=200, timeout_precommit_delta_ms=100,
    rebroadcast_interval_ms=500,
)


class SimFailure(AssertionError):
    """A property of the protocol failed in a simulated run; the message starts with the seed."""


class SafetyViolation(SimFailure):
    pass


class LivenessFailure(SimFailure):
    pass


class InvariantViolation(SimFailure):
    pass


# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True)
class Network:
    min_delay_ms: int = 1
    max_delay_ms: int = 50
    drop_rate: float = 0.0  # before stabilize_ms only
    duplicate_rate: float = 0.0
    partitions: tuple[tuple[int, int], ...] = ()  # [start, end) ms windows: the two sides cannot talk
    partition_sides: tuple[int, ...] = ()  # side (0/1) of each validator; empty: drawn from the seed
    stabilize_ms: int = 0  # GST: from here on nothing is dropped and no partition holds


@dataclass(frozen=True)
class Scenario:
    seed: int
    powers: tuple[int, ...]
    byzantine: tuple[int, ...] = ()  # indices into powers; together < 1/3 of the power
    network: Network = Network()
    params: ConsensusParams = SIM_PARAMS
    target_heights: int = 5  # liveness: every honest replica commits this many heights after GST ...
    liveness_window_ms: int = 20_000  # ... within this much virtual time after GST (the run stops there)
    app_delay_ms: int = 5  # the application answers build/validate requests within this
    real_signatures: bool = False
    byzantine_mode: str = "equivocate"  # or "withhold": send no votes; or "crash": send nothing
    bound_byzantine: bool = True  # refuse byzantine power >= 1/3 (the economic runs lift it)
    stall_ms: int | None = None  # stop once no honest replica has committed for this long

    def __post_init__(self) -> None:
        if self.bound_byzantine and not self.tolerated:
            raise ValueError("byzantine validators must hold less than 1/3 of the power")
        if self.byzantine_mode not in ("equivocate", "withhold", "crash"):
            raise ValueError(f"unknown byzantine mode {self.byzantine_mode!r}")

    @property
    def tolerated(self) -> bool:
        """Byzantine power below 1/3: the protocol promises no fork, and liveness after GST."""
        return 3 * sum(self.powers[i] for i in self.byzantine) < sum(self.powers)

    @classmethod
    def random(cls, seed: int, n_validators: int, **overrides: object) -> Scenario:
        """A scenario drawn from ``seed``: powers 1-10, up to f byzantine, lossy start, maybe a partition."""
        rng = random.Random(f"scenario/{seed}")
        powers = tuple(rng.randint(1, 10) for _ in range(n_validators))
        byzantine: list[int] = []
        order = list(range(n_validators))
        rng.shuffle(order)
        for i in order[: rng.randint(0, (n_validators - 1) // 3)]:
            if 3 * (sum(powers[j] for j in byzantine) + powers[i]) < sum(powers):
                byzantine.append(i)
        partitions = ()
        if rng.random() < 0.5:
            start = rng.randint(0, 2000)
            partitions = ((start, start + rng.randint(500, 3000)),)
        network = Network(
            min_delay_ms=1, max_delay_ms=rng.randint(5, 80),
            drop_rate=rng.uniform(0.0, 0.3), duplicate_rate=rng.uniform(0.0, 0.1),
            partitions=partitions,
            stabilize_ms=max(partitions[0][1] if partitions else 0, rng.randint(1000, 4000)),
        )
        scenario = cls(seed=seed, powers=powers, byzantine=tuple(sorted(byzantine)), network=network)
        return replace(scenario, **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- result


@dataclass
class SimResult:
    scenario: Scenario
    commits: dict[str, dict[int, bytes]]  # honest replica -> height -> block hash
    commit_times: dict[str, dict[int, int]]  # honest replica -> height -> virtual ms
    end_ms: int
    stats: Counter[str]
    evidence: list[Evidence]

    def heights_after_stabilization(self) -> dict[str, int]:
        gst = self.scenario.network.stabilize_ms
        return {r: sum(1 for t in times.values() if t >= gst) for r, times in self.commit_times.items()}

    def check_safety(self) -> None:
        """No two honest replicas committed different blocks at one height (also checked live)."""
        first: dict[int, bytes] = {}
        for blocks in self.commits.values():
            for height, block_hash in blocks.items():
                if first.setdefault(height, block_hash) != block_hash:
                    raise SafetyViolation(f"seed {self.scenario.seed}: two blocks committed at height {height}")

    def check_liveness(self) -> None:
        """Every honest replica committed ``target_heights`` heights within the window after GST."""
        s = self.scenario
        short = {r: n for r, n in self.heights_after_stabilization().items() if n < s.target_heights}
        if short:
            raise LivenessFailure(
                f"seed {s.seed}: within {s.liveness_window_ms} ms after GST at {s.network.stabilize_ms} ms, "
                f"these replicas committed fewer than {s.target_heights} heights: {short}; {self.summary()}")

    def summary(self) -> str:
        heights = [max(b, default=0) for b in self.commits.values()]
        s = self.stats
        return (f"seed={self.scenario.seed} n={len(self.scenario.powers)} byzantine={len(self.scenario.byzantine)} "
                f"heights={min(heights, default=0)}..{max(heights, default=0)} t={self.end_ms}ms "
                f"sent={s['sent']} dropped={s['dropped'] + s['partitioned']} max_round={s['max_round']} "
                f"catchups={s['catchup_commits']} evidence={len(self.evidence)}")


# --------------------------------------------------------------------------- the simulation


@dataclass
class _FetchCommit:
    height: int
    requester: int


@dataclass
class _CommitReply:
    block: bytes
    certificate: CommitCertificate


@dataclass
class _Replica:
    index: int
    validator: Validator
    sign: SignFn
    byzantine: bool
    core: ConsensusState
    side: int  # partition side
    safety: SafetyState = NEVER_SIGNED
    blocks: dict[int, tuple[bytes, CommitCertificate]] = field(default_factory=dict)
    commit_times: dict[int, int] = field(default_factory=dict)


def _sim_sign(public_key: bytes, message: bytes) -> bytes:
    return hashlib.sha256(public_key + message).digest()


def _sim_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    return signature == hashlib.sha256(public_key + message).digest()


def app_valid(block: bytes) -> bool:
    """The simulated application's block check."""
    return not block.startswith(INVALID_PREFIX)


class Simulation:
    """One run of a :class:`Scenario`; use :func:`simulate`."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.net = scenario.network
        self.rng = random.Random(f"run/{scenario.seed}")
        self.now = 0
        self.stats: Counter[str] = Counter()
        self.evidence: list[Evidence] = []
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self._decided: dict[int, bytes] = {}
        verify = verify_signature if scenario.real_signatures else _sim_verify
        keys = []
        for i, power in enumerate(scenario.powers):
            if scenario.real_signatures:
                key = Keypair.from_seed(f"sim-{i}".encode())
                keys.append((Validator(key.peer_id, key.public_key, power), key.sign))
            else:
                public = hashlib.sha256(f"sim-key-{i}".encode()).digest()
                keys.append((Validator(f"v{i}", public, power), partial(_sim_sign, public)))
        self._valsets = [ValidatorSet(v for v, _ in keys)]
        self.verify = verify
        self.replicas = [
            _Replica(i, v, sign, i in scenario.byzantine,
                     ConsensusState(chain_id=CHAIN_ID, verify=verify, address=v.address, sign=sign,
                                    clock_ms=lambda: self.now, params=scenario.params),
                     side=self.net.partition_sides[i] if self.net.partition_sides else self.rng.randrange(2))
            for i, (v, sign) in enumerate(keys)
        ]
        self.honest = [r for r in self.replicas if not r.byzantine]
        self._after_gst = Counter[int]()  # honest replica index -> heights committed after GST
        self._behind = len(self.honest)  # honest replicas short of target_heights after GST
        self._last_commit_ms = 0  # an honest replica's latest commit

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> SimResult:
        for r in self.replicas:
            self._start(r, 1)
        while self._queue and not self._done():
            self.now, _, thunk = heapq.heappop(self._queue)
            if self.now > self.net.stabilize_ms + self.scenario.liveness_window_ms:
                break
            if self.scenario.stall_ms is not None and self.now - self._last_commit_ms > self.scenario.stall_ms:
                break
            thunk()
        for r in self.replicas:
            self.stats.update({f"ignored_{k}": n for k, n in r.core.ignored.items()})
        return SimResult(
            scenario=self.scenario,
            commits={r.validator.address: {h: c.block_hash for h, (_, c) in r.blocks.items()} for r in self.honest},
            commit_times={r.validator.address: dict(r.commit_times) for r in self.honest},
            end_ms=self.now, stats=self.stats, evidence=self.evidence,
        )

    def validator_set(self, height: int) -> ValidatorSet:
        """The set of ``height`` (heights start at 1): genesis advanced one election per height."""
        while len(self._valsets) < height:
            self._valsets.append(self._valsets[-1].next_height())
        return self._valsets[height - 1]

    def _done(self) -> bool:
        return self._behind == 0

    def _at(self, time: int, thunk: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (time, self._seq, thunk))

    def _fail(self, kind: type[SimFailure], what: str) -> None:
        raise kind(f"seed {self.scenario.seed}: at {self.now} ms: {what}")

    # ---- the replica shell: actions --------------------------------------------------

    def _execute(self, r: _Replica, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, PersistSafety):
                self._persist(r, action.state)
            elif isinstance(action, Broadcast):
                self._broadcast(r, action.message)
            elif isinstance(action, ScheduleTimeout):
                self.stats["max_round"] = max(self.stats["max_round"], action.timeout.round)
                self._at(self.now + action.duration_ms, partial(self._timeout, r, action))
            elif isinstance(action, RequestProposal):
                block = self._build_block(r, action.height, action.round)
                self._at(self._app_time(), partial(self._answer_proposal, r, action, block))
            elif isinstance(action, ValidateBlock):
                self._at(self._app_time(), partial(self._answer_validation, r, action))
            elif isinstance(action, Commit):
                self._commit(r, action)
            elif isinstance(action, RequestCommit):
                self.stats["catchup_requests"] += 1
                peer = next((p for p in self.replicas if p.validator.address == action.peer), None)
                if peer is None or self.rng.random() < 0.5:
                    peer = self.rng.choice([p for p in self.replicas if p is not r])
                self._send(r, peer, _FetchCommit(action.height, r.index))
            elif isinstance(action, ReportEvidence):
                self._on_evidence(action.evidence)

    def _timeout(self, r: _Replica, action: ScheduleTimeout) -> None:
        self.stats[f"timeout_{action.timeout.kind.value}"] += 1
        self._execute(r, r.core.on_timeout(action.timeout))

    def _answer_proposal(self, r: _Replica, request: RequestProposal, block: bytes) -> None:
        self._execute(r, r.core.on_proposal_value(request.height, request.round, block))

    def _answer_validation(self, r: _Replica, request: ValidateBlock) -> None:
        self._execute(r, r.core.on_block_validated(request.block_hash, app_valid(request.block)))

    def _start(self, r: _Replica, height: int) -> None:
        self._execute(r, r.core.start(height, self.validator_set(height)))

    def _app_time(self) -> int:
        return self.now + self.rng.randint(0, self.scenario.app_delay_ms)

    def _persist(self, r: _Replica, state: SafetyState) -> None:
        if not r.byzantine and not r.safety.allows(state.height, state.round, state.step):
            self._fail(InvariantViolation, f"{r.validator.address} signed {state} after {r.safety}")
        r.safety = state

    def _build_block(self, r: _Replica, height: int, round: int) -> bytes:
        equivocating = r.byzantine and self.scenario.byzantine_mode == "equivocate"
        prefix = INVALID_PREFIX if equivocating and self.rng.random() < 0.3 else b""
        return prefix + f"block h={height} r={round} by={r.validator.address} ".encode() + self.rng.randbytes(16)

    def _commit(self, r: _Replica, action: Commit) -> None:
        h = action.height
        if not r.byzantine:
            if not app_valid(action.block):
                self._fail(SafetyViolation, f"{r.validator.address} committed an invalid block at height {h}")
            block_hash = action.certificate.block_hash
            if self._decided.setdefault(h, block_hash) != block_hash:
                self._fail(SafetyViolation, f"{r.validator.address} committed a different block at height {h}")
            if h != len(r.blocks) + 1:
                self._fail(InvariantViolation, f"{r.validator.address} committed height {h} out of order")
            verify_commit(self.validator_set(h), h, block_hash, action.certificate, self.verify, chain_id=CHAIN_ID)
            r.commit_times[h] = self.now
            self._last_commit_ms = self.now
            if self.now >= self.net.stabilize_ms:
                self._after_gst[r.index] += 1
                self._behind -= self._after_gst[r.index] == self.scenario.target_heights
        self.stats["commits"] += 1
        r.blocks[h] = (action.block, action.certificate)
        self._at(self.now, partial(self._start, r, h + 1))

    def _on_evidence(self, evidence: Evidence) -> None:
        verify_evidence(self.validator_set(evidence.height), evidence, self.verify, chain_id=CHAIN_ID)
        if not any(p.byzantine and p.validator.address == evidence.validator for p in self.replicas):
            self._fail(InvariantViolation, f"evidence against honest validator {evidence.validator}")
        self.evidence.append(evidence)

    # ---- byzantine behaviour -------------------------------------------------------------

    def _broadcast(self, r: _Replica, message: Proposal | Vote) -> None:
        mode = self.scenario.byzantine_mode
        if r.byzantine and mode != "equivocate":
            if mode == "crash" or isinstance(message, Vote):
                return
            twin = None
        else:
            twin = self._twin(r, message) if r.byzantine else None
        for peer in self.replicas:
            if peer is not r:
                self._send(r, peer, twin if twin is not None and self.rng.random() < 0.5 else message)

    def _twin(self, r: _Replica, m: Proposal | Vote) -> Proposal | Vote:
        """A conflicting message signed by byzantine ``r`` for the same (height, round, step)."""
        if isinstance(m, Proposal):
            prefix = INVALID_PREFIX if self.rng.random() < 0.5 else b""
            return make_proposal(CHAIN_ID, r.sign, m.proposer, m.height, m.round, m.pol_round,
                                 prefix + m.block + b" twin " + self.rng.randbytes(8))
        other = self.rng.randbytes(32) if m.block_hash is None or self.rng.random() < 0.5 else None
        return make_vote(CHAIN_ID, r.sign, m.validator, m.type, m.height, m.round, other, m.time_ms)

    # ---- the network ---------------------------------------------------------------------

    def _send(self, src: _Replica, dst: _Replica, payload: object) -> None:
        if src.side != dst.side and any(start <= self.now < end for start, end in self.net.partitions):
            self.stats["partitioned"] += 1  # a window that outlasts GST holds anyway (sim.consensus_run)
            return
        if self.now < self.net.stabilize_ms:
            if self.rng.random() < self.net.drop_rate:
                self.stats["dropped"] += 1
                return
        copies = 2 if self.rng.random() < self.net.duplicate_rate else 1
        for _ in range(copies):
            self.stats["sent"] += 1
            delay = self.rng.randint(self.net.min_delay_ms, self.net.max_delay_ms)
            self._at(self.now + delay, partial(self._deliver, dst, payload))

    def _deliver(self, dst: _Replica, payload: object) -> None:
        if isinstance(payload, Proposal):
            self._execute(dst, dst.core.on_proposal(payload))
        elif isinstance(payload, Vote):
            self._execute(dst, dst.core.on_vote(payload))
        elif isinstance(payload, _FetchCommit):
            stored = dst.blocks.get(payload.height)
            if stored is not None and not dst.byzantine:
                self._send(dst, self.replicas[payload.requester], _CommitReply(*stored))
        elif isinstance(payload, _CommitReply):
            actions = dst.core.on_commit_certificate(payload.block, payload.certificate)
            self.stats["catchup_commits"] += any(isinstance(a, Commit) for a in actions)
            self._execute(dst, actions)


def simulate(scenario: Scenario) -> SimResult:
    """Run ``scenario`` to completion; raises :class:`SimFailure` (with the seed) on a broken invariant."""
    return Simulation(scenario).run()


def main(argv: list[str] | None = None) -> None:
    """Replay one seed: ``python -m sim.consensus_sim --seed 42 --validators 7``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--validators", type=int, default=4)
    parser.add_argument("--real-signatures", action="store_true")
    args = parser.parse_args(argv)
    scenario = Scenario.random(args.seed, args.validators, real_signatures=args.real_signatures)
    print(scenario)
    result = simulate(scenario)
    result.check_safety()
    result.check_liveness()
    print(result.summary())
    for key, n in sorted(result.stats.items()):
        print(f"  {key:40} {n}")


if __name__ == "__main__":
    main()
