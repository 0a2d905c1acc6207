"""Proof of compute in the simulator: provers compute, commit, open and reveal; validators judge.

Theory of operation
-------------------
Nothing here decides a weight. Each round the ledger opens (``poc_rounds.open_rounds``),
every simulated participant does what the proof-of-compute actor does, with the real
transactions, and :func:`~gonka_p2p.ledger.state.apply_block` makes of them what it
makes of a live network's: who proved what, who is a fraud, the next epoch's weights.

- *Compute.* At the round's first block a prover "computes" ``capacity x window`` nonces
  (times a small per-round noise; a renter's regular window runs on ``rent_factor``
  times its own hardware). A leaf is :func:`expected_leaf` of the round's work seed,
  the prover and the nonce -- the stand-in for the model's forward pass; an
  overclaimer computes the same, claims ``overclaim`` (k) times as many nonces and
  fills the excess with :func:`fabricated_leaf`. It commits the Merkle root
  (``wire.merkle``), the count and the hash of its round secret so that the
  commitment lands before the window closes; a key the ledger has never seen
  (a joiner) adds a join stamp (``poc.find_join_stamp``).
- *Secret, reveal.* When the secret phase opens, each committer opens its secret (and one
  without weight commits its validation seed for the next epoch, which its round may give
  it weight in: ``poc_rounds.may_commit_seed``); when
  the reveal phase opens (the sample seed is fixed), it opens the nonces the ledger
  samples (``poc_rounds.sampled``), each with its inclusion proof.
- *Verdict.* When the verdict phase opens, every online participant holding voting
  power in the epoch judges what it has not judged yet (``poc_rounds.to_judge``):
  ``ok`` when each opened leaf is the expected bytes -- the deterministic stand-in for
  recomputing it, so an honest leaf always passes and a fabricated one never does.

A confirmation round (at the height the ledger picks) is answered by the participants
that committed in the epoch's regular round, on their own hardware. Leavers stop proving (and serving)
at their leave epoch; joiners prove from their join epoch and serve from the next.

Every message lands after a latency drawn from this module's own seeded stream, so a
run without proof of compute draws exactly what it drew before. The measurements
(:meth:`ProofOfCompute.report`) are read from the ledger: the verdicts of each
commitment, each epoch's weights and voting power.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gonka_p2p.ledger.genesis import Params
from gonka_p2p.ledger.poc import Phase, RoundKind, compute_blocks, derive_secret, find_join_stamp, secret_hash
from gonka_p2p.ledger.poc_rounds import (
    entries,
    may_commit_seed,
    open_rounds,
    sampled,
    to_judge,
    round_outcome,
    verdicts,
)
from gonka_p2p.ledger.rules import PPM, seed_commitment
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    PocCommit,
    PocReveal,
    PocSecret,
    PocVerdict,
    derive_validation_seed,
)
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.merkle import inclusion_proof, merkle_root

from sim.roster import CHAIN_ID, MODEL, Peer, Roster, Strategy

if TYPE_CHECKING:
    from sim.chain import Chain
    from sim.config import SimConfig

SIM_JOIN_POW_BITS = 8  # a join stamp of 2**8 hashes: the rule is exercised, the run stays fast
_LEAF = b"sim/poc-leaf/v1\x00"
_FABRICATED = b"sim/poc-fabricated/v1\x00"
# The ledger's default windows, written for a 100-block epoch; a shorter epoch scales them down.
POC_PHASES = ("poc_compute_blocks", "poc_secret_blocks", "poc_reveal_blocks", "poc_verdict_blocks",
              "poc_confirm_compute_blocks")
_WINDOWS = ("poc_start_offset_blocks", *POC_PHASES)
_REFERENCE_EPOCH = 100


def expected_leaf(work_seed: bytes, prover: str, nonce: int) -> bytes:
    """What nonce ``nonce`` of ``prover`` computes in a round with ``work_seed``: the simulator's
    stand-in for a forward pass, which a validator "recomputes" by calling this again."""
    return hashlib.sha256(_LEAF + work_seed + prover.encode() + nonce.to_bytes(8, "big")).digest()


def fabricated_leaf(work_seed: bytes, prover: str, nonce: int) -> bytes:
    """An overclaimer's filler for a nonce it never computed: anything but the expected bytes."""
    return hashlib.sha256(_FABRICATED + work_seed + prover.encode() + nonce.to_bytes(8, "big")).digest()


