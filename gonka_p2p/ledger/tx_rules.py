"""The transaction rules: one function per transaction kind, and the dispute's resolution.

Each ``process_*`` rule takes the state, the :class:`BlockContext`, the opened
envelope and its signer. It first checks everything and raises
:class:`TxRejected` before touching anything; only then, and only when
``apply`` is true (in a block, not in mempool admission), does it change the
state, through the state's public tables and methods. It returns the
receipt's detail. The kinds are declared once, in ``transactions.TX_KINDS``;
each rule registers itself for its kind in :data:`RULES` (:func:`rule_for`),
through which ``state.apply_block`` and ``state.check_tx`` dispatch, and an
import-time assertion checks that every kind has exactly one rule.

Transitions, by transaction kind (signer = envelope signer = acting account;
every kind also needs the right ``chain_id``, a known signer account and its
exact next ``sequence``, and bumps that sequence when accepted)::

    Transfer(to, amount)           balance[signer] -= amount; balance[to] += amount
    RegisterParticipant(addrs,     participant[signer] = (pubkey, weight from genesis
                        models)        or 0, addrs, models)
    StartInference(request, ex)    signer a participant, client's envelope valid, for this
                                   chain and fresh, id = inference_id(request) (chain,
                                   client, nonce) never seen, attempt < max, ex =
                                   choose_executor(executor_weights(model), {signer},
                                   id, attempt), escrow <= balance[client]:
                                   balance[client] -= escrow; inference[id] = STARTED;
                                   settles at once if ex's Finish is held
    FinishInference(id, counts)    STARTED and signer == executor: SETTLED, cost =
                                   min(tokens * price, escrow) to pending fees[executor],
                                   escrow - cost back to the client; p = p_validate(r, m)
                                   fixed on the record; no such inference yet: held
                                   (bounded per executor) until its Start, if signer is
                                   in a draw table a Start may still use
    CommitValidationSeed(e, c)     during epoch e-1, signer has weight: commitment[e, signer] = c
    RevealValidationSeed(e, seed)  after epoch e ends, before it settles, H(e, signer, seed)
                                   == commitment: seed stored, duties recomputed and counted
    Validation(id, verdict, seed)  id SETTLED in epoch e, window open, signer committed for e,
                                   not its executor nor TA, not yet revealed: check[id, signer];
                                   a failed verdict must carry the seed that opens the signer's
                                   commitment and gives it the duty on id (a pass carries none);
                                   it opens dispute[id], whose committee is drawn later
    DisputeVote(id, verdict)       signer on the current committee of open dispute[id]:
                                   vote[id, signer]; a majority of all seats resolves it
    SubmitEvidence(offender, two   anyone: both votes signed by offender, one (height, round,
                   votes)              type), two blocks, offender weighted in that epoch, not
                                   older than evidence_max_age_blocks, not yet punished:
                                   reputation 0 now; weight and reward lost at settlement

A dispute's rounds (``rules`` module docstring, "Verification economics" 4) are
driven by :func:`advance_dispute` at the end of the blocks its ``deadline`` names.

Who sends what: a TA submits ``StartInference`` as soon as it has routed the
request, the executor ``FinishInference`` when done -- in either order. A
validator (every participant with weight), each epoch e:

1. during epoch e-1: ``seed = derive_validation_seed(key.secret, chain_id, e)``,
   submit ``CommitValidationSeed(epoch=e, commitment=seed_commitment(e, me, seed))``;
2. during epoch e, for each inference that settles (and any it missed):
   ``state.is_validation_duty(iid, me, seed)``; if so fetch the artifacts,
   verify, submit ``Validation(inference_id, verdict_stats(verdict), seed if failed else b"")`` before
   ``rules.validation_deadline(e)`` (``state.validation_duties(e, me, seed)``
   lists them all);
3. whenever ``state.open_disputes_for(me)`` names a dispute: verify and submit
   ``DisputeVote(inference_id, verdict)`` before the deadline;
4. after epoch e ends (``rules.seed_reveal_open``): submit
   ``RevealValidationSeed(epoch=e, seed)`` -- the claim; checks after it are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from gonka_p2p.identity import peer_id_from_pubkey, verify_signature
from gonka_p2p.ledger.block import BlockContext
from gonka_p2p.ledger.executor_draw import draw_epochs, drawable_executors, is_drawn
from gonka_p2p.ledger.duties import duty_point
from gonka_p2p.ledger.disputes import (dispute_deadline, dispute_draw_height, dispute_outcome, draw_committee,
                                       seat_committee)
from gonka_p2p.ledger.consensus_types import vote_sign_bytes
from gonka_p2p.ledger.genesis import MAX_ADDR_LEN
from gonka_p2p.ledger.poc_rounds import may_commit_seed
from gonka_p2p.ledger.records import (
    Check,
    Dispute,
    HeldFinish,
    Inference,
    InferenceStatus,
    Participant,
    Payout,
    SeedCommitment,
)
from gonka_p2p.ledger.rules import (
    SEED_BYTES,
    DisputeOutcome,
    epoch_of,
    escrow_for,
    held_finish_deadline,
    held_finish_share,
    inference_cost,
    inference_deadline,
    is_account_address,
    prompt_token_bound,
    replay_memory_until,
    request_is_fresh,
    seed_commit_open,
    seed_commitment,
    seed_reveal_open,
    validation_deadline,
    validation_ppm,
    verdict_is_consistent,
)
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    FinishInference,
    Reason,
    RegisterParticipant,
    RevealValidationSeed,
    StartInference,
    SubmitEvidence,
    Transfer,
    TxRejected,
    Validation,
    VerdictStats,
)
from gonka_p2p.wire.envelope import Signed, open_envelope
from gonka_p2p.wire.messages import HASH_BYTES, InferenceRequest, inference_id
from gonka_p2p.wire.schema import Message, WireError

if TYPE_CHECKING:
    from gonka_p2p.ledger.state import LedgerState

peer_id_of = lru_cache(maxsize=1 << 16)(peer_id_from_pubkey)
RULES: dict[type[Message], Callable[..., str]] = {}  # transaction kind -> its rule


def rule_for(kind: type[Message]) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Register the decorated function as the rule of transaction ``kind`` (one rule per kind)."""
    def register(rule: Callable[..., str]) -> Callable[..., str]:
        assert kind not in RULES, f"{kind.KIND} has two rules"
        RULES[kind] = rule
        return rule
    return register


