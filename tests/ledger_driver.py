"""A ledger driven directly with real signed transactions, the way the ledger and adversarial
tests drive it: every transaction is signed with its signer's next sequence, blocks are built
by one named proposer a second apart, applied, and the state's invariants checked after each.

Signers are named (``"ta"``, ``"alice"``...): a test module gives its names and keys, its
genesis and its proposer; what a scenario does with them stays in the test. Also here: the
two verdicts the tests submit, and the steps of a proof-of-compute round (commit, secret,
reveal, verdict: honest unless a test alters one) over a small-window ``poc_params``. No
test module imports another; what they share lives here, in helpers.py and in fuzz.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Set

from helpers import drawn_attempt, request_drawing

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import poc, poc_rounds, rules
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.poc import Phase, RoundKind
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    FailureFlag,
    FinishInference,
    PocCommit,
    PocReveal,
    PocSecret,
    PocVerdict,
    RevealValidationSeed,
    StartInference,
    Validation,
    VerdictStats,
    derive_validation_seed,
)
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.merkle import inclusion_proof, merkle_root
from gonka_p2p.wire.messages import ChatTurn, InferenceRequest, inference_id
from gonka_p2p.wire.schema import Message

OK = VerdictStats(valid=True, suspicious=False, failure_flags=0, n_tokens=5, mean_distance_nano=1_000,
                  max_distance_nano=5_000, top_k_misses=0, sampling_mismatches=0)
BAD = VerdictStats(valid=False, suspicious=False, failure_flags=int(FailureFlag.DISTANCE), n_tokens=5,
                   mean_distance_nano=2_300_000_000, max_distance_nano=9_000_000_000, top_k_misses=3,
                   sampling_mismatches=2)


def poc_params(**overrides: object) -> Params:
    """Proof of compute in 20-block epochs: the regular round opens at the epoch's 2nd block
    (compute 2, secret 1, reveal 1, verdict 2 blocks), the confirmation round (compute 2) at a
    random start in the epoch's blocks 8..15; 4 nonces sampled, 4-bit join stamps."""
    return Params(**{**dict(
        epoch_length_blocks=20, inference_deadline_blocks=3, request_window_ms=10**9, max_tx_bytes=64 * 1024,
        price_per_token={"m": 1, "m2": 1}, validation_window_blocks=3, dispute_voting_blocks=2,
        epoch_reward=100_000, validation_cap_ppm=rules.PPM, poc_enabled=1, poc_start_offset_blocks=1,
        poc_compute_blocks=2, poc_secret_blocks=1, poc_reveal_blocks=1, poc_verdict_blocks=2,
        poc_confirm_compute_blocks=2, poc_sample_size=4, poc_join_pow_bits=4), **overrides})


def poc_genesis(chain: str, keys: Mapping[str, Keypair], weights: Mapping[str, int],
                models: Mapping[str, tuple[str, ...]] | None = None, funded: Set[str] = frozenset(),
                **params: object) -> Genesis:
    """A network of ``weights``' participants (serving ``models[name]``, default ``("m",)``)
    under :func:`poc_params`; the ``funded`` keys hold a million coins, the others nothing."""
    return Genesis(chain_id=chain, genesis_time_ms=1_700_000_000_000, params=poc_params(**params),
                   participants=tuple(GenesisParticipant(keys[n].public_key, w, models=(models or {}).get(n, ("m",)))
                                      for n, w in weights.items()),
                   allocations={keys[n].peer_id: 10**6 for n in funded})


