"""Golden vectors: the ledger's app hash after each block of one fixed block sequence, and
the outputs of the two weighted draws (executor, dispute committee).

Every replica must compute the same app hash from the same blocks, across versions of this
code too: a snapshot written by one version is loaded by the next, and replicas of two
versions must agree. So a refactor of the state machine must leave these constants alone;
a deliberate change of the rules changes them in the same commit, and says so.

The sequence exercises every transaction kind and every end-of-block step: transfers,
registration, StartInference/FinishInference in one block, in two blocks and in reverse
order (a held Finish), an expiry, seed commit and reveal (including epoch 0's seeds from
genesis), passing and failing Validations (a failure carrying its duty's seed), a dispute decided by a
majority of its seats and one redrawn after a silent round, then undecided, and the
settlements of epochs 0 and 1. Keys, times and nonces are
fixed, so the bytes of every block are too.
"""

from __future__ import annotations

from collections.abc import Callable

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import disputes, rules
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.state import LedgerState, apply_block, check_invariants
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    FailureFlag,
    FinishInference,
    RegisterParticipant,
    RevealValidationSeed,
    StartInference,
    Transfer,
    Validation,
    VerdictStats,
    derive_validation_seed,
)
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ChatTurn, InferenceRequest, inference_id
from gonka_p2p.wire.schema import Message

CHAIN = "gonka-golden"
MODEL = "m"
T0 = 1_700_000_000_000
L = 10  # epoch e ends at 10e + 10, settles at 10e + 15 (window 3, voting 2)
NAMES = ("ta", "ex", "cheat", "v1", "v2", "v3", "alice", "bob", "newbie")
KEYS = {n: Keypair.from_seed(f"golden-{n}".encode()) for n in NAMES}
PEER = {n: k.peer_id for n, k in KEYS.items()}
NAME_OF = {p: n for n, p in PEER.items()}
VALIDATORS = ("ta", "ex", "cheat", "v1", "v2", "v3")
WEIGHTS = {"ta": 10, "ex": 8, "cheat": 6, "v1": 10, "v2": 5, "v3": 7}

OK = VerdictStats(valid=True, suspicious=False, failure_flags=0, n_tokens=5, mean_distance_nano=1_000,
                  max_distance_nano=5_000, top_k_misses=0, sampling_mismatches=0)
BAD = VerdictStats(valid=False, suspicious=False, failure_flags=int(FailureFlag.DISTANCE), n_tokens=5,
                   mean_distance_nano=2_300_000_000, max_distance_nano=9_000_000_000, top_k_misses=3,
                   sampling_mismatches=2)


def seed_of(who: str, epoch: int) -> bytes:
    return derive_validation_seed(KEYS[who].secret, CHAIN, epoch)


def golden_genesis() -> Genesis:
    params = Params(epoch_length_blocks=L, inference_deadline_blocks=3, request_window_ms=10**9,
                    max_tx_bytes=64 * 1024, price_per_token={MODEL: 2}, validation_window_blocks=3,
                    dispute_voting_blocks=2, epoch_reward=100_000,
                    validator_share_ppm=200_000, validation_cap_ppm=rules.PPM)
    return Genesis(
        chain_id=CHAIN, genesis_time_ms=T0, params=params,
        participants=tuple(GenesisParticipant(
            KEYS[n].public_key, w, models=(MODEL,),
            seed_commitment=rules.seed_commitment(0, PEER[n], seed_of(n, 0)) if n in ("v1", "v2") else b"")
            for n, w in WEIGHTS.items()),
        allocations={PEER["alice"]: 1_000_000, PEER["bob"]: 500_000})