@rule_for(Transfer)
def process_transfer(state: LedgerState, ctx: BlockContext, signed: Signed[Transfer],
                     signer: str, apply: bool) -> str:
    """Move coins between accounts; the recipient must be a key's address, the sender must cover it."""
    tx = signed.message
    if not is_account_address(tx.to):
        raise TxRejected(Reason.INVALID_ADDRESS, f"{tx.to!r} is not a secp256k1 peer id")
    balance = state.balance(signer)
    if tx.amount + state.params.tx_fee > balance:  # the signer pays the fee too (Payer.SIGNER)
        raise TxRejected(Reason.INSUFFICIENT_BALANCE,
                         f"transfer of {tx.amount} and fee {state.params.tx_fee}, balance {balance}")
    if apply:
        state.debit(signer, tx.amount)
        state.credit(tx.to, tx.amount)
    return f"{tx.amount} to {tx.to}"


@rule_for(RegisterParticipant)
def process_register_participant(state: LedgerState, ctx: BlockContext,
                                 signed: Signed[RegisterParticipant], signer: str,
                                 apply: bool) -> str:
    """Join (or update addrs/models): any funded account may; weight stays as genesis gave it."""
    tx = signed.message
    for addr in tx.addrs:
        if not 0 < len(addr) <= MAX_ADDR_LEN:
            raise TxRejected(Reason.MALFORMED, f"addresses must have 1 to {MAX_ADDR_LEN} chars")
    for model in tx.models:
        if model not in state.params.price_per_token:
            raise TxRejected(Reason.UNKNOWN_MODEL, f"{model!r} has no price on this network")
    old = state.registry.get(signer)
    if apply:
        addrs, models = tuple(tx.addrs), tuple(sorted(set(tx.models)))
        state.registry.put(signer, replace(old, addrs=addrs, models=models) if old else Participant(
            pubkey=signed.signer, weight=0, addrs=addrs, models=models, completed=0, missed=0))
    return "updated" if old else "registered"


