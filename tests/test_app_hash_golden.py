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
    "f75bce72431a49dc6bb3d69e43285dedb4abe7847b4764d5883f2e718b202c5c",
    "8cecb722149019f9fbd41e32ba1b35f38da7b9c4f10f228cd597fc3152fe248f",
    "49f1bfba4a5012ee5d632e386a9c94eb087379842bd55e729e716df364b8300b",
    "2f80d4da9c26d426e31447f1d4c3b3bb9ad961bdc67091411cca9dcb7a2a16a7",
    "072528d184e6e82cff8c062be2161e863935c0b38c7109215d5660afa8c1395a",
    "c832453f13ff97d446594f728a886925de258f4f083086184219f489adfe7e1e",
    "63db8ad78303970c6f1fd7cf9f9ed9606051da2fe6b33751c6f7d82c7b6c3c12",
    "f24afdbc48eba3e15bf77442a7d7e7e84e6b0b6a1e3c3d75b9aaae239fe5a3b7",
    "26828f68bd855988a6d8b6e8bad2de78b74afaf89b08ad91d43ec7d824a23ba4",
    "8782f20f776b5c319df9e58d9efa87caf5201236d609f2e2f6add99af3e11c1d",
    "9f8876d95a2c2e10c031b4ea4f7c3d59a43cd98ad0ab1b9722f22c9a26a2c779",
    "4525570378299209f887dc6aae7f6a3d9ffd28eaea493203c2cf68d4faac2861",
    "55b800cf379c43168f3efbd075fdda40f31adcd47bc606331097d4f4c7565b5e",
    "8c955ef0691f38e41191aee30dd4835eeef49f8cd5fe6e131e767c804a326594",
    "1f93b63c0a6e4615cbf631ed3956c374eb983feb11d251b88ad762909b438f7a",
    "0e40d65be5ba559f520cdefd5b716a93965eae598afbd4fffd6b3ff6585b55dc",
    "5614472d7bcc6aff91e9b75a13b3b68c4c2092be568f1c5a296afe48eb20cd3c",
    "2a0c232a4059591e7033548b216d9c818772ff62c8e4a60a74c88392c40db9bd",
    "8076beaaea0f5cfcfc9ed7f5bfae391cc88833c223d9a9c23be0c1dfee26729d",
    "1fa94a67f07d511dea621a66d362680cf67c266b3a15da460a0b9b4576dd78a4",
    "973c42efc9d05d3165158625a17925c4f36f0903d67deb54ea584f0ddc93b57f",
    "fcb587bf89e8857aa95305f6619363454dec720aa7f60edba681d57cc2bf502a",
    "a1a4beec2c4e8aae3e81b80d9fba72896a39bdcba39506c7e13769bac030e59f",
    "637c4c7e50a2303f0fad0f4053467005ebbec42dee6f1d4c6efd94b2449c2c35",
    "32c16d58691c6796139f24f59136c9d60fc02c87b39a4b2f1c894567c4017b14",
    "a71d783568d1b33d0d0025d374622aaf733fa0e86de74c36d32afc9a7c66c189",
    "0710a288dfbb6d6da7d4787c934f66d460cff3a73b40992971a5d4d98052ae23",
    "22e93f5a60f81f8abde1cbae5314c853862d6d20ddf8d33ae260bd0fb9c3be7a",
    "379ab1580aa49e9bf73d0c9f783f07a2f6d6644ce596a9ee1dd620c641f747fb",
    "29f88433c73c75ce79419b50eaccce0888b82134cae3111fcf4e74776651b02d",
    "9ab56b81ac6790440868c2d59fc2e56447fbd2ae3e2374244f193a58a89a0cd0",
    "e622bfd02d28097537441e470dfcfa779234ad2b98c407778ead972df3c93727",
    "4a9e6b9b4bc8c2497a24f638aaa51cf612d3262856d8f1a5803c865c829a3524",
]


def test_the_app_hash_of_a_fixed_block_sequence_is_unchanged() -> None:
    hashes = run_sequence().hashes
    for height, (got, want) in enumerate(zip(hashes, GOLDEN_APP_HASHES, strict=True)):
        assert got == want, f"app hash at height {height} changed"


GOLDEN_EXECUTOR_DRAWS: list[str] = [
    "peer-07", "peer-06", "peer-01", "peer-10", "peer-07", "peer-06", "peer-07", "peer-01",
    "peer-04", "peer-01", "peer-09", "peer-06", "peer-04", "peer-09", "peer-06", "peer-01",
]
GOLDEN_COMMITTEES: list[tuple[str, ...]] = [
    (),
    ("peer-10",),
    ("peer-07", "peer-03"),
    ("peer-08", "peer-09", "peer-01"),
    ("peer-09", "peer-10", "peer-06", "peer-07"),
    (),
    ("peer-05",),
    ("peer-09", "peer-03"),
    ("peer-01", "peer-03", "peer-06"),
    ("peer-09", "peer-03", "peer-01", "peer-06"),
    (),
    ("peer-07",),
    ("peer-09", "peer-03"),
    ("peer-06", "peer-04", "peer-05"),
    ("peer-06", "peer-04", "peer-09", "peer-10"),
    (),
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
