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
settlements of epochs 0 and 1. A second, shorter sequence runs on a network with proof of
compute: one epoch whose regular round (a newcomer joining by its commitment, one participant
committing nothing) and confirmation round set the next epoch's weights. Keys, times and
nonces are fixed, so the bytes of every block are too.
"""

from __future__ import annotations

from collections.abc import Callable

from ledger_driver import BAD, OK, LedgerDriver, poc_genesis

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger import disputes, rules
from gonka_p2p.ledger.block import Receipt
from gonka_p2p.ledger.distance_test import DistanceTest
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.model_pins import ModelPin
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.transactions import (
    RegisterParticipant,
    Transfer,
    VerdictStats,
    derive_validation_seed,
)
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id

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
        allocations={PEER["alice"]: 1_000_000, PEER["bob"]: 500_000},
        # A pinned distance run, so that settlements step it (OK verdicts sit just above its midpoint:
        # a carry the app hash holds, far from an accusation).
        models={MODEL: ModelPin("d" * 64, "bfloat16", DistanceTest(
            mid_nano=900, spread_nano=2_000, llr_per_token_micro=100_000, max_tokens=32))})


class Driver(LedgerDriver):
    """A golden ledger, recording the app hash after each block."""

    def __init__(self, genesis: Genesis) -> None:
        super().__init__(LedgerState.from_genesis(genesis), KEYS, "ta", MODEL)
        self.hashes = [self.state.app_hash().hex()]

    def block(self, *txs: bytes, time_ms: int | None = None) -> list[Receipt]:
        receipts = super().block(*txs, time_ms=time_ms)
        self.hashes.append(self.state.app_hash().hex())
        return receipts

    def check_duties(self, epoch: int, verdict_of: Callable[[bytes], VerdictStats]) -> None:
        txs = []
        for who in VALIDATORS:
            if self.state.commitment(epoch, PEER[who]) is not None:
                txs += [self.validate(who, iid, v := verdict_of(iid), b"" if v.valid else seed_of(who, epoch))
                        for iid in self.state.validation_duties(epoch, PEER[who], seed_of(who, epoch))]
        self.ok(*txs)


def run_sequence() -> Driver:
    d = Driver(golden_genesis())
    # Epoch 0: money moves, a newcomer joins, epoch 1's seeds are committed, work is served.
    d.ok(d.sign("alice", lambda n: Transfer(chain_id=CHAIN, to=PEER["newbie"], amount=1_000, sequence=n)),
         d.sign("bob", lambda n: Transfer(chain_id=CHAIN, to=PEER["alice"], amount=77, sequence=n)))
    d.ok(d.sign("newbie", lambda n: RegisterParticipant(chain_id=CHAIN, addrs=["/ip4/9.9.9.9/tcp/9"],
                                                        models=[MODEL], sequence=n)),
         *[d.commit(w, 1) for w in VALIDATORS])
    early = d.request("alice", "ex")
    d.ok(d.start(early, "ex"), d.finish(early, "ex", 11, 7))
    d.check_duties(0, lambda iid: OK)
    d.until(10)
    # Epoch 1: every order of Start and Finish, an expiry, honest and cheating executors.
    req = [d.request(c, ex, ta) for c, ex, ta in (("alice", "ex", "ta"), ("bob", "cheat", "ta"), ("alice", "v1", "ta"),
                                                  ("bob", "ex", "ta"), ("alice", "cheat", "ta"), ("bob", "cheat", "v3"))]
    iid = [inference_id(open_envelope(r, InferenceRequest)) for r in req]
    d.ok(d.start(req[0], "ex"), d.finish(req[0], "ex", 12, 8),
         d.start(req[1], "cheat"), d.finish(req[1], "cheat", 9, 20),
         d.finish(req[2], "v1", 10, 3),  # held: its Start comes in the next block
         d.start(req[3], "ex"),  # finished in the next block
         d.start(req[4], "cheat"))  # never finished: expires
    d.ok(d.start(req[2], "v1"), d.finish(req[3], "ex", 10, 10),
         d.start(req[5], "cheat", ta="v3"), d.finish(req[5], "cheat", 4, 4))
    d.ok(d.sign("alice", lambda n: Transfer(chain_id=CHAIN, to=PEER["bob"], amount=5, sequence=n)))
    cheated = {iid[1], iid[5]}
    d.check_duties(1, lambda i: BAD if i in cheated else OK)
    d.ok()  # its hash draws both committees
    # The first is decided by a majority of its seats; in the second only its smallest seat
    # votes: the round closes undecided, a second committee is drawn, which stays silent.
    first, second = (d.state.dispute(i) for i in (iid[1], iid[5]))
    assert first is not None and second is not None and first.voting and second.voting
    invalid, votes = first.accuser_seats, []  # the accuser's failing check is its vote
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
    "35201a5a2a0971dba88cec6f95eb7d9f7eecf9a9d5efa2e663f9c808091afc12",
    "e94c6b95109322b1719cc620e635be33822a51923aed73fc8b4414f775824e46",
    "ba465a503f5131fb182c88d86323063ef146516e0d3a67e3ef3aebdc6e00ce2c",
    "3fd235515996d2e1e793a2ae392cf68d48242414a2d712a3509cdd66a0200251",
    "6e143ded5a46c891d41283c742bbcbe42c2af036c79fd97f785e6dd5f7cd1eb6",
    "4d8b212ce4fe43658e6ca512057ea495ea5fde9f8eb4ef8bb32c3c906a6deaaf",
    "61fe29d3586c0c65224a3eee34a43b0e173cdd2367d367c2a9939083825adb68",
    "ae87e6f8e65a0c12b9af60662312a488f5df7b7a0a7144fab4e13bb453281709",
    "ef38c5f4b82a27dfd5655307586085413955a73d7c834834e25e3a8a681e0acb",
    "b346054ce912e90104c363e6f8d40273386f2b0fdb05f51e1fa1f1b554a68827",
    "89f931fb6e4adb4be0899559e34fc06088dbee76eae0f447796ba9ec925f25ac",
    "73044e57d34cf9a63a92659b3720a4504f8bc1339e621e70f21f611a861e916c",
    "cde9f5ae3221dcba7b9426e7ab3935833a362670dadb7f6fcde6acf8a8c3e9d3",
    "084d8e48714cf3b6fce36d797876092ce114121cb8de06d02fcec2e0a70be200",
    "fa187ba74794d9e02e525d00d19f51ca650d05b7945fc84356178f4bb9ce51c7",
    "12f96cfaf4cdb53b623279b495f016cebb2866bb214f35584f1e25d7ba08cc1e",
    "287481d71ec68099f27e69390826d82551dec14feb4bb14164ec0dd475ccce22",
    "b05124f76e9aa0a34a344c9234572dc5a8c043bec018cd710f33b763f65bb7f9",
    "adf70ac4f1b0365a5cb6828e4719120f529f8f4dc4913e6b2e674fd40d9cc928",
    "ef2443ed0a9dd38db949e72df0cccb71b438fac3411a9d4262d99973de53b40d",
    "36c426d56c0e5e9803b3c5718c5e656ae839b2da9a2280593941cf3ed5e0931e",
    "73e7859a5f408e84b2f5e6766132c1123405633f43557e6049e147631e1f8eea",
    "d43b93dc7fd1f36050290d21e60f18c06916f4c2dd2d1c4fb29ac85725a64714",
    "746d4a0ec409726d18825f9c95cb2f849bf0775b85b5521a28dd4ffe06268348",
    "be39ee69f2d42b8685bd2bc571fae4cb5e42f0043623df5bea13dc7553653a0d",
    "34fbec02327d53957075aa2582c06ddbce5de01f48a8a7e75b940ce14f25dc01",
    "58be52e9f8f826adf0b56caa8886d00095cb69d2690f069740f0403018112178",
    "8e90564fc8ad72821dc1149a1cf06778cebc327995a1bb318db8551c4f99c01b",
    "f40e48364dae81f9cb59e81d6eb31465932d59aa11341d0b88dfdfcccc8817e2",
    "88fa9b5d6cc9f8a9d777acbba9353aafb745691f536eca969e63652a92d9010f",
    "b63df51dc9d7bdc8ab7542abd3b452d0cef36539d7f52ad8a35193366c837979",
    "31e3e66b80279f2c5ad98056907dc5ec5c5680ea49a7dff36bfc913493cb43c5",
    "2105492de4c7437ace434fcbcb4cb150979aedbcdbf851d66aa99a133fa8fa19",
]


def test_the_app_hash_of_a_fixed_block_sequence_is_unchanged() -> None:
    hashes = run_sequence().hashes
    for height, (got, want) in enumerate(zip(hashes, GOLDEN_APP_HASHES, strict=True)):
        assert got == want, f"app hash at height {height} changed"


def run_poc_sequence() -> Driver:
    """Epoch 0 of a proof-of-compute network (``ledger_driver.poc_params``): ta, v1 and the
    newcomer prove 100, 60 and 40 nonces, ex commits nothing; every committer confirms."""
    d = Driver(poc_genesis(CHAIN, KEYS, {"ta": 10, "ex": 10, "v1": 10}))
    d.poc_epoch(0, {("ta", MODEL): 100, ("v1", MODEL): 60, ("newbie", MODEL): 40})
    assert d.state.weights() == {PEER["ta"]: 100, PEER["v1"]: 60, PEER["newbie"]: 40}
    return d


GOLDEN_POC_APP_HASHES: list[str] = [  # index: height (0: genesis)
    "daef738732a834174fdd5a4a11e31077cfb147eed1d2786d31f98af9d28e7932",
    "552a65260938631b4b926db3ba684ff6c1a9a71b8fc6877b565be46eb26f95fe",
    "f8a1185e5c1765e95415786ca1b4d98ad40691d3ae806aedc1989967e8ad6848",
    "407ca74067ebcaaf12111e5d9c12ecc6a3619ac3cc40cfbf7d880d4a53b4fcea",
    "a2346ba2cbe1e149fabc93251718f1a8df5579edf2dcde526adf1c79bc105151",
    "04f72004f8b98e800b8a6fb491f59c1410db001e6dc42052eda69a0953eed067",
    "758e9b2a49d6590da1ec13c0f3f825b2f6de3d3f0996c0afdce6b1e65628e6fb",
    "85628d90b848758506c7745b32cd7619d85d3568e34653a288a5869fe083eeab",
    "d85d8f3ba48838237c56fa73e512fec51ac934d2c037b5b2f837dfc8eaf60264",
    "7cb288ae32985c0c8ca5e4b63f9462651b4c04160227faf5fca007c537be1c09",
    "9bdf11f991d44639354bf6a795e6826e5809dca09b79825b93f64be4e945f410",
    "8c64c195d45c54b8b729082db79e965de50bd96fb1a720c1bc454bf6aa0a03e1",
    "53125a209d704cb0b2a46f31ef7bd4f33200037c69428e31afe4339a69eb09a4",
    "f18e3184f120d05c3e7dbe7429dfeeb611321984a5d9ee2465361eb1fff43ae0",
    "5a77a241786c2bebe3026562517a95c034db3d4a9041dcb00c698b45c8f9b5de",
    "0c021fc933ced1f99811952ac85107fc55a80259dcc56a8a120060a197a5e1eb",
    "349e208acd4356b1f147d20ac8232dabf626a807be35140b4326026e1808d5c5",
    "fa77b7ba7b1d79a64a88c95eec4963694143e7da0d2f78b451c78072b0c31675",
    "4d657c8c0199b6fe8c191fe6be3faa41cf290861b314e263192b5a67b25104e3",
    "17aee9c601ec37efa26defa62d0c535d9613db81fa5ffca96a2e78e087874c43",
    "9056eb16a5ede06ce68a7eb330b5ee86ee6f8746970b404cad5ba39294c164d3",
]  # index: height (0: genesis)


def test_the_app_hash_of_a_proof_of_compute_epoch_is_unchanged() -> None:
    hashes = run_poc_sequence().hashes
    for height, (got, want) in enumerate(zip(hashes, GOLDEN_POC_APP_HASHES, strict=True)):
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