@rule_for(StartInference)
def process_start_inference(state: LedgerState, ctx: BlockContext,
                            signed: Signed[StartInference], signer: str, apply: bool) -> str:
    """The TA locks the client's escrow for a client-signed request, executed by the draw.

    The executor must be ``choose_executor(executor_weights, {TA}, inference id, attempt)``
    with ``attempt < max_executor_attempts``: the ledger recomputes the weighted draw, so a
    TA can name neither itself, nor a zero-weight identity, nor a partner the draw did not
    pick. Self-dealing (one party as client, TA and executor) therefore pays its fees to
    executors drawn by weight -- to others, unless the attacker holds weight -- and every
    inference that counts towards the next epoch's traffic (and so lowers its validation
    floor) is paid work given to the draw. What a greedy TA can still do is choose among
    the first ``max_executor_attempts`` draws (see ``rules.choose_executor``)."""
    tx = signed.message
    if signer not in state.registry:
        raise TxRejected(Reason.NOT_A_PARTICIPANT, "only a registered participant can act as TA")
    try:
        request: Signed[InferenceRequest] = open_envelope(tx.request, InferenceRequest)
    except WireError as e:
        raise TxRejected(Reason.BAD_CLIENT_REQUEST, f"{e.code}: {e}") from None
    req = request.message
    if req.chain_id != state.chain_id:
        raise TxRejected(Reason.REQUEST_WRONG_CHAIN, f"the client signed the request for {req.chain_id!r}")
    price = state.params.price_per_token.get(req.model)
    if price is None:
        raise TxRejected(Reason.UNKNOWN_MODEL, f"{req.model!r} has no price on this network")
    window = state.params.request_window_ms
    if not request_is_fresh(req.timestamp_ms, ctx.time_ms, window):
        raise TxRejected(Reason.STALE_REQUEST, f"request time {req.timestamp_ms} is more than "
                                               f"{window} ms from block time {ctx.time_ms}")
    iid = inference_id(request)
    if request_seen(state, iid):
        raise TxRejected(Reason.DUPLICATE_INFERENCE, f"inference {iid.hex()} was already started")
    if tx.executor == signer:
        raise TxRejected(Reason.SELF_EXECUTION, "a TA may not execute its own requests")
    if tx.attempt >= state.params.max_executor_attempts:
        raise TxRejected(Reason.ATTEMPT_OUT_OF_RANGE, f"attempt {tx.attempt}; a TA draws at most "
                                                      f"{state.params.max_executor_attempts} times")
    tables = state.executor_tables
    if all(tx.executor not in tables.table(state, req.model, e) for e in draw_epochs(state, ctx.height)):
        raise TxRejected(Reason.EXECUTOR_NOT_ELIGIBLE, f"{tx.executor!r} is not a participant with weight "
                                                       f"serving {req.model}")
    if not is_drawn(state, req.model, signer, iid, tx.attempt, tx.executor, ctx.height):
        raise TxRejected(Reason.EXECUTOR_NOT_DRAWN, f"attempt {tx.attempt} of the weighted draw for "
                                                    f"{req.model} does not give {iid.hex()} to {tx.executor}")
    client = peer_id_of(request.signer)
    account = state.accounts.get(client)
    if account is None:
        raise TxRejected(Reason.UNKNOWN_CLIENT, f"client {client} has no account")
    prompt_bound = prompt_token_bound(req, state.params)
    escrow = escrow_for(prompt_bound, req.max_tokens, price)
    fee = state.params.tx_fee  # the client pays it, with its escrow (Payer.CLIENT)
    if escrow + fee > account.balance:
        raise TxRejected(Reason.INSUFFICIENT_BALANCE,
                         f"escrow {escrow} and fee {fee} exceed the client's balance {account.balance}")
    if not apply:
        return f"would escrow {escrow}"
    state.debit(client, escrow)
    state.burn(client, fee)
    record = Inference(client=client, ta=signer, executor=tx.executor, model=req.model,
                       price=price, max_tokens=req.max_tokens, prompt_bound=prompt_bound,
                       escrow=escrow, request_ms=req.timestamp_ms, start_height=ctx.height,
                       deadline=inference_deadline(ctx.height, state.params),
                       status=InferenceStatus.STARTED, attempt=tx.attempt)
    state.inferences.put(iid, record)
    state.remember_request(iid, replay_memory_until(req.timestamp_ms, window))
    held = state.release_held(iid).get(tx.executor)
    if held is not None:
        if held.completion_tokens > req.max_tokens:
            state.schedule_expiry(iid, record.deadline)
            return f"inference {iid.hex()} started; its held Finish claimed too many tokens"
        settle_inference(state, ctx, iid, record, held.prompt_tokens, held.completion_tokens,
                         held.response_hash, held.artifact_commitment)
        return f"inference {iid.hex()} started and settled with its held Finish"
    state.schedule_expiry(iid, record.deadline)
    return f"inference {iid.hex()} started, escrow {escrow}"


