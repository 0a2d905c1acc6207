"""The proof-of-compute transaction rules, one per kind (the schedule and the reasons: ``poc``).

Transitions (signer = envelope signer; ``round`` = (epoch, kind) must be open and in the
phase named; every kind is protocol-critical, so free, and bounded by one per round,
prover and model)::

    PocCommit(root, count, H(s))   COMPUTE; model priced; count <= poc_max_nonces; first for
                                   (round, signer, model); a key that is no participant joins
                                   here (join stamp, among the round's first
                                   poc_max_newcomers, regular rounds only); a confirmation
                                   needs a commitment for the model in the epoch's regular round
    PocSecret(s)                   SECRET; H(s) opens the commitment
    PocReveal(leaves, proofs)      REVEAL; secret opened; exactly the sampled nonces, each
                                   proof verifying against the committed root and count
    PocVerdict(prover, ok)         VERDICT; signer holds voting power in the epoch, is not the
                                   prover, has not voted on it; the leaves were opened
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from gonka_p2p.ledger.block import BlockContext
from gonka_p2p.ledger.genesis import MAX_ADDR_LEN
from gonka_p2p.ledger.poc import (
    MAX_POC_LEAF_BYTES,
    Phase,
    RoundKind,
    join_stamp_ok,
    phase,
    sample_indices,
    secret_hash,
)
from gonka_p2p.ledger.records import Account, Participant, PocEntry, PocRound
from gonka_p2p.ledger.transactions import (
    TX_KINDS,
    PocCommit,
    PocReveal,
    PocSecret,
    PocVerdict,
    Reason,
    TxRejected,
)
from gonka_p2p.ledger.tx_rules import RULES, rule_for
from gonka_p2p.wire.envelope import Signed
from gonka_p2p.wire.merkle import verify_inclusion
from gonka_p2p.wire.messages import HASH_BYTES

if TYPE_CHECKING:
    from gonka_p2p.ledger.state import LedgerState

EntryKey = tuple[int, int, str, str]  # (epoch, round kind, prover, model)


def _round_in(state: LedgerState, ctx: BlockContext, epoch: int, kind: int, wanted: Phase) -> PocRound:
    if not state.params.poc_enabled:
        raise TxRejected(Reason.NOT_IN_PHASE, "this network has no proof of compute (genesis poc_enabled = 0)")
    record = state.poc_rounds.get((epoch, kind))
    if record is None:
        raise TxRejected(Reason.NOT_IN_PHASE, f"round {RoundKind(kind).name.lower()} of epoch {epoch} is not open")
    now = phase(ctx.height, record.start, RoundKind(kind), state.params)
    if now is not wanted:
        raise TxRejected(Reason.NOT_IN_PHASE, f"round {RoundKind(kind).name.lower()} of epoch {epoch} is in its "
                                              f"{now.name.lower()} phase at height {ctx.height}, not "
                                              f"{wanted.name.lower()}")
    return record


def _entry(state: LedgerState, key: EntryKey) -> PocEntry:
    entry = state.poc_entries.get(key)
    if entry is None:
        raise TxRejected(Reason.NO_COMMITMENT, f"{key[2]} committed nothing for {key[3]!r} in this round")
    return entry


@rule_for(PocCommit)
def process_poc_commit(state: LedgerState, ctx: BlockContext, signed: Signed[PocCommit], signer: str,
                       apply: bool) -> str:
    tx = signed.message
    record = _round_in(state, ctx, tx.epoch, tx.round, Phase.COMPUTE)
    params = state.params
    if tx.model not in params.price_per_token:
        raise TxRejected(Reason.UNKNOWN_MODEL, f"{tx.model!r} has no price on this network")
    if len(tx.root) != HASH_BYTES or len(tx.secret_hash) != HASH_BYTES:
        raise TxRejected(Reason.MALFORMED, f"root and secret hash are {HASH_BYTES} bytes")
    if tx.count > params.poc_max_nonces:
        raise TxRejected(Reason.MALFORMED, f"{tx.count} nonces; a commitment claims at most {params.poc_max_nonces}")
    if any(not 0 < len(addr) <= MAX_ADDR_LEN for addr in tx.addrs):
        raise TxRejected(Reason.MALFORMED, f"addresses must have 1 to {MAX_ADDR_LEN} chars")
    key = (tx.epoch, tx.round, signer, tx.model)
    if key in state.poc_entries:
        raise TxRejected(Reason.ALREADY_COMMITTED, f"{signer} already committed for {tx.model!r} in this round")
    participant = state.registry.get(signer)
    if tx.round == RoundKind.CONFIRMATION:
        if (tx.epoch, RoundKind.REGULAR, signer, tx.model) not in state.poc_entries:
            raise TxRejected(Reason.NOTHING_TO_CONFIRM, f"{signer} committed nothing for {tx.model!r} in epoch "
                                                        f"{tx.epoch}'s regular round")
    elif participant is None:
        if record.newcomers >= params.poc_max_newcomers:
            raise TxRejected(Reason.ROUND_FULL, f"this round took its {params.poc_max_newcomers} newcomers")
        if not join_stamp_ok(state.chain_id, tx.epoch, signed.signer, tx.join_stamp, params.poc_join_pow_bits):
            raise TxRejected(Reason.BAD_JOIN_STAMP, f"a newcomer's join stamp needs {params.poc_join_pow_bits} "
                                                    "leading zero bits (poc.find_join_stamp)")
    if not apply:
        return "would commit"
    if participant is None:
        state.registry.put(signer, Participant(pubkey=signed.signer, weight=0, addrs=tuple(tx.addrs),
                                               models=(tx.model,), completed=0, missed=0))
        if signer not in state.accounts:
            state.accounts.put(signer, Account(0, 0))
        state.poc_rounds.put((tx.epoch, tx.round), replace(record, newcomers=record.newcomers + 1))
    elif tx.model not in participant.models or (tx.addrs and tuple(tx.addrs) != participant.addrs):
        state.registry.put(signer, replace(participant, models=tuple(sorted({*participant.models, tx.model})),
                                           addrs=tuple(tx.addrs) or participant.addrs))
    state.poc_entries.put(key, PocEntry(root=tx.root, count=tx.count, secret_hash=tx.secret_hash))
    return f"{tx.count} nonces on {tx.model}" + (" (joined)" if participant is None else "")


@rule_for(PocSecret)
def process_poc_secret(state: LedgerState, ctx: BlockContext, signed: Signed[PocSecret], signer: str,
                       apply: bool) -> str:
    tx = signed.message
    _round_in(state, ctx, tx.epoch, tx.round, Phase.SECRET)
    key = (tx.epoch, tx.round, signer, tx.model)
    entry = _entry(state, key)
    if entry.secret:
        raise TxRejected(Reason.ALREADY_REVEALED, "the secret is already open")
    if secret_hash(tx.secret) != entry.secret_hash:
        raise TxRejected(Reason.SEED_MISMATCH, "the secret does not open the commitment")
    if apply:
        state.poc_entries.put(key, replace(entry, secret=tx.secret))
    return "secret opened"


@rule_for(PocReveal)
def process_poc_reveal(state: LedgerState, ctx: BlockContext, signed: Signed[PocReveal], signer: str,
                       apply: bool) -> str:
    tx = signed.message
    record = _round_in(state, ctx, tx.epoch, tx.round, Phase.REVEAL)
    key = (tx.epoch, tx.round, signer, tx.model)
    entry = _entry(state, key)
    if not entry.secret or not record.sample_seed:
        raise TxRejected(Reason.NO_COMMITMENT, "the secret was never opened: this commitment cannot be sampled")
    if entry.opened:
        raise TxRejected(Reason.ALREADY_REVEALED, "the sample is already open")
    wanted = sample_indices(record.sample_seed, signer, tx.model, entry.count, state.params.poc_sample_size)
    if len(tx.leaves) != len(wanted) or len(tx.proofs) != len(wanted):
        raise TxRejected(Reason.BAD_OPENING, f"{len(wanted)} sampled nonces, {len(tx.leaves)} leaves and "
                                             f"{len(tx.proofs)} proofs opened")
    for index, leaf, proof in zip(wanted, tx.leaves, tx.proofs, strict=True):
        if not 0 < len(leaf) <= MAX_POC_LEAF_BYTES:
            raise TxRejected(Reason.BAD_OPENING, f"leaf {index} has {len(leaf)} bytes")
        if not verify_inclusion(entry.root, entry.count, index, leaf, proof):
            raise TxRejected(Reason.BAD_OPENING, f"leaf {index} is not in the committed tree")
    if apply:
        state.poc_entries.put(key, replace(entry, leaves=tuple(tx.leaves)))
    return f"{len(wanted)} leaves opened"


@rule_for(PocVerdict)
def process_poc_verdict(state: LedgerState, ctx: BlockContext, signed: Signed[PocVerdict], signer: str,
                        apply: bool) -> str:
    tx = signed.message
    _round_in(state, ctx, tx.epoch, tx.round, Phase.VERDICT)
    info = state.epoch_info(tx.epoch)
    power = info.weights.get(signer, 0) if info is not None else 0
    if not power:
        raise TxRejected(Reason.NOT_A_VALIDATOR, f"{signer} holds no voting power in epoch {tx.epoch}")
    if signer == tx.prover:
        raise TxRejected(Reason.CONFLICT_OF_INTEREST, "a prover does not judge its own compute")
    key = (tx.epoch, tx.round, tx.prover, tx.model)
    entry = _entry(state, key)
    if not entry.opened:
        raise TxRejected(Reason.NOT_VALIDATABLE, "its sample was never opened: there is nothing to recompute")
    if signer in entry.voters:
        raise TxRejected(Reason.DUPLICATE_VOTE, f"{signer} already judged this commitment")
    if apply:
        state.poc_entries.put(key, replace(
            entry, passed=entry.passed + power * tx.ok, failed=entry.failed + power * (not tx.ok),
            voters=tuple(sorted((*entry.voters, signer)))))
    return f"{'pass' if tx.ok else 'fail'} for {tx.prover}"


assert set(RULES) == {kind.message for kind in TX_KINDS}, "every transaction kind has exactly one rule"
