"""Proof of compute: the pure rules by which weight is earned, one function per rule.

Why
---
Weight decides everything: who is drawn to execute (and paid), who
validates, whose vote commits blocks. On an open network it cannot come from
identity (keys are free) nor from a genesis file (closed club); it comes, as
in the Gonka network, from compute proven on the model served. Each epoch a
*round* asks every participant to run as many forward passes of its model
as it can in a fixed window, over prompts no one could know before the
window opened, and to commit to the results; a random sample of them, drawn
only after every commitment is in, is opened and recomputed by validators.
Weight for the next epoch = nonces committed, per model, if the sample holds.

A round, at heights relative to its start ``S`` (all lengths in genesis)::

    S-1 ends          work seed = H(chain, epoch, kind, hash of block S-1): unknown before,
                      so nothing can be precomputed (grinding it gains nothing: every seed
                      costs the same work)
    S .. S+C-1        compute; PocCommit(root, count, H(secret)) lands in this window
    .. +X             PocSecret(secret): the committed secrets are opened
    end of secrets    sample seed = H(work seed, the opened secrets of the committers that hold
                      voting power this epoch): fixed by commitments made before anyone could
                      know it, so no proposer can steer a sample, and withholding a secret
                      (the last revealer's one bit) costs the withholder its whole round --
                      which is why only the weighted count: a newcomer's key is cheap, and
                      k throwaway keys would otherwise buy 2**k samples to choose from
    .. +R             PocReveal: the sampled leaves with their Merkle proofs (checked here)
    .. +V             PocVerdict(ok) by the epoch's validators after recomputing the leaves

Two rounds per epoch: the *regular* round at a fixed offset measures the
next epoch's weights; the *confirmation* round opens at a height nobody can
predict (each block after the regular round ends starts it with probability
1 / blocks left, from the sample seed and that block's hash), and every
regular committer must show in it at least ``poc_confirm_min_ppm`` of its
regular nonce rate, or keep only the rate it confirmed (nothing if it did
not confirm) and forfeit the epoch's reward: hardware rented for the regular
window alone buys no weight (Gonka's confirmation PoC).

A commitment passes when validators holding more than half of the voting power of those that
serve its model, and more than a third of the epoch's, say so (the prover's own power excepted:
it does not judge itself; :class:`Verdicts` says why both); it *fails* (fraud: weight 0 and
reputation reset) when more than half of the epoch's say it does not; otherwise (no secret,
no openings, too few verdicts) it is simply unproven: weight 0, as for a participant that left.

From targets to weights: decreases together may take at most
``max_weight_shift_ppm`` of the total per round (:func:`declined_targets`;
a prover found lying falls at once), so a missed round -- an outage, or an
attacker cutting honest links for one window -- cannot hand the network to
the few who got through; all increases together may add at most ``max_weight_growth_ppm`` (< 1/2) of the
weight that *stays* (each participant's min(previous, target)), so no
coalition of newcomers reaches 1/3 of the voting power in one round, even
when the incumbents fail a round (an outage cannot hand newcomers the
network). The first round after genesis rebases: the genesis participants'
proven counts are the weight that stays. A round that would leave no
weight at all changes nothing (the network cannot vote itself out of
existence).
Voting power is weight capped at ``voting_power_cap_ppm`` of the total
(:func:`capped_voting_power`); executor draws use the uncapped weight per
model, so work follows compute.

Registration is not free spam: a key with no account joins only through a
PocCommit that carries a join stamp (:func:`join_stamp_ok`, hashcash over
its key and the epoch: CPU per identity per round) and only among the first
``poc_max_newcomers`` of a round; it earns weight only if its sample holds.
Ten identities on one machine split that machine's nonces, and a nonce's
prompt binds the identity (``inference.poc``), so together they weigh what
one would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from gonka_p2p.ledger.rules import PPM, shift_budget

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params

SECRET_BYTES = 32
MAX_POC_LEAF_BYTES = 256
_WORK_DOMAIN = b"gonka-p2p/poc-work-seed/v1\x00"
_SAMPLE_DOMAIN = b"gonka-p2p/poc-sample-seed/v1\x00"
_INDEX_DOMAIN = b"gonka-p2p/poc-sample-index/v1\x00"
_CONFIRM_DOMAIN = b"gonka-p2p/poc-confirm-start/v1\x00"
_STAMP_DOMAIN = b"gonka-p2p/poc-join-stamp/v1\x00"
_SECRET_DOMAIN = b"gonka-p2p/poc-secret/v1\x00"


class RoundKind(IntEnum):
    REGULAR = 0  # sets the next epoch's weights
    CONFIRMATION = 1  # re-checks the regular round's rate at an unpredictable height


class Phase(IntEnum):
    """Where a height lies in a round that starts at ``start``."""

    BEFORE = 0
    COMPUTE = 1
    SECRET = 2
    REVEAL = 3
    VERDICT = 4
    OVER = 5


@dataclass(frozen=True)
class Verdicts:
    """The voting power that passed and failed one commitment, out of ``total``, the power of
    the epoch's validators but the prover (it does not judge itself), of which ``serving``
    serve its model (list it in their registry entries) or judged it anyway.

    Proven: more than half of ``serving`` passed it -- a validator recomputes only the models
    its node runs, so out of ``total`` a model that the validators holding a majority do not
    all serve could never be proven, and a coalition that serves nothing kept it so by its mere
    existence -- and more than a third of ``total``: out of ``serving`` alone, a model served by
    one validator would be decided by that one, whose Sybils could claim any count on it.
    ``total``'s third is more than the < 1/3 coalition of the threat model holds (the prover's
    own power, excluded, only lowers a coalition's share when the prover is one of its own),
    so some honest validator must agree. The price: a model served by validators holding at
    most a third of the others' power is not proven until more serve it.

    Fraud (weight 0, reputation reset, on every model): more than half of ``total``, as ever.
    A verdict of ``serving`` alone would let the few that serve a model convict an honest
    prover of it, and a large one is exactly whom a coalition gains by framing; so the
    servers' failing verdict alone leaves the commitment unproven, which earns nothing."""

    passed: int
    failed: int
    total: int
    serving: int

    @property
    def proven(self) -> bool:
        return 2 * self.passed > max(self.serving, -(-2 * self.total // 3)) and not self.fraud

    @property
    def fraud(self) -> bool:
        return 2 * self.failed > self.total


def compute_blocks(kind: RoundKind, params: Params) -> int:
    return params.poc_compute_blocks if kind is RoundKind.REGULAR else params.poc_confirm_compute_blocks


def round_span(kind: RoundKind, params: Params) -> int:
    """Blocks from a round's first compute block to its last verdict block, inclusive."""
    return (compute_blocks(kind, params) + params.poc_secret_blocks + params.poc_reveal_blocks
            + params.poc_verdict_blocks)


def epoch_first_height(epoch: int, params: Params) -> int:
    return epoch * params.epoch_length_blocks + 1


def regular_start(epoch: int, params: Params) -> int:
    return epoch_first_height(epoch, params) + params.poc_start_offset_blocks


def confirmation_window(epoch: int, params: Params) -> tuple[int, int]:
    """The first and last heights at which ``epoch``'s confirmation round may start: after the
    regular round, early enough to finish inside the epoch."""
    first = regular_start(epoch, params) + round_span(RoundKind.REGULAR, params)
    last = (epoch + 1) * params.epoch_length_blocks - round_span(RoundKind.CONFIRMATION, params) + 1
    return first, last


def schedule_problem(params: Params) -> str | None:
    """Why the rounds do not fit in an epoch, or None (checked when a genesis loads)."""
    if not params.poc_enabled:
        return None
    first, last = confirmation_window(0, params)
    if last < first:
        return (f"poc_start_offset_blocks + both rounds ({round_span(RoundKind.REGULAR, params)} and "
                f"{round_span(RoundKind.CONFIRMATION, params)} blocks) must fit in epoch_length_blocks "
                f"({params.epoch_length_blocks})")
    return None


def phase(height: int, start: int, kind: RoundKind, params: Params) -> Phase:
    offset = height - start
    if offset < 0:
        return Phase.BEFORE
    for ph, length in ((Phase.COMPUTE, compute_blocks(kind, params)), (Phase.SECRET, params.poc_secret_blocks),
                       (Phase.REVEAL, params.poc_reveal_blocks), (Phase.VERDICT, params.poc_verdict_blocks)):
        if offset < length:
            return ph
        offset -= length
    return Phase.OVER


def secrets_close(start: int, kind: RoundKind, params: Params) -> int:
    """The last height of the secret phase: its end fixes the sample seed."""
    return start + compute_blocks(kind, params) + params.poc_secret_blocks - 1


def work_seed(chain_id: str, epoch: int, kind: RoundKind, block_hash: bytes) -> bytes:
    return hashlib.sha256(_WORK_DOMAIN + chain_id.encode() + b"\x00" + epoch.to_bytes(8, "big")
                          + bytes([kind]) + block_hash).digest()


def secret_hash(secret: bytes) -> bytes:
    return hashlib.sha256(_SECRET_DOMAIN + secret).digest()


def derive_secret(key_secret: bytes, chain_id: str, epoch: int, kind: RoundKind, model: str) -> bytes:
    """A committer's round secret, derived from its key so that a restart recovers it."""
    return hashlib.sha256(_SECRET_DOMAIN + key_secret + chain_id.encode() + b"\x00" + epoch.to_bytes(8, "big")
                          + bytes([kind]) + model.encode()).digest()


def sample_seed(work: bytes, secrets: Mapping[tuple[str, str], bytes]) -> bytes:
    """From the work seed and every opened secret, by (peer, model), in sorted order."""
    h = hashlib.sha256(_SAMPLE_DOMAIN + work)
    for (peer, model), secret in sorted(secrets.items()):
        h.update(peer.encode() + b"\x00" + model.encode() + b"\x00" + secret)
    return h.digest()


def sample_indices(seed: bytes, peer: str, model: str, count: int, size: int) -> tuple[int, ...]:
    """The distinct nonces of a ``count``-nonce commitment to open: ``size`` of them drawn from
    the sample seed (all of them when there are no more), in draw order."""
    if count <= size:
        return tuple(range(count))
    picked: dict[int, None] = {}
    j = 0
    while len(picked) < size:
        h = hashlib.sha256(_INDEX_DOMAIN + seed + peer.encode() + b"\x00" + model.encode() + b"\x00"
                           + j.to_bytes(8, "big")).digest()
        picked.setdefault(int.from_bytes(h[:8], "big") % count, None)
        j += 1
    return tuple(picked)


def confirmation_starts_after(seed: bytes, block_hash: bytes, height: int, last_start: int) -> bool:
    """Does the confirmation round start at ``height + 1``? Each candidate block triggers it with
    probability 1 / (candidates left), so the start is uniform over the window and known only
    once the block before it is committed."""
    left = last_start - height
    if left <= 1:
        return True
    h = hashlib.sha256(_CONFIRM_DOMAIN + seed + block_hash).digest()
    return int.from_bytes(h[:8], "big") % left == 0


def join_stamp_ok(chain_id: str, epoch: int, pubkey: bytes, stamp: int, bits: int) -> bool:
    """Hashcash: H(chain, epoch, key, stamp) has ``bits`` leading zero bits."""
    h = hashlib.sha256(_STAMP_DOMAIN + chain_id.encode() + b"\x00" + epoch.to_bytes(8, "big") + pubkey
                       + stamp.to_bytes(8, "big")).digest()
    return int.from_bytes(h, "big") >> (256 - bits) == 0 if bits else True


def find_join_stamp(chain_id: str, epoch: int, pubkey: bytes, bits: int) -> int:
    """The first stamp that passes :func:`join_stamp_ok` (about 2**bits hashes)."""
    stamp = 0
    while not join_stamp_ok(chain_id, epoch, pubkey, stamp, bits):
        stamp += 1
    return stamp


def confirmation_holds(confirmed: int, regular: int, params: Params) -> bool:
    """Did a confirmation round show enough nonces per block for the ``regular`` count of the
    same epoch's regular round? Integer cross-multiplication, no floats."""
    return (confirmed * params.poc_compute_blocks * PPM
            >= params.poc_confirm_min_ppm * regular * params.poc_confirm_compute_blocks)


def declined_targets(previous: Mapping[str, int], targets: Mapping[str, int], shift_ppm: int,
                     exempt: Collection[str]) -> dict[str, int]:
    """``targets`` with the decreases bounded: together they may take at most ``shift_ppm`` of
    the previous total (rounded up, so a small network still moves), shared in proportion to
    the decrease each asked (largest remainders, then peer id, for the units left over). The
    ``exempt`` -- provers a majority found lying, participants already sanctioned -- fall in full.

    Why. A missed round is not proof of anything: a rolling upgrade, an outage, or an attacker
    cutting honest provers' links for one commit window all look alike. Applied in full, one
    missed round handed a testnet all its voting power to the one prover that got through
    (run 8); with the bound an epoch moves at most ``shift_ppm`` of honest weight, so a
    Byzantine share f becomes at most f / (1 - shift) -- below 1/3 from below 30 % at the
    default 10 % -- as for sanctions (``disputes.weight_cuts``). A participant that left loses
    its weight over a few rounds instead of one (a third of the total: four rounds)."""
    asked = {p: w - targets.get(p, 0) for p, w in sorted(previous.items())
             if p not in exempt and targets.get(p, 0) < w}
    total = sum(asked.values())
    allowed = shift_budget(sum(previous.values()), shift_ppm)
    bounded = dict(targets)
    if total <= allowed:
        return bounded
    granted = {p: a * allowed // total for p, a in asked.items()}
    left = allowed - sum(granted.values())
    for p in sorted(asked, key=lambda p: (-(asked[p] * allowed % total), p))[:left]:
        granted[p] += 1
    for p, cut in granted.items():
        bounded[p] = previous[p] - cut
    return bounded


def grown_weights(previous: Mapping[str, int], targets: Mapping[str, int], growth_ppm: int) -> dict[str, int]:
    """Each participant's next total weight: its target, except that the increases together may
    add at most ``growth_ppm`` of the weight that stays, sum(min(previous, target)) (scaled down
    alike). Decreases are the targets' (bounded before: :func:`declined_targets`). May leave
    nobody: the caller decides what then."""
    peers = sorted(set(previous) | set(targets))
    growth = {p: max(0, targets.get(p, 0) - previous.get(p, 0)) for p in peers}
    total_growth = sum(growth.values())
    allowed = sum(min(previous.get(p, 0), targets.get(p, 0)) for p in peers) * growth_ppm // PPM
    nxt = {}
    for p in peers:
        target = targets.get(p, 0)
        if growth[p] and total_growth > allowed:
            target = previous.get(p, 0) + growth[p] * allowed // total_growth
        if target:
            nxt[p] = target
    return nxt


def scaled_model_weights(per_model: Mapping[str, int], total: int) -> tuple[tuple[str, int], ...]:
    """``per_model`` scaled down to sum to at most ``total`` (floor), sorted, models proven with
    nothing dropped. A model whose share floors to 0 stays in at 0: a split that floored to
    nothing would be the empty split, which ``Participant.weight_for`` reads as unsplit weight
    on every listed model."""
    have = sum(per_model.values())
    scaled = per_model if have <= total else {m: w * total // have for m, w in per_model.items()}
    return tuple(sorted((m, scaled[m]) for m, w in per_model.items() if w))


def capped_voting_power(weights: Mapping[str, int], cap_ppm: int) -> dict[str, int]:
    """Voting power: weight, with no participant above ``cap_ppm`` of the total power (water-
    filling: the capped ones hold exactly the cap of the capped total). Networks of fewer than 4
    participants are not capped -- with 3 or fewer someone must hold a third."""
    if len(weights) < 4 or cap_ppm >= PPM:
        return dict(weights)
    order = sorted(weights, key=lambda p: (-weights[p], p))
    rest = sum(weights.values())
    for capped, peer in enumerate(order):
        if capped * cap_ppm >= PPM:
            break  # cannot cap that many: every share would be above the cap
        cap = cap_ppm * rest // (PPM - capped * cap_ppm)
        if weights[peer] <= cap:
            return {p: min(weights[p], cap) if i < capped else weights[p] for i, p in enumerate(order)}
        rest -= weights[peer]
    floor = min(weights.values())  # infeasible (cap below 1/n): equal power is the closest
    return {p: floor for p in order}