def request_seen(state: LedgerState, iid: bytes) -> bool:
    """Whether the inference ``iid`` was started: it is on record, or its request is still
    remembered (:func:`replay_memory_until`) -- either way it never starts again. TAs and
    executors ask it too, so that no replay outlives a restart."""
    return iid in state.inferences or iid in state.seen


@rule_for(FinishInference)
def process_finish_inference(state: LedgerState, ctx: BlockContext,
                             signed: Signed[FinishInference], signer: str, apply: bool) -> str:
    """The named executor reports its counts: settle now, or hold until the Start commits."""
    tx = signed.message
    if (len(tx.inference_id), len(tx.response_hash), len(tx.artifact_commitment)) != (HASH_BYTES,) * 3:
        raise TxRejected(Reason.MALFORMED, f"inference id and hashes must be {HASH_BYTES} bytes")
    if signer not in state.registry:
        raise TxRejected(Reason.NOT_A_PARTICIPANT, "only a registered participant executes")
    iid = tx.inference_id
    record = state.inferences.get(iid)
    if record is None:
        return _hold_finish(state, ctx, tx, signer, apply)
    if record.executor != signer:
        raise TxRejected(Reason.WRONG_EXECUTOR, f"inference {iid.hex()} was given to {record.executor}")
    if record.status is not InferenceStatus.STARTED:
        raise TxRejected(Reason.INFERENCE_CLOSED, f"inference {iid.hex()} is {record.status}")
    if tx.completion_tokens > record.max_tokens:
        raise TxRejected(Reason.TOKENS_EXCEED_REQUEST,
                         f"{tx.completion_tokens} completion tokens, max_tokens {record.max_tokens}")
    if apply:
        settle_inference(state, ctx, iid, record, tx.prompt_tokens, tx.completion_tokens,
                         tx.response_hash, tx.artifact_commitment)
    return f"inference {iid.hex()} settled"


def _hold_finish(state: LedgerState, ctx: BlockContext, tx: FinishInference, signer: str,
                 apply: bool) -> str:
    """A Finish that outran its Start waits, bounded per executor and in total -- if a Start can
    still name its signer. Finishes are free, and anyone may register: a zero-weight identity's
    Finish could never settle, and holding it would let Sybils fill the holding area (and, since
    the mempool admits with this rule, the mempool) for nothing."""
    iid = tx.inference_id
    if iid in state.seen:
        raise TxRejected(Reason.INFERENCE_CLOSED, f"inference {iid.hex()} closed and was pruned")
    if (iid, signer) in state.held:
        raise TxRejected(Reason.DUPLICATE_FINISH, f"a Finish for {iid.hex()} is already held")
    executors = drawable_executors(state, ctx.height)
    if signer not in executors:
        raise TxRejected(Reason.EXECUTOR_NOT_ELIGIBLE, f"no Start can name {signer} as executor now: "
                                                       f"its Finish for {iid.hex()} is not held")
    p = state.params
    if len(state.held) >= p.max_held_finishes or state.held_count(signer) >= held_finish_share(len(executors), p):
        raise TxRejected(Reason.HOLDING_AREA_FULL, "too many Finishes wait for their Start")
    if apply:
        state.hold_finish((iid, signer), HeldFinish(
            tx.prompt_tokens, tx.completion_tokens, tx.response_hash, tx.artifact_commitment,
            held_finish_deadline(ctx.height, state.params)))
    return f"held until the StartInference of {iid.hex()} commits"