def poc_windows(epoch_blocks: int, latency: int) -> dict[str, int]:
    """Genesis parameters that turn proof of compute on with the ledger's windows scaled to an
    epoch of ``epoch_blocks`` (each phase longer than ``latency``, so that a message sent when
    a phase opens lands in it) and a cheap join stamp. A scenario's ``[params]`` win."""
    defaults = Params()
    scaled = {name: max(latency + 1, round(getattr(defaults, name) * epoch_blocks / _REFERENCE_EPOCH))
              for name in _WINDOWS}
    return {"poc_enabled": 1, "poc_join_pow_bits": SIM_JOIN_POW_BITS, **scaled}


def with_poc(roster: Roster, config: SimConfig) -> tuple[Roster, dict[str, str]]:
    """The roster with proof of compute: every peer's capacity (nonces per block, uniform in
    ``capacity_min..capacity_max``), ``leavers`` honest genesis peers offline from
    ``leave_epoch``, and ``joiners`` new keys online from ``join_epoch``; and each peer's
    role for the report. Drawn from a stream of its own, so the rest of the roster is the
    one the same seed draws without proof of compute."""
    rng = random.Random(f"poc-roster/{config.seed}")
    epochs = range(config.epochs)
    peers = [replace(p, capacity=rng.randint(config.capacity_min, config.capacity_max)) for p in roster.peers]
    honest = [i for i, p in enumerate(peers) if p.strategy is Strategy.HONEST]
    leaving = sorted(rng.sample(honest, min(config.leavers, len(honest))))
    for i in leaving:
        peers[i] = replace(peers[i], online=tuple(e < config.leave_epoch for e in epochs))
    for j in range(config.joiners):
        peers.append(Peer(len(peers), Keypair.from_seed(f"sim/{config.seed}/joiner/{j}".encode()), 0,
                          Strategy.HONEST, tuple(e >= config.join_epoch for e in epochs),
                          capacity=rng.randint(config.capacity_min, config.capacity_max), joins=config.join_epoch))
    roles = {p.peer_id: "joiner" if p.joins else str(p.strategy) for p in peers}
    roles.update({peers[i].peer_id: "leaver" for i in leaving})
    return replace(roster, peers=tuple(peers)), roles


@dataclass
class Proving:
    """What a prover keeps of one of its commitments until it has opened it."""

    leaves: list[bytes]
    secret: bytes
    computed: int  # nonces it really computed (the rest of ``leaves`` is fabricated)


@dataclass(frozen=True)
class RoundKey:
    epoch: int
    kind: RoundKind