def poc_leaves(peer: str, model: str, epoch: int, kind: RoundKind, count: int) -> list[bytes]:
    """A prover's ``count`` results: opaque to the ledger, distinct per nonce and identity."""
    return [hashlib.sha256(f"{peer}/{model}/{epoch}/{kind}/{i}".encode()).digest() for i in range(count)]


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
        self.trees: dict[tuple[str, int, RoundKind, str], list[bytes]] = {}  # committed proof-of-compute leaves

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


    # -- proof of compute: one round's steps, by name; ``kind`` defaults to the regular round --

    def name_of(self, peer: str) -> str:
        return next(n for n, k in self.keys.items() if k.peer_id == peer)

    def to_phase(self, epoch: int, kind: RoundKind, wanted: Phase) -> None:
        """Empty blocks until the next one lies in ``wanted`` of the round (which must come)."""
        params = self.state.params
        while True:
            record = self.state.poc_rounds.get((epoch, kind))
            if record is not None and poc.phase(self.state.height + 1, record.start, kind, params) is wanted:
                return
            assert self.state.height < rules.epoch_last_height(epoch, params), f"{kind.name} {epoch}: no {wanted.name}"
            self.block()

    def poc_secret_of(self, who: str, epoch: int, kind: RoundKind, model: str) -> bytes:
        return poc.derive_secret(self.keys[who].secret, self.chain, epoch, kind, model)

    def poc_commit(self, who: str, count: int, epoch: int, kind: RoundKind = RoundKind.REGULAR,
                   model: str | None = None, *, leaves: list[bytes] | None = None, stamp: int | None = None) -> bytes:
        """``who`` commits ``count`` nonces: to ``leaves`` (default: ``count`` of its own, kept
        for its reveal). A key that is no participant carries a passing join stamp unless
        ``stamp`` says."""
        model = model or self.model
        peer = self.peer(who)
        tree = poc_leaves(peer, model, epoch, kind, count) if leaves is None else leaves
        self.trees[(who, epoch, kind, model)] = tree
        if stamp is None:
            stamp = 0 if peer in self.state.registry.rows else poc.find_join_stamp(
                self.chain, epoch, self.keys[who].public_key, self.state.params.poc_join_pow_bits)
        root, hashed = merkle_root(tree), poc.secret_hash(self.poc_secret_of(who, epoch, kind, model))
        return self.sign(who, lambda n: PocCommit(chain_id=self.chain, epoch=epoch, round=kind, model=model, root=root,
                                                  count=count, secret_hash=hashed, addrs=[], join_stamp=stamp,
                                                  sequence=n))

    def poc_secret(self, who: str, epoch: int, kind: RoundKind = RoundKind.REGULAR, model: str | None = None,
                   secret: bytes | None = None) -> bytes:
        model = model or self.model
        s = self.poc_secret_of(who, epoch, kind, model) if secret is None else secret
        return self.sign(who, lambda n: PocSecret(chain_id=self.chain, epoch=epoch, round=kind, model=model, secret=s,
                                                  sequence=n))

    def poc_opening(self, who: str, epoch: int, kind: RoundKind = RoundKind.REGULAR, model: str | None = None
                    ) -> tuple[tuple[int, ...], list[bytes], list[list[bytes]]]:
        """The sampled nonces of ``who``'s commitment, their leaves and proofs from its tree."""
        model = model or self.model
        tree = self.trees[(who, epoch, kind, model)]
        wanted = poc_rounds.sampled(self.state, epoch, kind, self.peer(who), model)
        assert wanted, "the sample seed is not fixed yet, or nothing was committed"
        return wanted, [tree[i] for i in wanted], [inclusion_proof(tree, i) for i in wanted]

    def poc_reveal(self, who: str, epoch: int, kind: RoundKind = RoundKind.REGULAR, model: str | None = None,
                   leaves: list[bytes] | None = None, proofs: list[list[bytes]] | None = None) -> bytes:
        """``who`` opens its sample: honestly unless ``leaves`` and ``proofs`` say otherwise."""
        model = model or self.model
        if leaves is None or proofs is None:
            _, leaves, proofs = self.poc_opening(who, epoch, kind, model)
        opened, with_proofs = leaves, proofs
        return self.sign(who, lambda n: PocReveal(chain_id=self.chain, epoch=epoch, round=kind, model=model,
                                                  leaves=opened, proofs=with_proofs, sequence=n))

    def poc_verdict(self, who: str, prover: str, ok: bool, epoch: int, kind: RoundKind = RoundKind.REGULAR,
                    model: str | None = None) -> bytes:
        model = model or self.model
        return self.sign(who, lambda n: PocVerdict(chain_id=self.chain, epoch=epoch, round=kind,
                                                   prover=self.peer(prover), model=model, ok=ok, sequence=n))

    def poc_judges(self, epoch: int) -> list[str]:
        """The names holding voting power in ``epoch``."""
        info = self.state.epoch_info(epoch)
        assert info is not None
        return [self.name_of(peer) for peer in info.weights]

    def poc_round(self, epoch: int, kind: RoundKind, counts: Mapping[tuple[str, str], int],
                  fail: Set[str] = frozenset()) -> None:
        """A whole round: ``counts[(who, model)]`` nonces committed, secrets opened, samples
        revealed, and every validator of the epoch judging every other prover (failing the
        ones named in ``fail``). Leaves the chain at the round's first verdict block."""
        self.to_phase(epoch, kind, Phase.COMPUTE)
        self.ok(*[self.poc_commit(who, n, epoch, kind, model) for (who, model), n in counts.items()])
        self.to_phase(epoch, kind, Phase.SECRET)
        self.ok(*[self.poc_secret(who, epoch, kind, model) for who, model in counts])
        self.to_phase(epoch, kind, Phase.REVEAL)
        self.ok(*[self.poc_reveal(who, epoch, kind, model) for who, model in counts])
        self.to_phase(epoch, kind, Phase.VERDICT)
        self.ok(*[self.poc_verdict(judge, who, who not in fail, epoch, kind, model)
                  for judge in self.poc_judges(epoch) for who, model in counts if judge != who])

    def confirmation_counts(self, counts: Mapping[tuple[str, str], int], skip: Set[str] = frozenset()
                            ) -> dict[tuple[str, str], int]:
        """The fewest nonces by which each regular commitment of ``counts`` (but ``skip``'s) is
        confirmed, per model."""
        params = self.state.params
        return {(who, model): max(1, -(-params.poc_confirm_min_ppm * n * params.poc_confirm_compute_blocks
                                       // (params.poc_compute_blocks * rules.PPM)))
                for (who, model), n in counts.items() if who not in skip}

    def poc_epoch(self, epoch: int, counts: Mapping[tuple[str, str], int], fail: Set[str] = frozenset(),
                  unconfirmed: Set[str] = frozenset()) -> None:
        """:meth:`poc_round` for the regular round, every regular committer but ``unconfirmed``
        confirming it, then blocks to the epoch's last (its weights applied)."""
        self.poc_round(epoch, RoundKind.REGULAR, counts, fail)
        self.poc_round(epoch, RoundKind.CONFIRMATION, self.confirmation_counts(counts, unconfirmed))
        self.until(rules.epoch_last_height(epoch, self.state.params))