def settle_inference(state: LedgerState, ctx: BlockContext, iid: bytes, record: Inference,
                     prompt_tokens: int, completion_tokens: int, response_hash: bytes,
                     artifact_commitment: bytes) -> None:
    """Charge the work (capped at escrow) to the executor's pending fees; refund the rest; fix
    the probability p that it is checked from the executor's reputation and the epoch's floor."""
    cost = inference_cost(prompt_tokens, completion_tokens, record.price, record.escrow)
    if record.escrow > cost:
        state.credit(record.client, record.escrow - cost)
    if cost:
        state.fees.put(record.executor, state.pending_fees(record.executor) + cost)
    epoch = epoch_of(ctx.height, state.params)
    info = state.epochs.rows[epoch]
    executor = state.registry.rows[record.executor]
    state.close_inference(iid, replace(
        record, status=InferenceStatus.SETTLED, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, response_hash=response_hash,
        artifact_commitment=artifact_commitment, cost=cost, closed_height=ctx.height,
        validation_ppm=validation_ppm(executor.reputation_ppm, info.floor_ppm, state.params),
        payout=Payout.PENDING, duty_point=duty_point(ctx.block_hash, iid)))
    state.registry.put(record.executor, replace(executor, completed=executor.completed + 1))


@rule_for(CommitValidationSeed)
def process_commit_seed(state: LedgerState, ctx: BlockContext,
                        signed: Signed[CommitValidationSeed], signer: str, apply: bool) -> str:
    """A participant with weight (or with compute committed in e-1's proof-of-compute round:
    ``poc_rounds.may_commit_seed``) commits, during epoch e-1, to its secret seed for epoch e."""
    tx = signed.message
    if len(tx.commitment) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"a seed commitment is {HASH_BYTES} bytes")
    if not may_commit_seed(state, tx.epoch, signer):
        raise TxRejected(Reason.NOT_A_VALIDATOR, "only a participant with weight (or proving compute) validates")
    if not seed_commit_open(tx.epoch, ctx.height, state.params):
        raise TxRejected(Reason.WRONG_EPOCH, f"seeds for epoch {tx.epoch} are committed during epoch "
                                             f"{tx.epoch - 1}; this is epoch "
                                             f"{epoch_of(ctx.height, state.params)}")
    if (tx.epoch, signer) in state.commitments:
        raise TxRejected(Reason.ALREADY_COMMITTED, f"a seed for epoch {tx.epoch} is already committed")
    if apply:
        state.add_commitment(tx.epoch, signer, SeedCommitment(tx.commitment, ctx.height))
    return f"seed for epoch {tx.epoch} committed"


@rule_for(RevealValidationSeed)
def process_reveal_seed(state: LedgerState, ctx: BlockContext,
                        signed: Signed[RevealValidationSeed], signer: str, apply: bool) -> str:
    """The claim: the seed opens its commitment, and its duties over the epoch are counted."""
    tx = signed.message
    if len(tx.seed) != SEED_BYTES:
        raise TxRejected(Reason.MALFORMED, f"a validation seed is {SEED_BYTES} bytes")
    commitment = state.commitments.get((tx.epoch, signer))
    if commitment is None:
        raise TxRejected(Reason.NO_COMMITMENT, f"no seed was committed for epoch {tx.epoch}")
    if commitment.revealed:
        raise TxRejected(Reason.ALREADY_REVEALED, f"the seed for epoch {tx.epoch} is already revealed")
    if not seed_reveal_open(tx.epoch, ctx.height, state.params):
        raise TxRejected(Reason.WRONG_EPOCH, f"the seed for epoch {tx.epoch} is revealed after it "
                                             "ends and before it settles")
    if seed_commitment(tx.epoch, signer, tx.seed) != commitment.commitment:
        raise TxRejected(Reason.SEED_MISMATCH, "the seed does not open the commitment")
    if not apply:
        return "would reveal"
    duties = state.validation_duties(tx.epoch, signer, tx.seed)
    done = sum((iid, signer) in state.checks or (iid, signer) in state.votes for iid in duties)
    state.commitments.put((tx.epoch, signer), replace(
        commitment, seed=tx.seed, revealed_height=ctx.height, duties=len(duties), done=done))
    return f"epoch {tx.epoch}: {len(duties)} duties, {done} done, {len(duties) - done} skipped"


