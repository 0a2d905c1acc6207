"""The ledger's rules of arithmetic and time, one pure function each.

Every decision the state machine takes (:mod:`~gonka_p2p.ledger.tx_rules`,
:mod:`~gonka_p2p.ledger.end_of_block`) that is a formula rather than a
lookup lives here, as a small function of plain values: how many coins an
inference locks, what it costs, when it expires, when an epoch ends, which
timestamps are fresh, whom a weighted draw picks (one rule,
:func:`weighted_pick`, for a TA's executor and a dispute's committee alike;
the dispute's own rules are in :mod:`~gonka_p2p.ledger.disputes`).
None of them reads or writes state, so
each is tested on its own against its specification (tests/test_ledger_state.py)
and can be quoted in a dispute.

All amounts are integers in coin units; all heights are block numbers; the
only wall-clock quantities are the client's signed ``timestamp_ms`` and the
block's ``time_ms``. Rates and probabilities are integers in parts per
million (``PPM``); log-likelihood ratios are integers in micro-nats. No
float enters a decision: where a rule needs a real function (the duty
threshold's fractional power) it is computed with :mod:`decimal` at fixed
precision, whose ``ln``/``exp`` are correctly rounded, so every replica on
every platform gets the same integer.

Verification economics, in the order an epoch lives them
---------------------------------------------------------
Epoch e holds heights e*L+1 .. (e+1)*L (:func:`epoch_of`). An inference
belongs to the epoch in which it closed (settled or expired).

1. During epoch e-1 each validator commits to a secret 32-byte seed for
   epoch e (:func:`seed_commit_open`, :func:`seed_commitment`). When epoch e
   starts, its validator set (weights) and its validation floor
   m = :func:`validation_floor_ppm` (traffic = inferences settled in e-1,
   capped per executor at its weight's fair share: :func:`floor_traffic`)
   are frozen.
2. When an inference settles, its validation probability is fixed:
   p = :func:`p_validate_ppm` (m, the executor's reputation r), capped
   (:func:`validation_ppm`).
3. Validator v must check inference i iff i's point lies on v's arc of the
   duty ring (:mod:`~gonka_p2p.ledger.duties`): v has the duty with
   probability q_v = :func:`duty_threshold` / 2^64 = 1 - (1 - p)^(w_v / W),
   W the weight of i's eligible validators (committed for the epoch, not
   its executor, not its TA). Independent seeds make the events independent
   across validators, so P(nobody checks) = prod_v (1 - p)^(w_v / W) =
   (1 - p)^(sum w_v / W) = 1 - p: at least one validator checks with
   probability exactly p, and a validator's share of the checks grows with
   its weight.
4. Only a validator whose duty covers the inference can fail it; the failure
   opens a dispute that committees drawn later settle by a majority of all
   their seats (:mod:`~gonka_p2p.ledger.disputes`, with the probability
   argument); the outcome sanctions the executor or costs the accuser.
5. After the epoch ends (:func:`seed_reveal_open`) each validator reveals
   its seed; the ledger recomputes its duties: a duty without a check is
   skipped work (:func:`forfeit_reasons`).
6. At :func:`settlement_height`: the epoch test (``epoch_test.run_epoch_test``) over
   each executor's checked inferences (:func:`inference_observation`), fees,
   the reward (:func:`epoch_reward_pools`, :func:`pro_rata`), forfeits,
   reputations (:func:`reputation_after_epoch`).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from decimal import ROUND_FLOOR, Context, Decimal, localcontext
from enum import IntEnum, StrEnum
from fractions import Fraction
from functools import lru_cache
from itertools import accumulate
from typing import TYPE_CHECKING

import base58
from coincurve import PublicKey

from gonka_p2p.identity import PUBKEY_BYTES

if TYPE_CHECKING:
    from gonka_p2p.ledger.genesis import Params
    from gonka_p2p.wire.messages import InferenceRequest

PPM = 1_000_000  # parts per million: 1.0 as an integer rate
DUTY_SCALE = 2**64  # points of the duty ring (ledger/duties.py); a threshold of DUTY_SCALE always fires
SEED_BYTES = 32
_SEED_DOMAIN = b"gonka-p2p/validation-seed/v1\x00"
_EXECUTOR_DOMAIN = b"gonka-executor-choice"

# base58 payload of a secp256k1 peer id: identity multihash (0x00, len 37) of
# protobuf PublicKey{Type=2, Data=<33 bytes>}; see identity.peer_id_from_pubkey.
_PEER_ID_PREFIX = b"\x00\x25\x08\x02\x12\x21"


@lru_cache(maxsize=1 << 16)
def is_account_address(text: str) -> bool:
    """An account address is the peer id of a compressed secp256k1 key.

    Coins sent anywhere else could never be spent (no key signs for them).
    Peer ids carry no checksum, so a typo that still decodes to a curve
    point is a valid (if unowned) address: wallets must confirm addresses.
    """
    if not isinstance(text, str) or not 40 <= len(text) <= 64:
        return False
    try:
        raw = base58.b58decode(text)
    except ValueError:
        return False
    if not (len(raw) == len(_PEER_ID_PREFIX) + PUBKEY_BYTES and raw.startswith(_PEER_ID_PREFIX)
            and base58.b58encode(raw).decode() == text):
        return False
    try:
        PublicKey(raw[len(_PEER_ID_PREFIX):])
    except Exception:  # noqa: BLE001 - coincurve raises several types for bad points
        return False
    return True


def prompt_token_bound(request: InferenceRequest, params: Params) -> int:
    """An upper bound on the prompt's token count, computable without a tokenizer.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2...) maps every token to at
    least one UTF-8 byte, so no text tokenizes into more tokens than it has
    bytes; SentencePiece with byte fallback behaves the same apart from a
    leading-space marker. What the chat template adds around each turn
    (special tokens, newlines, that marker) is bounded by
    ``prompt_overhead_per_turn_tokens`` per turn plus
    ``prompt_overhead_fixed_tokens`` (BOS, generation prompt). So escrow
    computed from this bound covers any honest prompt; a template that adds
    more only means the executor is paid for at most this many prompt tokens
    (the cost is capped at the escrow).
    """
    per_turn = params.prompt_overhead_per_turn_tokens
    body = sum(len(t.role.encode()) + len(t.content.encode()) + per_turn for t in request.messages)
    return body + params.prompt_overhead_fixed_tokens


def escrow_for(prompt_bound: int, max_tokens: int, price: int) -> int:
    """Coins locked at StartInference: the most the inference can cost."""
    assert prompt_bound >= 0 and max_tokens >= 0 and price >= 1
    return (prompt_bound + max_tokens) * price


def inference_cost(prompt_tokens: int, completion_tokens: int, price: int, escrow: int) -> int:
    """Coins the client pays for finished work: the claimed tokens at the price, never above escrow."""
    assert prompt_tokens >= 0 and completion_tokens >= 0 and escrow >= 0
    return min((prompt_tokens + completion_tokens) * price, escrow)


def request_is_fresh(timestamp_ms: int, block_time_ms: int, window_ms: int) -> bool:
    """A client request may start only within ``window_ms`` either side of the block time.

    Bounding the age is what lets the ledger forget an inference id after
    :func:`replay_memory_until` without ever accepting it twice; bounding the
    future side stops a client (or a TA) from pre-dating requests to keep
    their ids alive for ever.
    """
    return abs(block_time_ms - timestamp_ms) <= window_ms


def replay_memory_until(timestamp_ms: int, window_ms: int) -> int:
    """Last block time at which a request with this timestamp is still fresh.

    After it, :func:`request_is_fresh` rejects the request anyway, so its id
    no longer needs remembering.
    """
    return timestamp_ms + window_ms


def inference_deadline(start_height: int, params: Params) -> int:
    """The last height whose block may carry the FinishInference; at its end the inference expires."""
    return start_height + params.inference_deadline_blocks


def held_finish_deadline(held_height: int, params: Params) -> int:
    """A Finish held without its Start is dropped at the end of this height."""
    return held_height + params.inference_deadline_blocks


def held_finish_share(executors: int, params: Params) -> int:
    """How many held Finishes any one executor may have: ``max_held_finishes_per_executor``, but
    no more than an equal share of ``max_held_finishes`` among the ``executors`` a Start could
    name -- so that however many identities an attacker puts in the draw tables, they cannot
    fill the holding area and leave an honest executor's Finish without a place."""
    return max(1, min(params.max_held_finishes_per_executor, params.max_held_finishes // max(1, executors)))


def is_epoch_end(height: int, params: Params) -> bool:
    """Epoch settlement runs at the end of every block whose height is a multiple of the epoch length."""
    return height > 0 and height % params.epoch_length_blocks == 0


def epoch_after(height: int, params: Params) -> int:
    """The epoch the next block belongs to, once ``height`` is committed (epoch 0 holds heights 1..L)."""
    return height // params.epoch_length_blocks


def sequence_acceptable(expected: int, got: int, *, mempool: bool) -> bool:
    """A block accepts exactly the account's next sequence; a mempool also keeps later ones queued."""
    return got >= expected if mempool else got == expected


def next_block_time(previous_ms: int, proposed_ms: int) -> int:
    """Block time never goes backwards: a proposer's clock behind the last block counts as equal."""
    return max(previous_ms, proposed_ms)


# --------------------------------------------------------------------------- epochs and windows


def epoch_of(height: int, params: Params) -> int:
    """The epoch a block belongs to: epoch e holds heights e*L+1 .. (e+1)*L."""
    assert height >= 1
    return (height - 1) // params.epoch_length_blocks


def epoch_last_height(epoch: int, params: Params) -> int:
    """The last block of ``epoch``; the next epoch's validator set is frozen at its end."""
    assert epoch >= 0
    return (epoch + 1) * params.epoch_length_blocks


def validation_deadline(epoch: int, params: Params) -> int:
    """The last height whose block may carry a Validation of an inference of ``epoch``."""
    return epoch_last_height(epoch, params) + params.validation_window_blocks


def settlement_height(epoch: int, params: Params) -> int:
    """Where ``epoch`` settles: after its validation window and every round of a dispute opened
    in the window's last block. Genesis bounds it to at most one epoch after the epoch's end."""
    return validation_deadline(epoch, params) + params.dispute_span_blocks


def epoch_settled_at(height: int, params: Params) -> int | None:
    """The epoch whose settlement runs at the end of ``height``, if any."""
    since = height - params.settlement_delay_blocks
    if since < params.epoch_length_blocks or since % params.epoch_length_blocks:
        return None
    return since // params.epoch_length_blocks - 1


def seed_commit_open(epoch: int, height: int, params: Params) -> bool:
    """A seed for ``epoch`` is committed during the epoch before it, so that it is fixed before
    any of the epoch's inferences exist (epoch 0's come with the genesis file)."""
    return epoch >= 1 and epoch_of(height, params) == epoch - 1


def seed_reveal_open(epoch: int, height: int, params: Params) -> bool:
    """A seed is revealed once its epoch has ended (every inference of it is closed, so knowing
    its validators helps no executor) and before the epoch settles."""
    return epoch_last_height(epoch, params) < height <= settlement_height(epoch, params)


# --------------------------------------------------------------------------- sampling


def validation_floor_ppm(traffic: int, params: Params) -> int:
    """The floor m of the validation rate, from the previous epoch's inference count.

    Gonka's schedule with the defaults: 100 % up to 100 inferences, falling
    linearly to 5 % at 5,000 and to 1 % at 10,000 and above. Between the
    points the decrement is rounded down, so the floor is rounded up.
    """
    assert traffic >= 0
    full, mid, low = (params.floor_full_until_inferences, params.floor_mid_inferences,
                      params.floor_low_inferences)
    if traffic <= full:
        return PPM
    if traffic <= mid:
        return PPM - (PPM - params.floor_mid_ppm) * (traffic - full) // (mid - full)
    if traffic < low:
        return params.floor_mid_ppm - (
            (params.floor_mid_ppm - params.floor_low_ppm) * (traffic - mid) // (low - mid))
    return params.floor_low_ppm


def p_validate_ppm(reputation_ppm: int, floor_ppm: int) -> int:
    """p = m + (1 - m)(1 - r): the probability that an inference is checked, rounded up.

    A newcomer (r = 0) is always checked; a fully trusted executor (r = 1) at the floor m.
    """
    assert 0 <= reputation_ppm <= PPM and 0 <= floor_ppm <= PPM
    return floor_ppm + -(-(PPM - floor_ppm) * (PPM - reputation_ppm) // PPM)


def validation_ppm(reputation_ppm: int, floor_ppm: int, params: Params) -> int:
    """The probability that an inference is checked: :func:`p_validate_ppm`, capped at
    ``validation_cap_ppm``.

    Why a cap: validators draw their duties independently (from secret seeds), so "at
    least one checks with probability p" costs about -ln(1 - p) checks per inference
    when many validators share the work -- and at p = 1 exactly, every validator checks
    every inference (44 checks each in a 50-peer simulation). At the default 99 %, a
    newcomer's inference is checked by at least one validator 99 % of the time, at
    most about 4.6 checks on average."""
    return min(p_validate_ppm(reputation_ppm, floor_ppm), params.validation_cap_ppm)


@lru_cache(maxsize=4096)
def duty_threshold(p_ppm: int, weight: int, total_weight: int) -> int:
    """floor(2^64 * q) with q = 1 - (1 - p)^(weight / total_weight): validator v's chance of
    a duty, chosen so that among validators whose weights sum to ``total_weight`` at least
    one has the duty with probability exactly p (see the module docstring).

    p = 1 gives every validator the duty; a lone validator (weight == total) gets q = p.
    Computed in decimal at 60 digits (``ln``/``exp`` correctly rounded): the same integer on
    every replica.
    """
    assert 0 <= p_ppm <= PPM and 0 < weight <= total_weight
    if p_ppm in (0, PPM) or weight == total_weight:
        return DUTY_SCALE * p_ppm // PPM
    with localcontext(Context(prec=60)):
        stay = ((Decimal(PPM - p_ppm) / PPM).ln() * weight / total_weight).exp()
        return int(((1 - stay) * DUTY_SCALE).to_integral_value(rounding=ROUND_FLOOR))


def seed_commitment(epoch: int, validator: str, seed: bytes) -> bytes:
    """What a validator commits to for an epoch: the hash of its seed, bound to the epoch and
    to itself (another validator cannot copy it, nor can it be reused in another epoch)."""
    return hashlib.sha256(_SEED_DOMAIN + epoch.to_bytes(8, "big") + validator.encode() + b"\x00"
                          + seed).digest()


# --------------------------------------------------------------------------- weighted draws


MAX_EXECUTOR_ATTEMPTS = 16  # the schema's bound on StartInference.attempt; genesis sets the real one


class NoEligibleExecutor(Exception):
    """No candidate with positive weight remains."""


class DrawTable:
    """The one weighted draw's table: the positive weights laid end to end in peer-id order (so
    dict order does not matter). Built once per table, it answers each draw by bisection, and a
    draw that excludes a few peers as if they had never been laid (:meth:`pick`)."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        pool = sorted((peer, w) for peer, w in weights.items() if w > 0)
        self._peers = [peer for peer, _ in pool]
        self._ends = list(accumulate(w for _, w in pool))
        self._slot = {peer: (end - w, w) for (peer, w), end in zip(pool, self._ends, strict=True)}

    def __contains__(self, peer: object) -> bool:
        return peer in self._slot

    def pick(self, draw: bytes, exclude: frozenset[str] = frozenset()) -> str | None:
        """The peer under point ``draw mod total`` of the table without ``exclude``; None if no
        weight is left. ``draw`` is a 256-bit hash: the modulo bias is negligible."""
        gone = sorted(self._slot[p] for p in exclude if p in self._slot)
        total = (self._ends[-1] if self._ends else 0) - sum(w for _, w in gone)
        if total <= 0:
            return None
        point = int.from_bytes(draw, "big") % total
        for start, weight in gone:  # in table order: a point that reaches an excluded stretch skips it
            if point < start:
                break
            point += weight
        return self._peers[bisect_right(self._ends, point)]


def weighted_pick(weights: Mapping[str, int], draw: bytes) -> str | None:
    """The one weighted draw (:class:`DrawTable`): the peer under point ``draw mod total``;
    None if no weight is positive. A peer's chance is its share of the weight, so a thousand
    identities with no weight are never drawn."""
    return DrawTable(weights).pick(draw)


def choose_executor(weights: Mapping[str, int] | DrawTable, exclude: frozenset[str], inference_id: bytes,
                    attempt: int) -> str:
    """The executor drawn for an inference at ``attempt``: the weighted draw over ``weights``
    (peer id -> weight, or their :class:`DrawTable`, built once for many draws) minus
    ``exclude``, drawn from (inference id, attempt).

    The ledger recomputes it for every StartInference, from the weights it holds for the
    model and ``exclude = {the TA}`` (``executor_draw.executor_weights``), and the TA draws the
    same way; so the executor the ledger pays is the draw, never the TA's pick. What a
    greedy TA can still do: skip draws, claiming the executor failed before its first token,
    up to ``max_executor_attempts`` = k; a partner holding a share w of the weight is then
    drawn at some attempt with probability 1 - (1 - w)^k (<= k*w) instead of w -- bounded
    by k, and each skip is attributable (the record keeps the attempt). A client that is
    also the TA can grind its request's nonce (so the inference id) until the draw lands on
    a partner: that partner must hold real weight (a zero-weight identity is never drawn),
    and the fees it is paid are the client's own, recycled; but an executor reward split
    by tokens executed (:func:`pro_rata`) would grow with such self-sent work: settlement
    caps each executor's score at its weight's fair share (:func:`fair_share_scores`), and the
    floor's traffic count likewise (:func:`floor_traffic`)."""
    draw = hashlib.sha256(_EXECUTOR_DOMAIN + inference_id + attempt.to_bytes(4, "big")).digest()
    peer = (weights if isinstance(weights, DrawTable) else DrawTable(weights)).pick(draw, exclude)
    if peer is None:
        raise NoEligibleExecutor("no live executor with positive weight serves this model")
    return peer


# --------------------------------------------------------------------------- disputes


class DisputeOutcome(StrEnum):
    OPEN = "open"  # drawing or voting
    INVALID = "invalid"  # a strict majority of ALL the committee's seats found the work invalid
    VALID = "valid"  # at least half of all seats found it valid: the accusation is overturned
    UNDECIDED = "undecided"  # its last round closed with neither: nobody is judged by it


def verdict_is_consistent(valid: bool, suspicious: bool, failure_flags: int) -> bool:
    """A valid verdict names no failure; a failed one names at least one and is not 'suspicious'
    (suspicious qualifies a pass: valid, but its distance is above the honest bulk)."""
    return failure_flags == 0 if valid else (failure_flags != 0 and not suspicious)


# --------------------------------------------------------------------------- the epoch test


class Observation(IntEnum):
    """What one checked inference contributes to its executor's epoch test."""

    CLEAN = 0
    SUSPICIOUS = 1
    FAILED = 2


def inference_observation(dispute: DisputeOutcome | None,
                          passes: Sequence[tuple[int, bool]]) -> Observation | None:
    """One observation per checked inference. ``passes``: (weight, suspicious) of each passing
    check that was its validator's duty (``end_of_block.tally_epoch``: a pass carries no proof
    of duty, so only the reveal can make it evidence). A decided dispute decides: invalid is a failure, valid is clean (a false accusation
    costs the executor nothing). Otherwise (no dispute, or an UNDECIDED one, which proves
    nothing either way) the inference is suspicious when checkers holding a weighted majority
    of the passes say so. None when nobody passed it."""
    if dispute is DisputeOutcome.INVALID:
        return Observation.FAILED
    if dispute is DisputeOutcome.VALID:
        return Observation.CLEAN
    if not passes:
        return None
    suspicious = sum(w for w, s in passes if s)
    return Observation.SUSPICIOUS if 2 * suspicious > sum(w for w, _ in passes) else Observation.CLEAN


def wald_step_micro(llr: int, hit: bool, hit_llr: int, miss_llr: int, params: Params) -> tuple[int, bool]:
    """One step of one Bernoulli Wald test, in micro-nats: (new llr, accused).

    A hit adds ``hit_llr`` = log P(hit | cheating) / P(hit | honest), a miss subtracts
    ``miss_llr``. Reaching the lower bound accepts "honest" and restarts from 0, so good
    behaviour early in an epoch buys no credit for later; reaching the upper bound
    accuses, final for the epoch."""
    return wald_add_micro(llr, hit_llr if hit else -miss_llr, params)


def wald_add_micro(llr: int, step: int, params: Params) -> tuple[int, bool]:
    """One step of any Wald run in micro-nats: add ``step``, then accuse at the cheating bound
    or restart from 0 at the honest one: (new llr, accused)."""
    llr += step
    if llr >= params.sprt_cheating_bound_micro:
        return llr, True
    if llr <= -params.sprt_honest_bound_micro:
        return 0, False
    return llr, False


# --------------------------------------------------------------------------- settlement


def miss_rate_exceeded(missed: int, completed: int, params: Params) -> bool:
    """Did more than ``miss_rate_limit_ppm`` of the executor's inferences expire in its hands?"""
    assert missed >= 0 and completed >= 0
    return missed * PPM > params.miss_rate_limit_ppm * (missed + completed)


def reputation_after_epoch(reputation_ppm: int, *, caught: bool, missed_too_many: bool,
                           overturned: bool, clean: bool, params: Params) -> int:
    """Proven cheating, too many misses, or an accusation a committee overturned: 0. A clean
    epoch (work done, checked, nothing wrong): +1/N, rounded up so that exactly N clean epochs reach 1, capped at 1. Otherwise
    (no checked work): unchanged."""
    assert 0 <= reputation_ppm <= PPM
    if caught or missed_too_many or overturned:
        return 0
    if clean:
        return min(PPM, reputation_ppm + -(-PPM // params.reputation_growth_epochs))
    return reputation_ppm


class Forfeit(StrEnum):
    """Why a participant's epoch reward was not minted (stable strings, in this order)."""

    CAUGHT = "caught"  # its work was proven invalid (dispute) or failed the epoch test
    SKIPPED_DUTIES = "skipped_duties"  # its revealed seed shows checks it never submitted
    MISSED_VOTES = "missed_votes"  # drawn onto a dispute committee, it did not vote
    NO_REVEAL = "no_reveal"  # it committed a seed but never revealed it
    NO_COMMIT = "no_commit"  # it held weight but committed no seed: it validated nothing
    VOUCHED_INVALID = "vouched_invalid"  # it passed work that a dispute proved invalid
    OVERTURNED = "overturned"  # it failed work that a dispute found valid
    UNCONFIRMED = "unconfirmed"  # proof of compute's confirmation round did not find its hardware


def forfeit_reasons(*, in_validator_set: bool, committed: bool, revealed: bool, skipped: int,
                    missed_votes: int, caught: bool, vouched_invalid: int = 0,
                    overturned: int = 0, unconfirmed: bool = False) -> tuple[Forfeit, ...]:
    """Every reason this participant loses its epoch reward (empty: it is paid).

    ``vouched_invalid``: its checks that passed work a dispute then proved invalid. A
    validator that rubber-stamps a partner's cheating saves the compute of a check;
    losing its epoch reward when an honest check and the committee expose the cheat
    makes that a losing bet. An honest validator re-running the pinned model passes
    invalid work only on a numeric near-tie, which the calibrated margins make rare.

    ``overturned``: its failed checks of work a committee found valid. Symmetrically, an
    accusation of honest work forfeits the accuser's whole epoch reward (and its reputation,
    :func:`reputation_after_epoch`), while convicting honest work needs a committee majority
    a coalition below 1/3 draws with probability <= 2.1e-8: framing never pays in expectation."""
    reasons = []
    if caught:
        reasons.append(Forfeit.CAUGHT)
    if skipped:
        reasons.append(Forfeit.SKIPPED_DUTIES)
    if missed_votes:
        reasons.append(Forfeit.MISSED_VOTES)
    if in_validator_set and committed and not revealed:
        reasons.append(Forfeit.NO_REVEAL)
    if in_validator_set and not committed:
        reasons.append(Forfeit.NO_COMMIT)
    if vouched_invalid:
        reasons.append(Forfeit.VOUCHED_INVALID)
    if overturned:
        reasons.append(Forfeit.OVERTURNED)
    if unconfirmed:
        reasons.append(Forfeit.UNCONFIRMED)
    return tuple(reasons)


def epoch_reward_pools(epoch: int, params: Params) -> tuple[int, int]:
    """(executor pool, validator pool) of an epoch's reward. Epoch 0, the bootstrap epoch, has
    none: its validators are whoever the genesis file gave a seed commitment, perhaps nobody."""
    if epoch == 0:
        return 0, 0
    validators = params.epoch_reward * params.validator_share_ppm // PPM
    return params.epoch_reward - validators, validators


def shift_budget(total: int, shift_ppm: int) -> int:
    """The weight one settlement or round may move: ``shift_ppm`` of ``total``, rounded up so
    that a small network still moves (``disputes.weight_cuts``, ``poc.declined_targets``)."""
    return -(-total * shift_ppm // PPM)


def pro_rata(pool: int, scores: Mapping[str, int]) -> dict[str, int]:
    """Split ``pool`` in proportion to ``scores``, each share rounded down (the dust is never
    minted). Executors score the billable tokens they executed, capped at their weight's fair
    share (:func:`fair_share_scores`; weight enters through the weighted executor draw and the
    cap: scoring weight x tokens would pay weight squared); validators, the tokens they checked."""
    assert pool >= 0 and all(s >= 0 for s in scores.values())
    total = sum(scores.values())
    if total == 0:
        return {}
    return {peer: pool * score // total for peer, score in sorted(scores.items()) if score}


def fair_share_scores(work: Mapping[str, int], weights: Mapping[str, int]) -> dict[str, int]:
    """Each executor's ``work``, capped at its weight's fair share: ``min(work_i, w_i * M)``
    rounded down, where M is the weight-weighted median of work_j / w_j over ``weights`` (the
    epoch's executors, those that did nothing included): the smallest ratio such that the
    executors at or below it hold more than half of the weight. Work by a peer outside
    ``weights`` scores 0. Integers throughout (the ratios are compared exactly).

    Why. Executors are drawn by weight, so honest work is about w_i x (total / W): every honest
    executor's ratio is about the same. A client that is also a TA can grind its nonces until
    the draw lands on a partner holding weight (``choose_executor``) and so raise that
    partner's work -- and with it its share of the executor reward -- as far as it is willing
    to pay itself fees. That raises only the partner's ratio. A coalition holding c < 1/2 of
    the weight, whatever ratios it shows, leaves M between two of the honest executors'
    weighted quantiles ((1/2 - c) / (1 - c) and 1 / (2 (1 - c))): put all its weight above,
    and the honest weight still passes half at an honest ratio; below, and it cannot pass
    half alone. So its self-dealt volume earns nothing beyond w_i x M, the share of an
    honest executor of its weight at the median; what is left is the draw's variance (its
    honest work may fall short of w_i x M), not the volume. The price: an honest executor
    luckier than the median loses its excess (the pool is still split in full, pro rata),
    and an epoch in which more than half of the executors' weight did no work at all has
    M = 0 and mints no executor reward (its fees are still paid)."""
    assert all(w >= 0 for w in weights.values()) and all(x >= 0 for x in work.values())
    ranked = sorted((Fraction(work.get(peer, 0), weight), peer) for peer, weight in weights.items() if weight > 0)
    total, below = sum(weights[peer] for _, peer in ranked), 0
    median = Fraction(0)
    for ratio, peer in ranked:
        below += weights[peer]
        if 2 * below > total:
            median = ratio
            break
    return {peer: min(amount, weights.get(peer, 0) * median.numerator // median.denominator)
            for peer, amount in work.items()}


def floor_traffic(settled: Mapping[str, int], weights: Mapping[str, int]) -> int:
    """The traffic that sets the next epoch's validation floor (:func:`validation_floor_ppm`):
    the inferences each executor settled in the epoch, capped as :func:`fair_share_scores`
    caps the reward, then summed. The floor falls as traffic grows (a busy network checks a
    smaller share of its work), so a self-dealer who grinds its nonces onto its own weighted
    executor could otherwise buy a lower floor for everyone with fees it pays itself; capped,
    its volume beyond its weight's median share counts for nothing, and a coalition below
    half of the weight cannot move the median."""
    return sum(fair_share_scores(settled, weights).values())