class Driver:
    """Applies blocks of signed transactions, recording the app hash after each."""

    def __init__(self) -> None:
        self.state = LedgerState.from_genesis(golden_genesis())
        self.hashes = [self.state.app_hash().hex()]
        self.next_seq: dict[str, int] = {}
        self.nonce = 0

    def sign(self, who: str, make: Callable[[int], Message]) -> bytes:
        account = self.state.account(PEER[who])
        n = self.next_seq.get(who, account.sequence if account else 0)
        self.next_seq[who] = n + 1
        return seal(make(n), KEYS[who])

    def block(self, *txs: bytes) -> list[Receipt]:
        block = Block(self.state.height + 1, self.state.last_block_hash, PEER["ta"],
                      self.state.time_ms + 1000, list(txs))
        _, receipts = apply_block(self.state, block)
        self.next_seq.clear()
        check_invariants(self.state)
        self.hashes.append(self.state.app_hash().hex())
        return receipts

    def ok(self, *txs: bytes) -> list[Receipt]:
        receipts = self.block(*txs)
        assert all(r.ok for r in receipts), [(r.kind, r.reason, r.detail) for r in receipts if not r.ok]
        return receipts

    def until(self, height: int) -> None:
        while self.state.height < height:
            self.block()

    def request(self, client: str, max_tokens: int = 20) -> bytes:
        self.nonce += 1
        return seal(InferenceRequest(chain_id=CHAIN, model=MODEL, messages=[ChatTurn(role="user", content="hi")],
                                     max_tokens=max_tokens, temperature=0.7, top_p=1.0, top_k=0,
                                     logprobs_k=5, timestamp_ms=T0, nonce=self.nonce.to_bytes(16, "big")),
                    KEYS[client])

    def start(self, request: bytes, executor: str, ta: str = "ta") -> bytes:
        return self.sign(ta, lambda n: StartInference(chain_id=CHAIN, request=request,
                                                      executor=PEER[executor], sequence=n))

    def finish(self, request: bytes, executor: str, prompt: int = 10, completion: int = 5) -> bytes:
        iid = inference_id(open_envelope(request, InferenceRequest))
        return self.sign(executor, lambda n: FinishInference(
            chain_id=CHAIN, inference_id=iid, prompt_tokens=prompt, completion_tokens=completion,
            response_hash=b"r" * 32, artifact_commitment=b"a" * 32, sequence=n))

    def commit(self, who: str, epoch: int) -> bytes:
        c = rules.seed_commitment(epoch, PEER[who], seed_of(who, epoch))
        return self.sign(who, lambda n: CommitValidationSeed(chain_id=CHAIN, epoch=epoch, commitment=c,
                                                             sequence=n))

    def reveal(self, who: str, epoch: int) -> bytes:
        return self.sign(who, lambda n: RevealValidationSeed(chain_id=CHAIN, epoch=epoch,
                                                             seed=seed_of(who, epoch), sequence=n))

    def validate(self, who: str, iid: bytes, verdict: VerdictStats, epoch: int) -> bytes:
        seed = b"" if verdict.valid else seed_of(who, epoch)  # a failure proves its duty
        return self.sign(who, lambda n: Validation(chain_id=CHAIN, inference_id=iid, verdict=verdict,
                                                   seed=seed, sequence=n))

    def vote(self, who: str, iid: bytes, verdict: VerdictStats) -> bytes:
        return self.sign(who, lambda n: DisputeVote(chain_id=CHAIN, inference_id=iid, verdict=verdict,
                                                    sequence=n))

    def check_duties(self, epoch: int, verdict_of: Callable[[bytes], VerdictStats]) -> None:
        txs = []
        for who in VALIDATORS:
            if self.state.commitment(epoch, PEER[who]) is not None:
                txs += [self.validate(who, iid, verdict_of(iid), epoch)
                        for iid in self.state.validation_duties(epoch, PEER[who], seed_of(who, epoch))]
        self.ok(*txs)


