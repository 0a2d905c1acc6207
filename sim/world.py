"""The simulation loop: clients, transfer agents, executors and validators on virtual time.

Theory of operation
-------------------
Time is the block height. Before each block the loop lets the actors act:
clients' requests arrive (spread uniformly over each epoch); the TA of each
(a random live peer) draws its executor as the live TA does
(:func:`~gonka_p2p.ledger.executor_draw.routing_draws`: the ledger's draw over
its executor weights, attempt after attempt until the draw is online and not
barred -- the rule ``StartInference`` checks), and submits it; the executor submits
``FinishInference`` after generating (a silent one, sometimes, never does,
and the ledger expires the request). Validators commit their seeds during
the epoch before, check their duties, vote when drawn onto a committee and
reveal their seeds once the epoch ends -- each as the live validator actor
does, with the same transactions and the same ledger queries
(the duty ring of :mod:`~gonka_p2p.ledger.duties`: ``ArcIndex.holders``
finds the validators whose arcs cover an inference's point, the inverse of
``LedgerState.validation_duties``, since the simulator knows every seed).
Every message reaches its block after a latency drawn uniformly from
``0..latency`` blocks, so Start and Finish commit in either order. After
each block the loop reads back what committed: settled inferences (whose
duties it then schedules), disputes opened (whose committees then vote),
epoch starts and settlements (into the metrics).

Behaviours (:class:`~sim.roster.Strategy`): a cheating executor cheats
from ``cheat_from``, on a share ``cheat_fraction`` (q) of its requests, and
only while the ledger's validation rate of its work is at most
``cheat_below_validation``; a lazy validator skips its duties and votes; a
colluding one passes its partner's work unchecked, a sybil identity its
fellows'; a framing validator fails everyone else's work it is given to
check (the ledger accepts such a failure only on a duty its seed proves); a
silent executor drops some requests. A self-dealing owner's client sends its
own requests to its own TA identity, which takes its own executor identity
at whichever of the ledger's allowed draws names it (and that executor may
fabricate the answers); a spammer client sends one-token requests.

With ``[poc] proof_of_compute``, :mod:`sim.poc` runs every proof-of-compute round the
ledger opens (commit, secret, reveal, verdict, with the real transactions) before each
block's requests, and the weights the ledger derives from them are the ones the TAs draw
executors by; joiners enter the roster there, serving from the epoch after their round.

With a ``[consensus]`` section, :mod:`sim.consensus_run` first runs the
chain's byzantine replicas for the run's heights: each block then carries
its simulated commit time (requests are stamped with it, and their latency
is also reported in ms), and the loop ends where the chain stops.

Nothing here decides economics: who pays, who is caught, who forfeits is
what :func:`~gonka_p2p.ledger.state.apply_block` made of these transactions.
The loop only books each peer's compute (:meth:`Metrics.compute`, the cost
model of :mod:`sim.economics`): executing, less what a cheat saves, and
checking, at ``val_over_gen`` of executing; a check not run costs nothing.

Determinism: all randomness comes from ``random.Random`` streams seeded with
strings derived from the run's seed (traffic, latency, evidence), consumed
in block order; no set is ever iterated (string hashing is salted per
process) and no clock is read, so a seed replays bit for bit.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from gonka_p2p.identity import digest
from gonka_p2p.ledger.block import Receipt
from gonka_p2p.ledger.records import DisputeOutcome, InferenceStatus
from gonka_p2p.ledger.rules import (
    PPM,
    DrawTable,
    epoch_last_height,
    epoch_of,
    epoch_settled_at,
    prompt_token_bound,
    seed_commit_open,
    seed_commitment,
    seed_reveal_open,
)
from gonka_p2p.ledger.duties import ArcIndex
from gonka_p2p.ledger.poc_rounds import may_commit_seed
from gonka_p2p.ledger.state import check_invariants
from gonka_p2p.ledger.executor_draw import executor_weights, routing_draws
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
from gonka_p2p.wire.messages import NONCE_BYTES, ChatTurn, InferenceRequest, inference_id

from sim.chain import Chain
from sim.config import SimConfig
from sim.consensus_run import run_consensus
from sim.metrics import Metrics, Report, report_digest
from sim.poc import ProofOfCompute, with_poc
from sim.roster import (
    CHAIN_ID,
    CLIENT_BALANCE,
    MODEL,
    Peer,
    Strategy,
    build_genesis,
    build_roster,
    sim_params,
)
from sim.signatures import keyed_hash_signatures
from sim.verdicts import Outcome, Rates, pinned_distance_test, table_for, verdict_stats_for

GENERATION_BLOCKS = (1, 3)  # an executor's generation time, blocks
PROMPT_CHARS = (20, 400)
MAX_TOKENS = (16, 128)


@dataclass
class Work:
    """An inference the simulator launched, until its epoch is settled."""

    arrival: int
    executor: Peer
    cheating: bool  # its output is not the pinned model's
    rates: Rates  # the verdict rates of what it ran
    verdict: VerdictStats  # what a diligent check of it finds (drawn once: see sim.verdicts)
    tokens: int  # billable tokens (what a check re-runs, as prefill)
    owner: str  # a self-dealing TA identity whose own client sent it ("" for a stranger's request)


class Simulation:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.verdicts = table_for(config.verdicts, config.matrix_model, config.matrix_dtype, config.matrix)
        self.roster = build_roster(config.seed, config.peers, config.clients, config.epochs,
                                   config.strategy_mix(), config.churn, config.adversary_weight_share,
                                   config.sybil_identities, config.spam_requests > 0)
        roles: dict[str, str] = {}
        if config.proof_of_compute:
            self.roster, roles = with_poc(self.roster, config)
        self.distance_test = pinned_distance_test(self.verdicts, config.matrix_dtype) if config.distance_run else None
        self.genesis = build_genesis(self.roster, sim_params(config.epoch_blocks, config.floor,
                                                             config.genesis_overrides()),
                                     config.matrix_dtype, self.distance_test)
        self.params = self.genesis.params
        self.consensus = run_consensus(config, self.last_height) if config.validators else None
        if self.consensus is not None and self.consensus.crashed:  # a crashed replica's participant is down
            down = set(self.consensus.crashed)
            self.roster = replace(self.roster, peers=tuple(
                replace(p, online=(False,) * len(p.online)) if p.index in down else p for p in self.roster.peers))
        self.peers = self.roster.by_id()
        self.chain = Chain(self.genesis, [p.peer_id for p in self.roster.peers if not p.joins],
                           self.consensus.commit_ms if self.consensus else ())
        self.poc = ProofOfCompute(config, self.roster, roles, self.chain) if config.proof_of_compute else None
        self._block_ms = [self.genesis.genesis_time_ms]  # height -> its block's time
        self._latency_ms: list[int] = []  # request arrival -> settlement, by block times
        self.metrics = Metrics(self.roster, self.params)
        self._traffic = random.Random(f"traffic/{config.seed}")
        self._cheat = random.Random(f"cheat/{config.seed}")
        self._latency = random.Random(f"latency/{config.seed}")
        self._evidence = random.Random(f"evidence/{config.seed}")
        self._arrivals: dict[int, int] = {}  # height -> requests arriving
        self._own_arrivals: dict[int, list[Peer]] = {}  # height -> self-dealers whose client sends one
        self._spam_arrivals: dict[int, int] = {}  # height -> spam requests arriving
        self._own_clients = {key.peer_id: ta for ta, key in self.roster.own_client.items()}
        self._work: dict[bytes, Work] = {}
        self._touched: list[bytes] = []  # inferences a Start or Finish of this block concerned
        self._accused: list[bytes] = []  # inferences a failed Validation of this block concerned
        self._disputed: dict[bytes, set[str]] = {}  # open dispute -> committee members that voted
        self._reveal_after: dict[tuple[int, str], int] = {}  # (epoch, validator) -> last check height
        self._seeds: dict[int, dict[str, bytes]] = {}  # epoch -> peer id -> its validation seed
        self._arc_index: dict[int, ArcIndex] = {}  # epoch -> its validators' duty arcs
        self._servers: tuple[int, list[Peer]] = (-1, [])  # (epoch, its serving peers)
        self._nonce = 0
        self._weights = (-1, DrawTable({}))  # (height, the ledger's executor weights, ready to draw)
        self._send_clock = random.Random(f"send/{config.seed}")  # when, within its block, a request is sent
        self.partitioned = {"routed around": 0, "refused": 0}  # requests a partition cut from their first draw

    @property
    def last_height(self) -> int:
        """The block at which the last simulated epoch settles."""
        return epoch_last_height(self.config.epochs - 1, self.params) + self.params.settlement_delay_blocks

    def run(self, on_block: Callable[[int], None] | None = None,
            identity: dict[str, object] | None = None) -> Report:
        """Simulate every block; ``identity`` (the scenario's name, hash and overrides) heads
        the report's config, so the digest covers what named the run."""
        self._epoch_started(0)
        end = self.consensus.heights if self.consensus else self.last_height  # a stall or a fork ends it
        with keyed_hash_signatures(self.config.signatures == "keyed-hash"):
            for height in range(1, end + 1):
                self._before_block(height)
                self.chain.step()
                self._block_ms.append(self.chain.state.time_ms)
                self._after_block(height)
                if on_block is not None:
                    on_block(height)
        return self._report(identity or {})

    # ------------------------------------------------------------------ before a block

    def _lag(self) -> int:
        return self._latency.randint(0, self.config.latency)

    def _before_block(self, height: int) -> None:
        epoch = epoch_of(height, self.params)
        if epoch < self.config.epochs and (height - 1) % self.params.epoch_length_blocks == 0:
            self._plan_epoch(height, epoch)
        if self.poc is not None:
            self.poc.before_block(height)
        for _ in range(self._arrivals.pop(height, 0)):
            self._request(height, epoch)
        for owner in self._own_arrivals.pop(height, []):
            self._request(height, epoch, owner)
        for _ in range(self._spam_arrivals.pop(height, 0)):
            self._request(height, epoch, spam=True)

    def _plan_epoch(self, height: int, epoch: int) -> None:
        """At an epoch's first block: spread its requests over it (leaving room to finish within
        it), and have the peers that will serve the next epoch commit their seeds for it."""
        room = self.params.epoch_length_blocks - (GENERATION_BLOCKS[1] + 2 * self.config.latency + 1)
        for _ in range(self.config.requests):
            at = height + self._traffic.randrange(max(room, 1))
            self._arrivals[at] = self._arrivals.get(at, 0) + 1
        for ta in self.roster.own_client:
            for _ in range(self.config.self_dealing_requests):
                at = height + self._traffic.randrange(max(room, 1))
                self._own_arrivals.setdefault(at, []).append(self.peers[ta])
        for _ in range(self.config.spam_requests):
            at = height + self._traffic.randrange(max(room, 1))
            self._spam_arrivals[at] = self._spam_arrivals.get(at, 0) + 1
        following = epoch + 1
        if following >= self.config.epochs:
            return
        state = self.chain.state
        for peer in self.roster.peers:  # the validator actor's rule: seed_commit_open, may_commit_seed
            if (peer.online[epoch] and peer.online[following] and seed_commit_open(following, height, self.params)
                    and may_commit_seed(state, following, peer.peer_id)):
                commitment = seed_commitment(following, peer.peer_id, self._seed(peer, following))
                self.chain.submit(height + self._lag(), peer.key, lambda n, c=commitment: CommitValidationSeed(
                    chain_id=CHAIN_ID, epoch=following, commitment=c, sequence=n))

    def _request(self, height: int, epoch: int, owner: Peer | None = None, spam: bool = False) -> None:
        """A client's request reaches a live TA, which routes it and records its Start; with
        ``owner``, a self-dealer's own client sends it to the owner's TA identity; with
        ``spam``, the spammer sends a one-token request."""
        if owner is not None:
            ta, client = owner, self.roster.own_client[owner.peer_id]
        else:
            ta = self._traffic.choice(self._serving(epoch))
            client = self.roster.spammer if spam else self._traffic.choice(self.roster.clients)
        assert client is not None
        self._nonce += 1
        request = InferenceRequest(
            chain_id=CHAIN_ID, model=MODEL,
            messages=[ChatTurn(role="user", content="x" * self._traffic.randint(*PROMPT_CHARS))],
            max_tokens=1 if spam else self._traffic.randint(*MAX_TOKENS), temperature=0.7, top_p=1.0, top_k=0,
            logprobs_k=5, timestamp_ms=self.chain.time_of(height),
            nonce=self._nonce.to_bytes(NONCE_BYTES, "big"))
        raw = seal(request, client)
        iid = inference_id(Signed(request, client.public_key, raw))
        own = self.roster.own_executor.get(ta.peer_id) if owner is not None else None
        drawn = self._route(ta, iid, epoch, own, self._sent_at(height))
        if drawn is None:
            self.metrics.refused += 1
            return
        executor, attempt = drawn
        self.chain.submit(height + self._lag(), ta.key, lambda n: StartInference(
            chain_id=CHAIN_ID, request=raw, executor=executor.peer_id, attempt=attempt, sequence=n),
            self._on_start_or_finish(iid))
        if executor.strategy is Strategy.SILENT and self._traffic.random() < self.config.silent_rate:
            self.metrics.silenced += 1
            self.metrics.offence(executor.peer_id, height, epoch)
            return
        dealing = own is not None and executor.peer_id == own
        if owner is not None:
            self.metrics.own_requests[dealing] += 1
        cheating = self.config.self_dealing_cheat != "honest" if dealing else self._cheats(executor, epoch)
        self.metrics.served[executor.peer_id] += 1
        self.metrics.cheated[executor.peer_id] += cheating
        cheat = self.config.self_dealing_cheat if dealing else self._cheat_of(executor)
        rates = self.verdicts.rates[cheat if cheating else str(Strategy.HONEST)]
        completion = self._traffic.randint(min(MAX_TOKENS[0], request.max_tokens), request.max_tokens)
        verdict = self._drawn_verdict(rates, completion)
        prompt = min(prompt_token_bound(request, self.params), len(request.messages[0].content) // 4 + 8)
        saving = self.config.savings.get(str(executor.strategy), 0.0) if cheating else 0.0
        self.metrics.compute(executor.peer_id, epoch, (prompt + completion) * (1 - saving),
                             self.config.compute_cost_per_token, validating=False)
        self._work[iid] = Work(height, executor, cheating, rates,
                               verdict, prompt + completion,
                               owner.peer_id if owner is not None else "")
        self.chain.submit(height + self._traffic.randint(*GENERATION_BLOCKS) + self._lag(), executor.key,
                          lambda n: FinishInference(
                              chain_id=CHAIN_ID, inference_id=iid, prompt_tokens=prompt,
                              completion_tokens=completion, response_hash=digest(iid + b"response"),
                              artifact_commitment=digest(iid + b"artifact"), sequence=n),
                          self._on_start_or_finish(iid))

    def _sent_at(self, height: int) -> int | None:
        """With partitions simulated: the virtual ms a request of ``height`` is sent, drawn between
        the last block's commit and this one's (None: no partition can hold)."""
        if self.consensus is None or not self.consensus.partitions:
            return None
        start = self._block_ms[-1] - self.genesis.genesis_time_ms
        return self._send_clock.randint(start, max(start, self.chain.time_of(height) - self.genesis.genesis_time_ms))

    def _route(self, ta: Peer, iid: bytes, epoch: int, prefer: str | None = None,
               at_ms: int | None = None) -> tuple[Peer, int] | None:
        """The live TA's routing (``routing_draws``: the ledger's draws over its executor weights,
        attempt by attempt), the first that is online and not barred; None when no attempt
        finds one. A greedy TA takes
        ``prefer`` at whichever allowed attempt draws it (the choice the ledger leaves it)."""
        if self._weights[0] != self.chain.height:  # weights change only in blocks: one read per block
            self._weights = (self.chain.height, DrawTable(executor_weights(self.chain.state, MODEL)))
        table = self._weights[1]
        live = [(self.peers[d.executor], d.attempt)
                for d in routing_draws(lambda: table, ta.peer_id, iid, self.params.max_executor_attempts,
                                       self.chain.state)
                if not d.barred and self.peers[d.executor].online[epoch]]
        drawn = live if at_ms is None else [  # a partition holds: only executors on the TA's side answer
            (p, attempt) for p, attempt in live if not self.consensus.apart(ta.index, p.index, at_ms)]  # type: ignore[union-attr]
        if live and live[0] != (drawn or [None])[0]:
            self.partitioned["routed around" if drawn else "refused"] += 1
        preferred = [d for d in drawn if d[0].peer_id == prefer]
        return (preferred or drawn or [None])[0]

    def _cheats(self, executor: Peer, epoch: int) -> bool:
        """Does ``executor`` cheat on this request: a cheat of its strategy, from ``cheat_from``,
        while the ledger's validation rate of its work is at most ``cheat_below_validation``,
        on a ``cheat_fraction`` q of its requests."""
        config = self.config
        if not executor.strategy.cheats_as_executor or epoch < config.cheat_from:
            return False
        if self.chain.state.validation_rate_ppm(executor.peer_id) > config.cheat_below_validation * PPM:
            return False
        return self._cheat.random() < config.cheat_fraction

    def _cheat_of(self, executor: Peer) -> str:
        """The verdict-table row of what a cheating executor runs."""
        return self.config.sybil_cheat if executor.strategy is Strategy.SYBIL else str(executor.strategy)

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
        self._vote(height)
        if self.poc is not None:
            self.poc.after_block(height)
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
            for client, amount in summary.refunds:  # a self-dealer's client refunded: its coins back
                if client in self._own_clients:
                    self.metrics.spend(self._own_clients[client], settled, -amount)
            self._work = {i: w for i, w in self._work.items() if epoch_of(w.arrival, self.params) > settled}

    def _settled(self, height: int, iid: bytes, work: Work) -> None:
        """An inference settled: each validator whose seed gives it the duty checks it."""
        state = self.chain.state
        record = state.inference(iid)
        assert record is not None
        epoch = state.inference_epoch(record)
        self.metrics.latencies.append(height - work.arrival)
        self._latency_ms.append(self._block_ms[height] - self._block_ms[work.arrival])
        if work.cheating:
            self.metrics.offence(work.executor.peer_id, height, epoch)
        if work.owner:  # what the self-dealer's client paid (to itself, or to the stranger drawn)
            self.metrics.spend(work.owner, epoch, record.cost)
        for validator in self._arcs(epoch).holders(record.duty_point, record.validation_ppm,
                                                   record.executor, record.ta):
            peer = self.peers[validator]
            verdict = self._verdict_of(peer, work, height, epoch)
            if verdict is None:
                continue
            at = height + self._lag()
            self._reveal_after[(epoch, validator)] = max(at, self._reveal_after.get((epoch, validator), 0))
            proof = b"" if verdict.valid else self._seed(peer, epoch)  # a failure proves its duty
            self.chain.submit(at, peer.key, lambda n, v=verdict, s=proof: Validation(
                chain_id=CHAIN_ID, inference_id=iid, verdict=v, seed=s, sequence=n),
                None if verdict.valid else self._on_failed_check(iid))

    def _on_failed_check(self, iid: bytes) -> Callable[[Receipt], None]:
        def seen(receipt: Receipt) -> None:
            if receipt.ok:
                self._accused.append(iid)
        return seen

    def _verdict_of(self, peer: Peer, work: Work, height: int, epoch: int) -> VerdictStats | None:
        """What ``peer`` submits for ``work``: nothing if lazy; a pass, unchecked, for its partner
        if colluding or for a fellow identity if a sybil; a failure, unchecked, of anyone
        else's work if framing; else the evidence's verdict (or, with independent checks, a
        fresh draw), paying for the check's compute."""
        strategy, executor = peer.strategy, work.executor.strategy
        if strategy is Strategy.LAZY:
            self.metrics.offence(peer.peer_id, height, epoch)
            return None
        if (self.roster.partner.get(peer.peer_id) == work.executor.peer_id
                or strategy is executor is Strategy.SYBIL):
            self.metrics.offence(peer.peer_id, height, epoch)
            return verdict_stats_for(Outcome.CLEAN, FailureFlag.OTHER, work.verdict.n_tokens)
        if strategy is Strategy.FRAMING and executor is not Strategy.FRAMING:
            self.metrics.offence(peer.peer_id, height, epoch)
            return verdict_stats_for(Outcome.FAILED, FailureFlag.OTHER, work.verdict.n_tokens)
        self.metrics.compute(peer.peer_id, epoch, work.tokens * self.verdicts.val_over_gen,
                             self.config.compute_cost_per_token, validating=True)
        if self.config.independent_checks:
            return self._drawn_verdict(work.rates, work.verdict.n_tokens)
        return work.verdict

    def _drawn_verdict(self, rates: Rates, n_tokens: int) -> VerdictStats:
        """A diligent check's verdict drawn from ``rates``; where the genesis pins a distance run,
        a pass reports a drawn mean distance (drawn only then, so a run without one replays
        the draws it always made)."""
        outcome = rates.draw(self._evidence)
        distance = rates.draw_distance(outcome, self._evidence) if self.distance_test is not None else None
        return verdict_stats_for(outcome, rates.flag, n_tokens, distance)

    def _dispute_opened(self, height: int, iid: bytes) -> None:
        dispute = self.chain.state.dispute(iid)
        work = self._work.get(iid)
        if dispute is None or dispute.opened_height != height or work is None:
            return
        self.metrics.accusations[str(work.executor.strategy)] += 1
        self._disputed[iid] = set()

    def _vote(self, height: int) -> None:
        """Each member of an open dispute's committee votes once it is drawn (as the validator
        actor does from ``open_disputes_for``); a member redrawn in a later round has voted."""
        for iid in list(self._disputed):
            dispute, work = self.chain.state.dispute(iid), self._work.get(iid)
            if dispute is None or work is None or dispute.outcome is not DisputeOutcome.OPEN:
                del self._disputed[iid]
                continue
            voted = self._disputed[iid]
            for member in dispute.committee:
                if member in voted:
                    continue
                voted.add(member)
                verdict = self._verdict_of(self.peers[member], work, height, dispute.epoch)
                if verdict is not None:
                    self.chain.submit(height + self._lag(), self.peers[member].key,
                                      lambda n, v=verdict, i=iid: DisputeVote(
                                          chain_id=CHAIN_ID, inference_id=i, verdict=v, sequence=n))

    def _reveal(self, height: int, epoch: int) -> None:
        """After ``epoch`` ends, each of its committed validators reveals its seed: after its
        last check of the epoch, so that none of them is refused as too late."""
        for peer in self.roster.peers:
            if self.chain.state.commitment(epoch, peer.peer_id) is None:
                continue
            at = max(height + 1 + self._lag(), self._reveal_after.pop((epoch, peer.peer_id), 0))
            if not seed_reveal_open(epoch, at, self.params):  # past the window: the actor would not send it
                continue
            self.chain.submit(at, peer.key, lambda n, s=self._seed(peer, epoch): RevealValidationSeed(
                chain_id=CHAIN_ID, epoch=epoch, seed=s, sequence=n))

    def _epoch_started(self, epoch: int) -> None:
        state = self.chain.state
        info = state.epoch_info(epoch)
        assert info is not None
        live = [p.peer_id for p in self.roster.peers if p.serves(epoch)]
        self.metrics.epoch_started(info.floor_ppm, {p: state.participant(p).reputation_ppm for p in live},
                                   {p: state.validation_rate_ppm(p) for p in live})

    def _seed(self, peer: Peer, epoch: int) -> bytes:
        return self._epoch_seeds(epoch)[peer.peer_id]

    def _serving(self, epoch: int) -> list[Peer]:
        """The peers serving in ``epoch`` (the TAs its clients reach), listed once."""
        if self._servers[0] != epoch:
            self._servers = (epoch, [p for p in self.roster.peers if p.serves(epoch)])
        return self._servers[1]

    def _arcs(self, epoch: int) -> ArcIndex:
        """The epoch's eligible validators by arc start (fixed once the epoch has begun)."""
        if epoch not in self._arc_index:
            self._arc_index[epoch] = ArcIndex(self._epoch_seeds(epoch), self.chain.state.eligible(epoch))
        return self._arc_index[epoch]

    def _epoch_seeds(self, epoch: int) -> dict[str, bytes]:
        """Every peer's validation seed for ``epoch``, derived once."""
        seeds = self._seeds.get(epoch)
        if seeds is None:
            seeds = self._seeds[epoch] = {p.peer_id: derive_validation_seed(p.key.secret, CHAIN_ID, epoch)
                                          for p in self.roster.peers}
        return seeds

    # ------------------------------------------------------------------ the end

    def _report(self, identity: dict[str, object]) -> Report:
        state = self.chain.state
        spammer = self.roster.spammer and state.account(self.roster.spammer.peer_id)
        coins = {"coins: genesis supply": state.genesis.supply, "coins: minted": state.minted,
                 "coins: the spammer spent": CLIENT_BALANCE - spammer.balance if spammer else 0,
                 "coins: burned": state.burned,
                 "coins: balances + escrow + fees": state.total_coins(),
                 "coins: blocks checked": self.chain.conservation_checks, **self._consensus_lines()}
        report = self.metrics.report({**identity, **self.config.describe()}, self.chain.rejected, state.app_hash(),
                                     coins, self._bet())
        if self.poc is not None:
            section, lines = self.poc.report()
            report = replace(report, poc=section, network={**report.network, **lines})
        return replace(report, digest=report_digest(report))


    def _consensus_lines(self) -> dict[str, float | int | str]:
        """With simulated consensus: its verdict, commit latency, and request latency in ms."""
        if self.consensus is None:
            return {}
        ms = sorted(self._latency_ms)
        return {**self.consensus.lines(),
                "request latency mean (ms)": round(sum(ms) / len(ms), 1) if ms else 0.0,
                "request latency p95 (ms)": ms[int(0.95 * (len(ms) - 1))] if ms else 0,
                "requests routed around a partition": self.partitioned["routed around"],
                "requests refused across a partition": self.partitioned["refused"],
                "participants down with their crashed replica": len(self.consensus.crashed)}

    def _bet(self) -> tuple[float, float] | None:
        """(d, s) of the run's most numerous executor cheat: the chance a check fails its
        cheated work, and the share of compute cheating saves (for the break-even table)."""
        cheats = [p for p in self.roster.peers if p.strategy.cheats_as_executor]
        if not cheats:
            return None
        counts = Counter(p.strategy for p in cheats)
        strategy = max(counts, key=lambda s: (counts[s], str(s)))
        peer = next(p for p in cheats if p.strategy is strategy)
        return self.verdicts.rates[self._cheat_of(peer)].failed, self.config.savings.get(str(strategy), 0.0)


def simulate(config: SimConfig) -> tuple[Simulation, Report]:
    simulation = Simulation(config)
    return simulation, simulation.run()