def _inference_to_check(state: LedgerState, ctx: BlockContext, iid: bytes) -> Inference:
    if len(iid) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"an inference id is {HASH_BYTES} bytes")
    record = state.inferences.get(iid)
    if record is None:
        raise TxRejected(Reason.UNKNOWN_INFERENCE, f"no inference {iid.hex()} (never, or pruned)")
    if record.status is not InferenceStatus.SETTLED:
        raise TxRejected(Reason.NOT_VALIDATABLE, f"inference {iid.hex()} is {record.status}, not settled")
    return record


def _verdict_checked(verdict: VerdictStats) -> None:
    if not verdict_is_consistent(verdict.valid, verdict.suspicious, verdict.failure_flags):
        raise TxRejected(Reason.INCONSISTENT_VERDICT, "a valid verdict names no failure; a failed "
                                                      "one names one and is not 'suspicious'")


@rule_for(Validation)
def process_validation(state: LedgerState, ctx: BlockContext, signed: Signed[Validation],
                       signer: str, apply: bool) -> str:
    """A committed validator records its verdict on a settled inference; a failure, which must
    prove the duty, opens a dispute."""
    tx = signed.message
    _verdict_checked(tx.verdict)
    record = _inference_to_check(state, ctx, tx.inference_id)
    iid, epoch = tx.inference_id, state.inference_epoch(record)
    if ctx.height > validation_deadline(epoch, state.params):
        raise TxRejected(Reason.VALIDATION_CLOSED, f"checks of epoch {epoch} closed at height "
                                                   f"{validation_deadline(epoch, state.params)}")
    if signer in (record.executor, record.ta):
        raise TxRejected(Reason.CONFLICT_OF_INTEREST, "a validator never checks work it executed or routed")
    commitment = state.commitments.get((epoch, signer))
    if commitment is None or signer not in state.eligible(epoch).weights:
        raise TxRejected(Reason.NOT_A_VALIDATOR, f"not a committed validator of epoch {epoch}")
    if commitment.revealed:
        raise TxRejected(Reason.ALREADY_CLAIMED, f"its seed for epoch {epoch} is revealed: duties closed")
    if (iid, signer) in state.checks:
        raise TxRejected(Reason.DUPLICATE_VALIDATION, f"it already checked {iid.hex()}")
    if tx.verdict.valid and tx.seed:
        raise TxRejected(Reason.MALFORMED, "a passing check carries no seed (its duty counts at the reveal)")
    if not tx.verdict.valid:
        _duty_proven(state, iid, epoch, signer, commitment, tx.seed)
    if not apply:
        return "would record the check"
    state.add_check(iid, signer, Check.of(tx.verdict, ctx.height))
    if tx.verdict.valid:
        return f"{iid.hex()} checked: valid"
    if iid in state.disputes:
        return f"{iid.hex()} checked: invalid (already disputed)"
    draw = dispute_draw_height(ctx.height, state.params)
    state.open_dispute(iid, Dispute(epoch=epoch, executor=record.executor, ta=record.ta, accuser=signer,
                                    opened_height=ctx.height, draw_height=draw, deadline=draw))
    return f"{iid.hex()} checked: invalid; dispute opened, its committee is drawn at the end of height {draw}"


def _duty_proven(state: LedgerState, iid: bytes, epoch: int, signer: str, commitment: SeedCommitment,
                 seed: bytes) -> None:
    """Only a duty can fail work: the seed must open the signer's commitment for the epoch
    (fixed before the epoch's inferences existed) and must make ``iid`` its duty."""
    if len(seed) != SEED_BYTES or seed_commitment(epoch, signer, seed) != commitment.commitment:
        raise TxRejected(Reason.SEED_MISMATCH, "a failing check carries the seed its commitment opens")
    if not state.is_validation_duty(iid, signer, seed):
        raise TxRejected(Reason.NOT_A_DUTY, f"its seed gives it no duty on {iid.hex()}: it cannot fail it")