def run_sequence() -> Driver:
    d = Driver()
    # Epoch 0: money moves, a newcomer joins, epoch 1's seeds are committed, work is served.
    d.ok(d.sign("alice", lambda n: Transfer(chain_id=CHAIN, to=PEER["newbie"], amount=1_000, sequence=n)),
         d.sign("bob", lambda n: Transfer(chain_id=CHAIN, to=PEER["alice"], amount=77, sequence=n)))
    d.ok(d.sign("newbie", lambda n: RegisterParticipant(chain_id=CHAIN, addrs=["/ip4/9.9.9.9/tcp/9"],
                                                        models=[MODEL], sequence=n)),
         *[d.commit(w, 1) for w in VALIDATORS])
    early = d.request("alice")
    d.ok(d.start(early, "ex"), d.finish(early, "ex", 11, 7))
    d.check_duties(0, lambda iid: OK)
    d.until(10)
    # Epoch 1: every order of Start and Finish, an expiry, honest and cheating executors.
    req = [d.request(c) for c in ("alice", "bob", "alice", "bob", "alice", "bob")]
    iid = [inference_id(open_envelope(r, InferenceRequest)) for r in req]
    d.ok(d.start(req[0], "ex"), d.finish(req[0], "ex", 12, 8),
         d.start(req[1], "cheat"), d.finish(req[1], "cheat", 9, 20),
         d.finish(req[2], "newbie", 10, 3),  # held: its Start comes in the next block
         d.start(req[3], "ex"),  # finished in the next block
         d.start(req[4], "cheat"))  # never finished: expires
    d.ok(d.start(req[2], "newbie"), d.finish(req[3], "ex", 10, 10),
         d.start(req[5], "cheat", ta="v3"), d.finish(req[5], "cheat", 4, 4))
    d.ok(d.sign("alice", lambda n: Transfer(chain_id=CHAIN, to=PEER["bob"], amount=5, sequence=n)))
    cheated = {iid[1], iid[5]}
    d.check_duties(1, lambda i: BAD if i in cheated else OK)
    d.ok()  # its hash draws both committees
    # The first is decided by a majority of its seats; in the second only its smallest seat
    # votes: the round closes undecided, a second committee is drawn, which stays silent.
    first, second = (d.state.dispute(i) for i in (iid[1], iid[5]))
    assert first is not None and second is not None and first.voting and second.voting
    invalid, votes = 0, []
    for member, seats in zip(first.committee, first.seats, strict=True):
        if 2 * invalid <= d.state.params.dispute_committee_size:
            votes.append(d.vote(NAME_OF[member], iid[1], BAD))
            invalid += seats
    smallest = min(zip(second.seats, second.committee))[1]
    d.ok(*votes, d.vote(NAME_OF[smallest], iid[5], BAD))
    assert d.state.dispute(iid[5]).rounds == 2
    d.until(20)
    d.ok(*[d.reveal(w, 1) for w in VALIDATORS])
    d.until(32)
    summary = d.state.epoch_summary(1)
    assert summary is not None and summary.participant(PEER["cheat"]).caught == "dispute"
    assert summary.disputes == 2 and summary.fees_refunded > 0 and summary.minted > 0
    return d


GOLDEN_APP_HASHES: list[str] = [  # index: height (0: genesis)
    "2667ea47570ded56e8c668e015e68c0ed6b66abb480f413b0c8261916f72c829",
    "d92dbdb58e059a1add8dee92c2bc34b0a1c510fe5628467da49ec3f2eb6c6667",
    "a7d6c1a7538714ab38addc59a172c9604cf6d0786b54a79aa03ea972bfd98dcb",
    "8334bd0e8ea9eeae6b3a952c607bca3b17b9986c88dc5addf752cd134160b03e",
    "cf0937ba4c55eed81206df5df9a908e5b03d6ee58f64cdbc40d835d92da011fa",
    "4045e3b33d0c7b0636b893e7c09397c2e16abf1ad5a7198a23c24d04f0ecd11d",
    "eb296584b32729703549619411f05eb5ffd3bb222a27e395f27353de5d26e44c",
    "71b6af078ba8b900ecae6fe0e1744c442ee353549967258c9a58ccee6a61d983",
    "d2fd241f3d7751c935922748a9e76a08a34e56859cad0fea5b63cd0811e805bd",
    "0a43c082101eefd23705a8f1bfe9d072ec4394df5ed6492b5fb83191a477f8d3",
    "23d419bea09e562cb18726efad6c97ea0d06f9eff1f2483d6026f0e573a93da7",
    "9a41398cb8bdbe5b61a1b83536cdc0d899f1f8faa040fc8505418f5429077d12",
    "f3f4797413f8480e887095f19f91deab4ca2c89c320f34c27729f2b95bd28e03",
    "7493b7ae5a2d97669b8c6dc215e8aa62ba934b5fecea31b93d01cfc6eed0b2e2",
    "e85c7bc282e80bec67b4017e908d4989f66dc6848921d60ced9db6a5e704a71a",
    "0b102c38f53f6e4a3091f1f3b8855849725472aa1775449eb3812142a1beb3a1",
    "cac1471d2767addcb559e8dd380a3f790043fe481aa641c754575ed0134d119c",
    "b7d64c2499ee290d103014528a6cfa2917dfb7e46c0f877de035a8e94a25b74c",
    "531b58eb306a24ec9cb1f057b9758978518998ed97aa0b00c960d281ef7ebc1d",
    "e120e6df2794fc1c8a31693957ade0bf9b77f2a3b1cb226545e4367d540ce2f4",
    "be4139b18a8a400ae53f80bd2ff3c1787cacf35762a4fccf6ae46088245e8072",
    "50312c9a4fe34cb09550e8ace91f65cbc830792d83ea2b1eab01667dfde9b4f2",
    "fc3cfc4a2665035e3dc94c24c6e11dcb29bc2f8bdf72b2b4977213b764a4d977",
    "9b61845150d453eae3fe3761776419bb3a0e7eb04db7632c883cf71bb5688571",
    "44daf2843fc5ca40978c8c7f98a4cff20bd8ceca5cbc8dff10250093ded71991",
    "d229766637a37ae8de2c6085776db20019acf5c818db7c554151816eeb207014",
    "070c1180ce6d874367aff28b284a92ebd98079ebf258eec44c8adf8d3daffe76",
    "41776721c32139b4d947033ec9ea8e36f2ca0fcf91e14d1a06c537a1a1bf98a7",
    "e6290a07b61cb367b5abcd7884e8fd76c02108a846640d819c181448234d5177",
    "cea7e434b21b671d6d2ca1a98a23ee45cb43d6845e94f864fdc78033c58b9840",
    "0d80d8bd9ed24785af3023a02ceeb0cbdf7418db1c908954b2b36aadd09df450",
    "4b88af79ef1b21cbe9b609216d0cedaf7dd753ba838433bae3b8811ab8f22603",
    "67d3d7b5b5134ce484988779473596b73782f16a1f21363652145ace79488b29",
]


