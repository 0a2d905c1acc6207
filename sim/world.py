"""The simulation loop: clients, transfer agents, executors and validators on virtual time.

Theory of operation
-------------------
Time is the block height. Before each block the loop lets the actors act:
clients' requests arrive (spread uniformly over each epoch); the TA of each
(a random live peer) draws its executor with the network's own
:func:`~gonka_p2p.ledger.rules.choose_executor` over the live
peers' ledger weights and submits ``StartInference``; the executor submits
``FinishInference`` after generating (a silent one, sometimes, never does,
and the ledger expires the request). Validators commit their seeds during
the epoch before, check their duties, vote when drawn onto a committee and
reveal their seeds once the epoch ends -- each as the live validator actor
does, with the same transactions and the same ledger queries
(``validation_candidates`` and ``rules.is_validation_duty``, the body of
``LedgerState.is_validation_duty`` evaluated once per inference rather than
once per validator). Every message reaches its block after a latency drawn
uniformly from ``0..latency`` blocks, so Start and Finish commit in either
order. After each block the loop reads back what committed: settled
inferences (whose duties it then schedules), disputes opened (whose
committees then vote), epoch starts and settlements (into the metrics).

Nothing here decides economics: who pays, who is caught, who forfeits is
what :func:`~gonka_p2p.ledger.state.apply_block` made of these transactions.

Determinism: all randomness comes from ``random.Random`` streams seeded with
strings derived from the run's seed (traffic, latency, evidence), consumed
in block order; no set is ever iterated (string hashing is salted per
process) and no clock is read, so a seed replays bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gonka_p2p.identity import digest
from gonka_p2p.ledger.block import Receipt
from gonka_p2p.ledger.records import InferenceStatus
from gonka_p2p.ledger.rules import (
    NoEligibleExecutor,
    choose_executor,
    epoch_last_height,
    epoch_of,
    epoch_settled_at,
    is_validation_duty,
    prompt_token_bound,
    seed_commitment,
)
from gonka_p2p.ledger.state import check_invariants
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    FailureFlag,
    FinishInference,
    RevealValidationSeed,
    StartInference,
    Validation,
    VerdictStats,
    derive_validation_seed,
)
from gonka_p2p.wire.envelope import Signed, seal
from gonka_p2p.wire.messages import ChatTurn, InferenceRequest, inference_id

from sim.chain import BLOCK_MS, Chain
from sim.metrics import Metrics, Report, report_digest
from sim.roster import CHAIN_ID, GENESIS_TIME_MS, MODEL, Peer, Strategy, build_genesis, build_roster
from sim.verdicts import Outcome, Rates, VerdictTable, verdict_stats_for

GENERATION_BLOCKS = (1, 3)  # an executor's generation time, blocks
PROMPT_CHARS = (20, 400)
MAX_TOKENS = (16, 128)


@dataclass(frozen=True)
class SimConfig:
    seed: int
    peers: int = 50
    epochs: int = 20
    requests: int = 300  # client requests per epoch
    clients: int = 100
    epoch_blocks: int = 100
    latency: int = 2  # max blocks a message takes to reach a block
    churn: float = 0.05  # per honest peer and epoch boundary
    silent_rate: float = 0.5  # share of its requests a silent executor drops
    cheat_from: int = 1  # first epoch cheaters cheat in (epoch 0 has no validators)
    independent_checks: bool = False  # each check draws its own verdict (else one per inference)
    mix: dict[Strategy, int] = field(default_factory=dict)
    verdicts: VerdictTable | None = None

    def describe(self) -> dict[str, object]:
        """The configuration as plain data (in the report and its digest)."""
        assert self.verdicts is not None
        return {"seed": self.seed, "peers": self.peers, "epochs": self.epochs,
                "requests per epoch": self.requests, "clients": self.clients,
                "epoch blocks": self.epoch_blocks, "latency": self.latency, "churn": self.churn,
                "silent rate": self.silent_rate, "cheat from epoch": self.cheat_from,
                "independent checks": self.independent_checks,
                "mix": {str(s): n for s, n in self.mix.items()},
                "verdicts": self.verdicts.model or "design",
                "verdict rates": {s: [r.failed, r.suspicious, r.source]
                                  for s, r in sorted(self.verdicts.rates.items())}}


@dataclass
class Work:
    """An inference the simulator launched, until its epoch is settled."""

    arrival: int
    executor: Peer
    cheating: bool  # its output is not the pinned model's
    rates: Rates  # the verdict rates of what it ran
    verdict: VerdictStats  # what a diligent check of it finds (drawn once: see sim.verdicts)


class Simulation:
    def __init__(self, config: SimConfig) -> None:
        assert config.verdicts is not None
        self.config = config
        self.verdicts = config.verdicts
        self.roster = build_roster(config.seed, config.peers, config.clients, config.epochs,
                                   config.mix, config.churn)
        self.genesis = build_genesis(self.roster, config.epoch_blocks)
        self.params = self.genesis.params
        self.peers = self.roster.by_id()
        self.chain = Chain(self.genesis, [p.peer_id for p in self.roster.peers])
        self.metrics = Metrics(self.roster, self.params)
        self._traffic = random.Random(f"traffic/{config.seed}")
        self._latency = random.Random(f"latency/{config.seed}")
        self._evidence = random.Random(f"evidence/{config.seed}")
        self._arrivals: dict[int, int] = {}  # height -> requests arriving
        self._work: dict[bytes, Work] = {}
        self._touched: list[bytes] = []  # inferences a Start or Finish of this block concerned
        self._accused: list[bytes] = []  # inferences a failed Validation of this block concerned
        self._reveal_after: dict[tuple[int, str], int] = {}  # (epoch, validator) -> last check height
        self._seeds: dict[tuple[int, int], bytes] = {}
        self._nonce = 0

    @property
    def last_height(self) -> int:
        """The block at which the last simulated epoch settles."""
        return epoch_last_height(self.config.epochs - 1, self.params) + self.params.settlement_delay_blocks

    def run(self, on_block: Callable[[int], None] | None = None) -> Report:
        self._epoch_started(0)
        for height in range(1, self.last_height + 1):
            self._before_block(height)
            self.chain.step()
            self._after_block(height)
            if on_block is not None:
                on_block(height)
        return self._report()

    # ------------------------------------------------------------------ before a block

    def _lag(self) -> int:
        return self._latency.randint(0, self.config.latency)

    def _before_block(self, height: int) -> None:
        epoch = epoch_of(height, self.params)
        if epoch < self.config.epochs and (height - 1) % self.params.epoch_length_blocks == 0:
            self._plan_epoch(height, epoch)
        for _ in range(self._arrivals.pop(height, 0)):
            self._request(height, epoch)

    def _plan_epoch(self, height: int, epoch: int) -> None:
        """At an epoch's first block: spread its requests over it (leaving room to finish within
        it), and have the peers that will serve the next epoch commit their seeds for it."""
        room = self.params.epoch_length_blocks - (GENERATION_BLOCKS[1] + 2 * self.config.latency + 1)
        for _ in range(self.config.requests):
            at = height + self._traffic.randrange(max(room, 1))
            self._arrivals[at] = self._arrivals.get(at, 0) + 1
        following = epoch + 1
        if following >= self.config.epochs:
            return
        for peer in self.roster.peers:
            record = self.chain.state.participant(peer.peer_id)
            if peer.online[epoch] and peer.online[following] and record and record.weight > 0:
                commitment = seed_commitment(following, peer.peer_id, self._seed(peer, following))
                self.chain.submit(height + self._lag(), peer.key, lambda n, c=commitment: CommitValidationSeed(
                    chain_id=CHAIN_ID, epoch=following, commitment=c, sequence=n))

    def _request(self, height: int, epoch: int) -> None:
        """A client's request reaches a live TA, which routes it and records its Start."""
        live = [p for p in self.roster.peers if p.online[epoch]]
        ta = self._traffic.choice(live)
        client = self._traffic.choice(self.roster.clients)
        self._nonce += 1
        request = InferenceRequest(
            chain_id=CHAIN_ID, model=MODEL, messages=[ChatTurn(role="user", content="x" * self._traffic.randint(*PROMPT_CHARS))],
            max_tokens=self._traffic.randint(*MAX_TOKENS), temperature=0.7, top_p=1.0, top_k=0,
            logprobs_k=5, timestamp_ms=GENESIS_TIME_MS + height * BLOCK_MS,
            nonce=self._nonce.to_bytes(16, "big"))
        raw = seal(request, client)
        iid = inference_id(Signed(request, client.public_key, raw))  # signed here: no need to verify
        weights = {p: w for p, w in self.chain.state.weights().items() if self.peers[p].online[epoch]}
        try:
            executor = self.peers[choose_executor(weights, frozenset({ta.peer_id}), iid, 0)]
        except NoEligibleExecutor:
            self.metrics.refused += 1
            return
        self.chain.submit(height + self._lag(), ta.key, lambda n: StartInference(
            chain_id=CHAIN_ID, request=raw, executor=executor.peer_id, sequence=n), self._on_start_or_finish(iid))
        if executor.strategy is Strategy.SILENT and self._traffic.random() < self.config.silent_rate:
            self.metrics.silenced += 1
            self.metrics.offence(executor.peer_id, height, epoch)
            return
        cheating = executor.strategy.cheats_as_executor and epoch >= self.config.cheat_from
        rates = self.verdicts.rates[str(executor.strategy) if cheating else str(Strategy.HONEST)]
        outcome = rates.draw(self._evidence)
        completion = self._traffic.randint(MAX_TOKENS[0], request.max_tokens)
        prompt = min(prompt_token_bound(request, self.params), len(request.messages[0].content) // 4 + 8)
        self._work[iid] = Work(height, executor, cheating, rates,
                               verdict_stats_for(outcome, rates.flag, completion))
        self.chain.submit(height + self._traffic.randint(*GENERATION_BLOCKS) + self._lag(), executor.key,
                          lambda n: FinishInference(
                              chain_id=CHAIN_ID, inference_id=iid, prompt_tokens=prompt,
                              completion_tokens=completion, response_hash=digest(iid + b"response"),
                              artifact_commitment=digest(iid + b"artifact"), sequence=n),
                          self._on_start_or_finish(iid))

    def _on_start_or_finish(self, iid: bytes) -> Callable[[Receipt], None]:
        def seen(receipt: Receipt) -> None:
            if receipt.ok:
                self._touched.append(iid)
        return seen

    # ------------------------------------------------------------------ after a block

    def _after_block(self, height: int) -> None:
        touched, self._touched = self._touched, []
        for iid in dict.fromkeys(touched):  # a Start and its Finish may share a block
            work = self._work.get(iid)
            record = self.chain.state.inference(iid)
            if work is not None and record is not None and record.status is InferenceStatus.SETTLED:
                self._settled(height, iid, work)
        accused, self._accused = self._accused, []
        for iid in dict.fromkeys(accused):  # several may fail it in one block; one dispute opens
            self._dispute_opened(height, iid)
        if height % self.params.epoch_length_blocks == 0:
            ended = height // self.params.epoch_length_blocks - 1
            self._reveal(height, ended)
            if ended + 1 < self.config.epochs:
                self._epoch_started(ended + 1)
        settled = epoch_settled_at(height, self.params)
        if settled is not None:
            check_invariants(self.chain.state)
            summary = self.chain.state.epoch_summary(settled)
            assert summary is not None
            self.metrics.settled(summary, height)
            self._work = {i: w for i, w in self._work.items() if epoch_of(w.arrival, self.params) > settled}

    def _settled(self, height: int, iid: bytes, work: Work) -> None:
        """An inference settled: each validator whose seed gives it the duty checks it."""
        state = self.chain.state
        record = state.inference(iid)
        assert record is not None
        epoch = state.inference_epoch(record)
        self.metrics.latencies.append(height - work.arrival)
        if work.cheating:
            self.metrics.offence(work.executor.peer_id, height, epoch)
        candidates = state.validation_candidates(iid)
        total = sum(candidates.values())
        for validator, weight in candidates.items():
            peer = self.peers[validator]
            if not is_validation_duty(self._seed(peer, epoch), iid, record.validation_ppm, weight, total):
                continue
            verdict = self._verdict_of(peer, work, height, epoch)
            if verdict is None:
                continue
            at = height + self._lag()
            self._reveal_after[(epoch, validator)] = max(at, self._reveal_after.get((epoch, validator), 0))
            self.chain.submit(at, peer.key, lambda n, v=verdict: Validation(
                chain_id=CHAIN_ID, inference_id=iid, verdict=v, sequence=n),
                None if verdict.valid else self._on_failed_check(iid))

    def _on_failed_check(self, iid: bytes) -> Callable[[Receipt], None]:
        def seen(receipt: Receipt) -> None:
            if receipt.ok:
                self._accused.append(iid)
        return seen

    def _verdict_of(self, peer: Peer, work: Work, height: int, epoch: int) -> VerdictStats | None:
        """What ``peer`` submits for ``work``: nothing if lazy, a pass for its partner if
        colluding, else the evidence's verdict (or, with independent checks, a fresh draw)."""
        if peer.strategy is Strategy.LAZY:
            self.metrics.offence(peer.peer_id, height, epoch)
            return None
        if self.roster.partner.get(peer.peer_id) == work.executor.peer_id:
            self.metrics.offence(peer.peer_id, height, epoch)
            return verdict_stats_for(Outcome.CLEAN, FailureFlag.OTHER, work.verdict.n_tokens)
        if self.config.independent_checks:
            outcome = work.rates.draw(self._evidence)
            return verdict_stats_for(outcome, work.rates.flag, work.verdict.n_tokens)
        return work.verdict

    def _dispute_opened(self, height: int, iid: bytes) -> None:
        dispute = self.chain.state.dispute(iid)
        work = self._work.get(iid)
        if dispute is None or dispute.opened_height != height or work is None:
            return
        self.metrics.accusations[str(work.executor.strategy)] += 1
        for member in dispute.committee:
            peer = self.peers[member]
            verdict = self._verdict_of(peer, work, height, dispute.epoch)
            if verdict is not None:
                self.chain.submit(height + self._lag(), peer.key, lambda n, v=verdict: DisputeVote(
                    chain_id=CHAIN_ID, inference_id=iid, verdict=v, sequence=n))

    def _reveal(self, height: int, epoch: int) -> None:
        """After ``epoch`` ends, each of its committed validators reveals its seed: after its
        last check of the epoch, so that none of them is refused as too late."""
        for peer in self.roster.peers:
            if self.chain.state.commitment(epoch, peer.peer_id) is None:
                continue
            at = max(height + 1 + self._lag(), self._reveal_after.pop((epoch, peer.peer_id), 0))
            self.chain.submit(at, peer.key, lambda n, s=self._seed(peer, epoch): RevealValidationSeed(
                chain_id=CHAIN_ID, epoch=epoch, seed=s, sequence=n))

    def _epoch_started(self, epoch: int) -> None:
        state = self.chain.state
        info = state.epoch_info(epoch)
        assert info is not None
        live = [p.peer_id for p in self.roster.peers if p.online[epoch]]
        self.metrics.epoch_started(info.floor_ppm, {p: state.participant(p).reputation_ppm for p in live},
                                   {p: state.validation_rate_ppm(p) for p in live})

    def _seed(self, peer: Peer, epoch: int) -> bytes:
        key = (peer.index, epoch)
        seed = self._seeds.get(key)
        if seed is None:
            seed = self._seeds[key] = derive_validation_seed(peer.key.secret, CHAIN_ID, epoch)
        return seed

    # ------------------------------------------------------------------ the end

    def _report(self) -> Report:
        state = self.chain.state
        coins = {"coins: genesis supply": state.genesis.supply, "coins: minted": state.minted,
                 "coins: balances + escrow + fees": state.total_coins(),
                 "coins: blocks checked": self.chain.conservation_checks}
        report = self.metrics.report(self.config.describe(), self.chain.rejected, state.app_hash(),
                                     coins, self.verdicts.val_over_gen)
        return replace(report, digest=report_digest(report))


def simulate(config: SimConfig, on_block: Callable[[int], None] | None = None) -> tuple[Simulation, Report]:
    simulation = Simulation(config)
    return simulation, simulation.run(on_block)
