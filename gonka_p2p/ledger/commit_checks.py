"""The pure checks consensus rests on, apart from the state machine that runs them: a commit
certificate (a quorum of precommits for one block), the block time it fixes, and the evidence of
an equivocation. A replica catching up, a proposer and the simulator call them without a
:class:`~gonka_p2p.ledger.consensus.ConsensusState`; that state machine calls them too."""

from __future__ import annotations

import sys

from gonka_p2p.ledger.consensus_types import (
    CommitCertificate,
    Evidence,
    InvalidCommit,
    InvalidEvidence,
    Validator,
    ValidatorSet,
    VerifyFn,
    Vote,
    VoteType,
    well_formed_proposal,
    well_formed_vote,
)

def verified(verify: VerifyFn, validator: Validator, message: bytes, signature: bytes) -> bool:
    """``signature`` is ``validator``'s over ``message``; never raises."""
    try:
        return bool(verify(validator.public_key, signature, message))
    except Exception:  # a verifier choking on garbage means "not signed"
        return False


def verify_commit(validators: ValidatorSet, height: int, block_hash: bytes, certificate: CommitCertificate,
                  verify_sig: VerifyFn, *, chain_id: str) -> None:
    """Raise :class:`InvalidCommit` unless ``certificate`` proves ``block_hash`` was committed at ``height``.

    Every entry must be a correctly signed precommit for that block, height
    and round by a distinct member of ``validators`` (the set *of that
    height*); together they must hold more than 2/3 of its power. Any bad
    entry rejects the whole certificate: an honest replica never builds one.
    Total: garbage input raises InvalidCommit, nothing else.
    """
    if not isinstance(certificate, CommitCertificate) or not isinstance(certificate.precommits, tuple):
        raise InvalidCommit("malformed", "not a commit certificate")
    if certificate.height != height:
        raise InvalidCommit("wrong_height", f"certificate is for height {certificate.height}, not {height}")
    if certificate.block_hash != block_hash:
        raise InvalidCommit("wrong_block", "certificate is for another block")
    signers: dict[str, None] = {}
    power = 0
    for vote in certificate.precommits:
        if not well_formed_vote(vote):
            raise InvalidCommit("malformed", "an entry is not a well-formed vote")
        if (vote.type, vote.height, vote.round, vote.block_hash) != (
                VoteType.PRECOMMIT, height, certificate.round, block_hash):
            raise InvalidCommit("vote_mismatch", f"entry by {vote.validator} is not a precommit for this block")
        validator = validators.get(vote.validator)
        if validator is None:
            raise InvalidCommit("unknown_validator", f"{vote.validator} is not a validator at height {height}")
        if vote.validator in signers:
            raise InvalidCommit("duplicate_validator", f"{vote.validator} appears twice")
        if not verified(verify_sig, validator, vote.sign_bytes(chain_id), vote.signature):
            raise InvalidCommit("bad_signature", f"precommit by {vote.validator} is not signed by it")
        signers[vote.validator] = None
        power += validator.power
    if not validators.is_quorum(power):
        raise InvalidCommit("short_of_quorum", f"signed power {power} of {validators.total_power} is not > 2/3")


def bft_time_ms(previous_ms: int, certificate: CommitCertificate, validators: ValidatorSet) -> int:
    """The time of the block after the one ``certificate`` commits: Tendermint's BFT time.

    It is the power-weighted median of the certificate's precommit times (the earliest time by
    which more than half of the signed power had precommitted), and at least ``previous_ms + 1``
    so that block time never stands still. A valid certificate holds more than 2/3 of the power
    and the faulty hold less than 1/3, so the honest signers hold more than half of the signed
    power: the median lies between two honest clocks, whatever the faulty ones sign or which
    quorum the proposer includes. Certificates are checked first (:func:`verify_commit`); a
    signer the set does not know counts no power.
    """
    members = ((v.time_ms, validators.get(v.validator)) for v in certificate.precommits)
    weighted = sorted((time_ms, member.power) for time_ms, member in members if member is not None)
    half = sum(power for _, power in weighted) // 2
    seen = 0
    for time_ms, power in weighted:
        seen += power
        if seen > half:
            return max(previous_ms + 1, time_ms)
    return previous_ms + 1


def verify_evidence(validators: ValidatorSet, evidence: Evidence, verify_sig: VerifyFn, *, chain_id: str) -> None:
    """Raise :class:`InvalidEvidence` unless ``evidence`` proves one validator signed two conflicting messages."""
    a, b = evidence.first, evidence.second
    if isinstance(a, Vote) and isinstance(b, Vote) and well_formed_vote(a) and well_formed_vote(b):
        signer = a.validator
        same_slot = (a.validator, a.type, a.height, a.round) == (b.validator, b.type, b.height, b.round)
    elif well_formed_proposal(a, sys.maxsize) and well_formed_proposal(b, sys.maxsize):
        signer, same_slot = a.proposer, (a.proposer, a.height, a.round) == (b.proposer, b.height, b.round)
    else:
        raise InvalidEvidence("malformed", "evidence must hold two votes or two proposals")
    if not same_slot:
        raise InvalidEvidence("different_slot", "messages are not for the same signer, height, round and step")
    if a.sign_bytes(chain_id) == b.sign_bytes(chain_id):
        raise InvalidEvidence("not_conflicting", "both messages sign the same content")
    validator = validators.get(signer)
    if validator is None:
        raise InvalidEvidence("unknown_validator", f"{signer} is not a validator")
    for m in (a, b):
        if not verified(verify_sig, validator, m.sign_bytes(chain_id), m.signature):
            raise InvalidEvidence("bad_signature", f"a message is not signed by {signer}")