class ProofOfCompute:
    """The participants' proof-of-compute duties over a simulated chain, and what they measured."""

    def __init__(self, config: SimConfig, roster: Roster, roles: dict[str, str], chain: Chain) -> None:
        self.config = config
        self.peers = roster.peers
        self.roles = roles
        self.chain = chain
        self.params = chain.state.params
        self._rng = random.Random(f"poc/{config.seed}")
        self._proving: dict[tuple[RoundKey, str], Proving] = {}
        self._ends: dict[RoundKey, int] = {}  # round -> its last verdict height
        self.rounds: list[dict[str, object]] = []
        self.overclaims: list[tuple[RoundKey, bool]] = []  # an overclaimer's commitments: was it caught?
        self.weights: dict[str, list[int]] = {p.peer_id: [] for p in self.peers}  # at each epoch's start
        self.power_share: list[float] = []  # the largest voting power share of each epoch
        self.unconfirmed: dict[int, list[str]] = {}
        self._epoch_started(0)

    # ------------------------------------------------------------------ the duties

    def _lag(self) -> int:
        return self._rng.randint(0, self.config.latency)

    def before_block(self, height: int) -> None:
        """Act on every phase that opens at ``height`` (the state is the block before it)."""
        for now in open_rounds(self.chain.state):
            key, record = RoundKey(now.epoch, now.kind), now.record
            if key.epoch >= self.config.epochs:
                continue
            length = compute_blocks(now.kind, self.params)
            opens = {Phase.COMPUTE: record.start, Phase.SECRET: record.start + length,
                     Phase.REVEAL: record.start + length + self.params.poc_secret_blocks,
                     Phase.VERDICT: record.start + length + self.params.poc_secret_blocks
                     + self.params.poc_reveal_blocks}
            if height != opens.get(now.phase):
                continue
            if now.phase is Phase.COMPUTE:
                self._ends[key] = opens[Phase.VERDICT] + self.params.poc_verdict_blocks - 1
                self._commit(height, key, record.work_seed, length)
            elif now.phase is Phase.SECRET:
                self._open_secrets(height, key)
                if key.kind is RoundKind.REGULAR:
                    self._commit_seeds(height, key.epoch + 1)
            elif now.phase is Phase.REVEAL:
                self._reveal(height, key)
            else:
                self._judge(height, key, record.work_seed)

    def _provers(self, key: RoundKey) -> list[Peer]:
        """Who proves in this round: the online peers (a confirmation: those that committed in
        the epoch's regular round, which it confirms)."""
        online = [p for p in self.peers if p.online[key.epoch]]
        if key.kind is RoundKind.REGULAR:
            return online
        entries = self.chain.state.poc_entries
        return [p for p in online if (key.epoch, RoundKind.REGULAR, p.peer_id, MODEL) in entries]

    def _nonces(self, peer: Peer, key: RoundKey, blocks: int) -> int:
        hardware = peer.capacity
        if peer.strategy is Strategy.POC_RENTER and key.kind is RoundKind.REGULAR:
            hardware *= self.config.rent_factor
        noise = 1 + self._rng.uniform(-self.config.capacity_noise, self.config.capacity_noise)
        return max(1, round(hardware * blocks * noise))

    def _commit(self, height: int, key: RoundKey, work_seed: bytes, blocks: int) -> None:
        state = self.chain.state
        for peer in self._provers(key):
            computed = self._nonces(peer, key, blocks)
            claimed = computed
            if peer.strategy is Strategy.POC_OVERCLAIM:
                claimed = min(max(computed, round(computed * self.config.overclaim)), self.params.poc_max_nonces)
            leaves = [expected_leaf(work_seed, peer.peer_id, n) for n in range(computed)]
            leaves += [fabricated_leaf(work_seed, peer.peer_id, n) for n in range(computed, claimed)]
            secret = derive_secret(peer.key.secret, CHAIN_ID, key.epoch, key.kind, MODEL)
            self._proving[(key, peer.peer_id)] = Proving(leaves, secret, computed)
            stamp = 0
            if state.participant(peer.peer_id) is None:
                stamp = find_join_stamp(CHAIN_ID, key.epoch, peer.key.public_key, self.params.poc_join_pow_bits)
            commit = PocCommit(chain_id=CHAIN_ID, epoch=key.epoch, round=key.kind, model=MODEL,
                               root=merkle_root(leaves), count=claimed, secret_hash=secret_hash(secret), addrs=[],
                               join_stamp=stamp, sequence=0)
            at = height + blocks - 1 - self.config.latency + self._lag()  # lands before the window closes
            self.chain.submit(at, peer.key, lambda n, c=commit: replace(c, sequence=n))

    def _committed(self, key: RoundKey) -> list[tuple[Peer, Proving]]:
        """This round's provers whose commitment the ledger holds, with what they kept."""
        held = entries(self.chain.state, key.epoch, key.kind)
        return [(p, self._proving[(key, p.peer_id)]) for p in self.peers
                if (p.peer_id, MODEL) in held and (key, p.peer_id) in self._proving]

    def _open_secrets(self, height: int, key: RoundKey) -> None:
        for peer, proving in self._committed(key):
            self.chain.submit(height + self._lag(), peer.key, lambda n, s=proving.secret: PocSecret(
                chain_id=CHAIN_ID, epoch=key.epoch, round=key.kind, model=MODEL, secret=s, sequence=n))

    def _commit_seeds(self, height: int, epoch: int) -> None:
        """A prover without weight (a joiner, or one coming back) commits its validation seed for
        ``epoch`` once its compute is committed, as the validator actor does when the ledger
        would accept it (``may_commit_seed``); those with weight committed at the epoch's start."""
        state = self.chain.state
        if epoch >= self.config.epochs:
            return
        for peer in self.peers:
            if (peer.online[epoch] and state.commitment(epoch, peer.peer_id) is None
                    and may_commit_seed(state, epoch, peer.peer_id)):
                commitment = seed_commitment(epoch, peer.peer_id,
                                             derive_validation_seed(peer.key.secret, CHAIN_ID, epoch))
                self.chain.submit(height + self._lag(), peer.key, lambda n, c=commitment: CommitValidationSeed(
                    chain_id=CHAIN_ID, epoch=epoch, commitment=c, sequence=n))

    def _reveal(self, height: int, key: RoundKey) -> None:
        state = self.chain.state
        for peer, proving in self._committed(key):
            indices = sampled(state, key.epoch, key.kind, peer.peer_id, MODEL)
            if not indices:
                continue  # its secret never opened: nothing can be sampled
            leaves = [proving.leaves[i] for i in indices]
            proofs = [inclusion_proof(proving.leaves, i) for i in indices]
            self.chain.submit(height + self._lag(), peer.key, lambda n, lv=leaves, pr=proofs: PocReveal(
                chain_id=CHAIN_ID, epoch=key.epoch, round=key.kind, model=MODEL, leaves=lv, proofs=pr, sequence=n))
        for peer in self.peers:
            self._proving.pop((key, peer.peer_id), None)

    def _judge(self, height: int, key: RoundKey, work_seed: bytes) -> None:
        """Each online validator of the epoch recomputes every opened sample it has not judged."""
        state = self.chain.state
        info = state.epoch_info(key.epoch)
        power = info.weights if info is not None else {}
        checked: dict[str, bool] = {}  # prover -> does its opening hold (every validator finds the same)
        for validator in self.peers:
            if not power.get(validator.peer_id) or not validator.online[key.epoch]:
                continue
            for prover, model, entry in to_judge(state, key.epoch, key.kind, validator.peer_id):
                if prover not in checked:
                    indices = sampled(state, key.epoch, key.kind, prover, model)
                    checked[prover] = all(leaf == expected_leaf(work_seed, prover, i)
                                          for i, leaf in zip(indices, entry.leaves, strict=True))
                self.chain.submit(height + self._lag(), validator.key, lambda n, p=prover, ok=checked[prover]:
                                  PocVerdict(chain_id=CHAIN_ID, epoch=key.epoch, round=key.kind, prover=p,
                                             model=MODEL, ok=ok, sequence=n))

    # ------------------------------------------------------------------ what it measured

    def after_block(self, height: int) -> None:
        """Read a round's verdicts after its last verdict block, and each epoch's weights."""
        for key, end in list(self._ends.items()):
            if end == height:
                del self._ends[key]
                self._round_over(key)
        length = self.params.epoch_length_blocks
        if height % length == 0:
            ended = height // length - 1
            if ended < self.config.epochs:
                self.unconfirmed[ended] = sorted(self._name(p) for p in round_outcome(self.chain.state, ended).unconfirmed)
            if ended + 1 < self.config.epochs:
                self._epoch_started(ended + 1)

    def _round_over(self, key: RoundKey) -> None:
        state = self.chain.state
        row = {"epoch": key.epoch, "round": key.kind.name.lower(), "commitments": 0, "proven": 0, "fraud": 0,
               "unproven": 0, "honest fraud": 0}
        claims = {p.peer_id: p for p in self.peers if p.strategy is Strategy.POC_OVERCLAIM}
        for (prover, model), entry in entries(state, key.epoch, key.kind).items():
            judged = verdicts(state, key.epoch, prover, model, entry)
            outcome = "fraud" if judged.fraud else "proven" if judged.proven else "unproven"
            row["commitments"] += 1
            row[outcome] += 1
            if prover in claims and self.config.overclaim > 1:
                self.overclaims.append((key, judged.fraud))
            elif judged.fraud:
                row["honest fraud"] += 1
        self.rounds.append(row)

    def _epoch_started(self, epoch: int) -> None:
        state = self.chain.state
        for peer in self.peers:
            record = state.participant(peer.peer_id)
            self.weights[peer.peer_id].append(record.weight if record is not None else 0)
        info = state.epoch_info(epoch)
        assert info is not None
        power = info.weights
        share = max(power.values()) / sum(power.values()) if power else 0.0
        if len(power) >= 4:
            assert share * PPM <= self.params.voting_power_cap_ppm + 1, f"epoch {epoch}: voting power above the cap"
        self.power_share.append(share)

    def _name(self, peer_id: str) -> str:
        return next(p.name for p in self.peers if p.peer_id == peer_id)

    def report(self) -> tuple[dict[str, object], dict[str, float | int]]:
        """(the report's ``poc`` section, its network lines): per participant its compute share
        and weight share, the overclaimer caught per round against 1 - (1/k)^s, weights per
        epoch, voting power against the cap."""
        last = self.config.epochs - 1
        final = {p.peer_id: self.weights[p.peer_id][last] for p in self.peers}
        present = [p for p in self.peers if p.online[last]]
        capacity = sum(p.capacity for p in present) or 1
        weight = sum(final[p.peer_id] for p in present) or 1
        participants = [{"peer": p.name, "role": self.roles[p.peer_id], "capacity": p.capacity,
                         "compute share": p.capacity / capacity if p.online[last] else 0.0,
                         "weight share": final[p.peer_id] / weight, "weights": self.weights[p.peer_id]}
                        for p in self.peers]
        caught = sum(c for _, c in self.overclaims)
        k, size = self.config.overclaim, self.params.poc_sample_size
        expected = 1 - (1 / k) ** size if k > 1 else 0.0
        section: dict[str, object] = {
            "sample size": size, "overclaim k": k, "voting power cap": self.params.voting_power_cap_ppm / PPM,
            "rounds": self.rounds, "participants": participants, "max voting power share": self.power_share,
            "unconfirmed": {str(e): names for e, names in sorted(self.unconfirmed.items())},
            "overclaims": [{"epoch": key.epoch, "round": key.kind.name.lower(), "caught": c}
                           for key, c in self.overclaims]}
        lines: dict[str, float | int] = {
            "poc: rounds": len(self.rounds),
            "poc: honest commitments failed": sum(int(r["honest fraud"]) for r in self.rounds),
            "poc: overclaims": len(self.overclaims),
            "poc: overclaims caught share": caught / len(self.overclaims) if self.overclaims else 0.0,
            "poc: 1 - (1/k)^sample size": expected,
            "poc: max voting power share": max(self.power_share, default=0.0),
            **stable_fairness([p for p in self.peers if self.roles[p.peer_id] == "honest" and not p.churns],
                              final)}
        return section, lines


def stable_fairness(stable: list[Peer], weights: dict[str, int]) -> dict[str, float]:
    """Among honest peers that proved all run: the worst relative deviation of a peer's final
    weight share from its compute share (0: weight follows compute exactly)."""
    capacity = sum(p.capacity for p in stable)
    weight = sum(weights[p.peer_id] for p in stable)
    if len(stable) < 2 or not weight:
        return {}
    return {"poc: fair max |weight share / compute share - 1|":
            max(abs((weights[p.peer_id] / weight) / (p.capacity / capacity) - 1) for p in stable)}