@rule_for(DisputeVote)
def process_dispute_vote(state: LedgerState, ctx: BlockContext, signed: Signed[DisputeVote],
                         signer: str, apply: bool) -> str:
    """A committee member's re-check of a disputed inference; a majority of all seats resolves it."""
    tx = signed.message
    _verdict_checked(tx.verdict)
    if len(tx.inference_id) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"an inference id is {HASH_BYTES} bytes")
    iid = tx.inference_id
    dispute = state.disputes.get(iid)
    if dispute is None:
        raise TxRejected(Reason.NO_DISPUTE, f"inference {iid.hex()} is not disputed")
    if dispute.outcome is not DisputeOutcome.OPEN:
        raise TxRejected(Reason.VOTING_CLOSED, f"the dispute on {iid.hex()} is {dispute.outcome}")
    if signer not in dispute.committee:
        raise TxRejected(Reason.NOT_ON_COMMITTEE, f"not on the current committee of {iid.hex()}")
    if (iid, signer) in state.votes:
        raise TxRejected(Reason.DUPLICATE_VOTE, f"it already voted on {iid.hex()}")
    if apply:
        state.votes.put((iid, signer), Check.of(tx.verdict, ctx.height))
        _resolve_if_decided(state, ctx, iid)
    return f"vote on {iid.hex()}: {'valid' if tx.verdict.valid else 'invalid'}"


def advance_dispute(state: LedgerState, ctx: BlockContext, iid: bytes) -> None:
    """The step an open dispute takes at the end of its ``deadline`` height: draw the round's
    committee, or close a round that ended undecided (a fresh round, or UNDECIDED after the last).

    Seats are drawn over the epoch's whole validator set, from this block's hash, and seated by
    ``disputes.seat_committee``: the executor's and the sanctioned are recused (they still
    count in the total a conviction needs a strict majority of), the accuser's count as its
    "invalid" vote. A member's vote from an earlier round counts again if it is redrawn; a
    member that leaves a round's seats empty is missed."""
    dispute = state.disputes.rows[iid]
    assert dispute.outcome is DisputeOutcome.OPEN and dispute.deadline == ctx.height
    p = state.params
    if not dispute.voting:
        drawn = draw_committee(state.epoch_validators(dispute.epoch), ctx.block_hash, iid, dispute.rounds - 1,
                               p.dispute_committee_size)
        seated = seat_committee(drawn, dispute.executor, dispute.accuser,
                                {peer for peer, _ in drawn if state.registry.rows[peer].sanctioned})
        committee = tuple(peer for peer, _ in seated.voters)
        state.open_dispute(iid, replace(
            dispute, committee=committee, seats=tuple(seats for _, seats in seated.voters),
            accuser_seats=seated.accuser_seats, members=tuple(sorted(set(dispute.members) | set(committee))),
            deadline=dispute_deadline(ctx.height - p.dispute_draw_delay_blocks, p)))
        _resolve_if_decided(state, ctx, iid)
        return
    silent = tuple(sorted(dispute.silent + tuple(member for member in dispute.committee
                                                 if (iid, member) not in state.votes)))
    if dispute.rounds < p.dispute_max_rounds:
        draw = dispute_draw_height(ctx.height, p)
        state.open_dispute(iid, replace(dispute, rounds=dispute.rounds + 1, committee=(), seats=(),
                                        accuser_seats=0, silent=silent, draw_height=draw, deadline=draw))
        return
    invalid, valid = _seats_voted(state, iid)
    _resolve(state, ctx, iid, replace(dispute, silent=silent), DisputeOutcome.UNDECIDED, invalid, valid)


def _seats_voted(state: LedgerState, iid: bytes) -> tuple[int, int]:
    """(seats voting invalid, seats voting valid) on the current committee, the accuser's
    seats among the invalid (its failing Validation is its vote)."""
    dispute = state.disputes.rows[iid]
    invalid, valid = dispute.accuser_seats, 0
    for member, seats in zip(dispute.committee, dispute.seats, strict=True):
        vote = state.votes.get((iid, member))
        if vote is not None:
            if vote.valid:
                valid += seats
            else:
                invalid += seats
    return invalid, valid