def test_the_app_hash_of_a_fixed_block_sequence_is_unchanged() -> None:
    hashes = run_sequence().hashes
    for height, (got, want) in enumerate(zip(hashes, GOLDEN_APP_HASHES, strict=True)):
        assert got == want, f"app hash at height {height} changed"


GOLDEN_EXECUTOR_DRAWS: list[str] = [
    "peer-07", "peer-06", "peer-01", "peer-10", "peer-07", "peer-06", "peer-07", "peer-01",
    "peer-04", "peer-01", "peer-09", "peer-06", "peer-04", "peer-09", "peer-06", "peer-01",
]
GOLDEN_COMMITTEES: list[tuple[tuple[str, int], ...]] = [
    (),
    (('peer-01', 1),),
    (('peer-03', 1), ('peer-06', 1)),
    (('peer-04', 1), ('peer-06', 1), ('peer-09', 1)),
    (('peer-01', 1), ('peer-06', 2), ('peer-09', 1)),
    (('peer-03', 2), ('peer-04', 1), ('peer-06', 2)),
    (),
    (('peer-09', 1),),
    (('peer-03', 2),),
    (('peer-01', 1), ('peer-04', 1), ('peer-09', 1)),
    (('peer-01', 1), ('peer-03', 1), ('peer-05', 1), ('peer-07', 1)),
    (('peer-03', 2), ('peer-04', 1), ('peer-06', 1), ('peer-09', 1)),
    (),
    (('peer-10', 1),),
    (('peer-09', 1), ('peer-10', 1)),
    (('peer-03', 2), ('peer-10', 1)),
]


def draw_weights() -> dict[str, int]:
    return {f"peer-{k:02d}": (k * 7) % 11 for k in range(12)}  # two of them have weight 0


def test_the_executor_draw_is_unchanged() -> None:
    weights, exclude = draw_weights(), frozenset({"peer-03"})
    draws = [rules.choose_executor(weights, exclude, bytes([k]) * 32, k % 3) for k in range(16)]
    assert draws == GOLDEN_EXECUTOR_DRAWS


def test_the_committee_draw_is_unchanged() -> None:
    weights = draw_weights()
    committees = [disputes.draw_committee(weights, bytes([k]) * 32, b"i" * 32, k % 3, k % 6)
                  for k in range(16)]
    assert committees == GOLDEN_COMMITTEES
