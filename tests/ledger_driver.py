"""A ledger driven directly with real signed transactions, the way the ledger and adversarial
tests drive it: every transaction is signed with its signer's next sequence, blocks are built
by one named proposer a second apart, applied, and the state's invariants checked after each.

Signers are named (``"ta"``, ``"alice"``...): a test module gives its names and keys, its
genesis and its proposer; what a scenario does with them stays in the test. Also here: the
two verdicts the tests submit. No test module imports another; what they share lives here,
in helpers.py and in fuzz.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from helpers import drawn_attempt, request_drawing

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import rules
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants
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
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ChatTurn, InferenceRequest, inference_id
from gonka_p2p.wire.schema import Message

OK = VerdictStats(valid=True, suspicious=False, failure_flags=0, n_tokens=5, mean_distance_nano=1_000,
                  max_distance_nano=5_000, top_k_misses=0, sampling_mismatches=0)
BAD = VerdictStats(valid=False, suspicious=False, failure_flags=int(FailureFlag.DISTANCE), n_tokens=5,
                   mean_distance_nano=2_300_000_000, max_distance_nano=9_000_000_000, top_k_misses=3,
                   sampling_mismatches=2)


def request_message(state: LedgerState, nonce: bytes, model: str = "m", max_tokens: int = 20) -> InferenceRequest:
    """The tests' one-turn request on ``state``'s chain, stamped at its genesis time (inside
    every test's request window)."""
    return InferenceRequest(chain_id=state.genesis.chain_id, model=model,
                            messages=[ChatTurn(role="user", content="hi")], max_tokens=max_tokens,
                            temperature=0.7, top_p=1.0, top_k=0, logprobs_k=5,
                            timestamp_ms=state.genesis.genesis_time_ms, nonce=nonce)


class LedgerDriver:
    """A ledger and the named signers around it. Sequences handed out since the last block are
    remembered, so several transactions of one signer fit in one block; a test that drops a
    signed transaction unsent gives its sequence back (``next_seq[name] -= 1``)."""

    def __init__(self, state: LedgerState, keys: dict[str, Keypair], proposer: str, model: str = "m") -> None:
        self.state = state
        self.keys = keys
        self.proposer = proposer
        self.model = model
        self.next_seq: dict[str, int] = {}
        self.nonce = 0

    @property
    def chain(self) -> str:
        return self.state.genesis.chain_id

    def peer(self, who: str) -> str:
        return self.keys[who].peer_id

    def sign(self, who: str, make: Callable[[int], Message]) -> bytes:
        """``make(sequence)`` signed by ``who`` with its next sequence."""
        account = self.state.account(self.peer(who))
        n = self.next_seq.get(who, account.sequence if account else 0)
        self.next_seq[who] = n + 1
        return seal(make(n), self.keys[who])

    def block(self, *txs: bytes, time_ms: int | None = None) -> list[Receipt]:
        """Apply the next block (a second after the last unless ``time_ms``); its receipts."""
        block = Block(self.state.height + 1, self.state.last_block_hash, self.peer(self.proposer),
                      self.state.time_ms + 1000 if time_ms is None else time_ms, list(txs))
        _, receipts = apply_block(self.state, block)
        self.next_seq.clear()
        check_invariants(self.state)
        return receipts

    def ok(self, *txs: bytes) -> list[Receipt]:
        """:meth:`block`, asserting that the ledger took every transaction."""
        receipts = self.block(*txs)
        assert all(r.ok for r in receipts), [(r.kind, r.reason, r.detail) for r in receipts if not r.ok]
        return receipts

    def until(self, height: int) -> None:
        while self.state.height < height:
            self.block()

    def seed(self, who: str, epoch: int) -> bytes:
        return derive_validation_seed(self.keys[who].secret, self.chain, epoch)

    def commit(self, who: str, epoch: int) -> bytes:
        c = rules.seed_commitment(epoch, self.peer(who), self.seed(who, epoch))
        return self.sign(who, lambda n: CommitValidationSeed(chain_id=self.chain, epoch=epoch, commitment=c,
                                                             sequence=n))

    def reveal(self, who: str, epoch: int, seed: bytes | None = None) -> bytes:
        s = self.seed(who, epoch) if seed is None else seed
        return self.sign(who, lambda n: RevealValidationSeed(chain_id=self.chain, epoch=epoch, seed=s, sequence=n))

    def request(self, client: str, executor: str, ta: str = "ta", max_tokens: int = 20) -> bytes:
        """A fresh request whose nonce is ground so that the ledger's draw gives it to ``executor``."""
        self.nonce += 1
        return request_drawing(self.state, lambda grind: seal(request_message(
            self.state, hashlib.sha256(self.nonce.to_bytes(8, "big") + grind).digest()[:16], self.model,
            max_tokens), self.keys[client]), self.peer(ta), self.peer(executor))

    def start(self, request: bytes, executor: str, ta: str = "ta", attempt: int | None = None) -> bytes:
        """``ta``'s Start naming ``executor``, at the attempt the draw gives it (0 when none
        does: a test of a refused Start) unless ``attempt`` says."""
        if attempt is None:
            attempt = drawn_attempt(self.state, request, self.peer(ta), self.peer(executor)) or 0
        return self.sign(ta, lambda n: StartInference(chain_id=self.chain, request=request,
                                                      executor=self.peer(executor), attempt=attempt, sequence=n))

    def finish(self, request: bytes, executor: str, prompt: int = 10, completion: int = 5) -> bytes:
        iid = inference_id(open_envelope(request, InferenceRequest))
        return self.sign(executor, lambda n: FinishInference(
            chain_id=self.chain, inference_id=iid, prompt_tokens=prompt, completion_tokens=completion,
            response_hash=b"r" * 32, artifact_commitment=b"a" * 32, sequence=n))

    def validate(self, who: str, iid: bytes, verdict: VerdictStats, seed: bytes = b"") -> bytes:
        return self.sign(who, lambda n: Validation(chain_id=self.chain, inference_id=iid, verdict=verdict,
                                                   seed=seed, sequence=n))

    def vote(self, who: str, iid: bytes, verdict: VerdictStats) -> bytes:
        return self.sign(who, lambda n: DisputeVote(chain_id=self.chain, inference_id=iid, verdict=verdict,
                                                    sequence=n))