def _resolve_if_decided(state: LedgerState, ctx: BlockContext, iid: bytes) -> None:
    invalid, valid = _seats_voted(state, iid)
    outcome = dispute_outcome(invalid, valid, state.params.dispute_committee_size)
    if outcome is not DisputeOutcome.UNDECIDED:
        _resolve(state, ctx, iid, state.disputes.rows[iid], outcome, invalid, valid)


def _resolve(state: LedgerState, ctx: BlockContext, iid: bytes, dispute: Dispute, outcome: DisputeOutcome,
             invalid: int, valid: int) -> None:
    """Record the outcome. Proven invalid work sanctions its executor at once: transfer agents
    stop drawing it and committees recuse its seats, and its reputation drops to 0 (so what it
    still settles is checked). Its weight -- voting power -- falls only at settlement, bounded
    (``rules.weight_cuts``); its fees and reward are judged there, with the rest of its epoch."""
    state.disputes.put(iid, replace(dispute, outcome=outcome, invalid_seats=invalid, valid_seats=valid,
                                    resolved_height=ctx.height))
    if outcome is DisputeOutcome.INVALID:
        executor = state.registry.rows[dispute.executor]
        state.registry.put(dispute.executor, replace(executor, reputation_ppm=0, sanctioned=True))


@rule_for(SubmitEvidence)
def process_submit_evidence(state: LedgerState, ctx: BlockContext, signed: Signed[SubmitEvidence],
                            signer: str, apply: bool) -> str:
    """Anyone proves that a validator signed two votes for different blocks at one (height, round,
    type): equivocation, the one act that can fork consensus.

    Its reputation resets at once (its work is checked at the floor rate from now on); its weight
    and the epoch's reward go at this epoch's settlement, where it counts as caught: weight and
    voting power change only at settlement, and the reward is only ever minted there. One
    punishment covers every offence up to the epoch it is punished in, so the same or another
    pair of its votes is refused after it (whoever races to submit gains nothing)."""
    tx = signed.message
    hashes = (tx.first_block_hash, tx.second_block_hash)
    if any(len(h) not in (0, HASH_BYTES) for h in hashes):
        raise TxRejected(Reason.MALFORMED, f"a vote's block hash is empty (nil) or {HASH_BYTES} bytes")
    if hashes[0] == hashes[1]:
        raise TxRejected(Reason.NOT_CONFLICTING, "both votes name the same block")
    if not 0 <= ctx.height - tx.height <= state.params.evidence_max_age_blocks:
        raise TxRejected(Reason.EVIDENCE_TOO_OLD, f"votes of height {tx.height} are not evidence at height "
                                                  f"{ctx.height} (at most "
                                                  f"{state.params.evidence_max_age_blocks} blocks old)")
    epoch = epoch_of(tx.height, state.params)
    info = state.epochs.get(epoch)
    offender = state.registry.get(tx.offender)
    if info is None or offender is None or tx.offender not in info.weights:
        raise TxRejected(Reason.NOT_A_VALIDATOR, f"{tx.offender} held no weight in epoch {epoch}")
    for block_hash, time_ms, signature in ((hashes[0], tx.first_time_ms, tx.first_signature),
                                           (hashes[1], tx.second_time_ms, tx.second_signature)):
        message = vote_sign_bytes(state.chain_id, tx.vote_type, tx.height, tx.round, block_hash or None,
                                  time_ms)
        if not verify_signature(offender.pubkey, signature, message):
            raise TxRejected(Reason.BAD_EVIDENCE_SIGNATURE, f"a vote is not signed by {tx.offender}")
    punished = state.equivocations.get(tx.offender)
    if punished is not None and epoch <= punished:
        raise TxRejected(Reason.ALREADY_PUNISHED, f"{tx.offender} is already punished in epoch {punished}")
    if not apply:
        return "would punish"
    now = epoch_of(ctx.height, state.params)
    state.equivocations.put(tx.offender, now)
    state.registry.put(tx.offender, replace(offender, reputation_ppm=0))
    return f"{tx.offender} equivocated at height {tx.height}, round {tx.round}: punished in epoch {now}"

