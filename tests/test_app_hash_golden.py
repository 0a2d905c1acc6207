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
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
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
        allocations={PEER["alice"]: 1_000_000, PEER["bob"]: 500_000})


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
    "ced0443b25085082203997d53bd0c111ce6bb7db9e9537d90aad3a248ec406c6",
    "a93a9a89b71f8b78fbcef430447d53c8122ed27cee3b89dffb6d021c795e23c8",
    "5d7e3473dd83a2d9535fd8fef9a16cd45da61986c570adbcf6e05a2c3bc7c591",
    "61514ad50482d13a889248a299c122c3a84c13492d720d0cbd1985eae9578d4b",
    "a03d9a8775a51a45ef189b714468335590643fc2a37e7362f15d3c8fd12d8911",
    "3450b152e9940eaf896de117a07e3a1d965d69feffd2ebb2dc5fc84e547171f7",
    "6f9b0f7e3869b849ee275f9a9ce28cd0751fd7d9d44a0ecee90700b498f764f6",
    "a604646a9cc20ea04f956f2850d966d169414d52140bd5ec74ffc43b071f41f7",
    "0f9386e33e0885db1bb9c555ea5b47d4577a969ee8e6dd7b5de5f39757db1064",
    "e0ce143071cc0c017d30c6dd95ce9a7709f70813dcb9c45e442459eca6341611",
    "8b38117177c6a2a012614cce03c45add774b9d43050f03653ce1ac0c5d14540f",
    "ddc75fdebc2a75c04743d867a1e57d602516cd45eac783ef1759b04eeb590564",
    "12a40b85ea31bef754ea2d303ff12cb31cb52f3af3507f03165395919be55a79",
    "1bc4274dedcdabe073c98caa34c0976ccb3a5bac24564a9cfa42405d1188e78b",
    "8304ad31b7644657fbe90ddf926137bcbd15fe0efe4db1c3576934c2c5d4f3ed",
    "cbca8f90cbda07c2f15c480a483413304454cedf567fd48ecb99e43abf0c27b1",
    "00210602a1a94adbf0b188fa1418ac02d8c8262e8f85299acf6566681b6b917e",
    "fbbda81151cccf3346971baea29141060f2bc92b75d7452517beafaa13b23675",
    "5537048cadb30d213b6ab8548a6abc3ee9e38f0add5cd90712f73be58fa37af0",
    "85cbe6a754429952a4a9f809a5b555faf7409e360de87c4ebe70a48fd130d73a",
    "ebaa5a61d88da0174afd5058add8fbed15af67bc45ed76cd099cbd718998c19f",
    "bcf4350b27a48e407bddc5089d7f30af83ddb8b8344707237ef3b4eea5f399e9",
    "f51c25acefb07ff94451d6c1832b7d4a90ed5e5917cd67825f655b882945517f",
    "a9040fd19dda60a8094695ccb8ae09d47aa9989844a91f75120b7ea4b6ce31b9",
    "03ed29e58a0225e732881a640ece02f55ad82dd0be22f807431402e07cf281b2",
    "e28f2b1d0d9a776f8e6816d6c345ddb9dfb973103307cfb877db96cbc6ecfb30",
    "704620de4d549bd803be5b10056f7bb5b5acfe5eacc7ce4436f90aeff3a4ee87",
    "8bd3192ac3b9d3e77ec53a3add2f3d3a2ecc1786dce1aa854379d13064ab99cf",
    "2346ab2d9e607d770a1be0de93e4b51275be74eed01c27b70c162c554d08cc82",
    "d81143ab4c8c49ccba31f2d657c1094a58107fea4163ec868f5796dfa8429d05",
    "4f542e1e676cca0361bb0958682f92618aec83d34ebaec7042c62e9ca2b6a759",
    "4ce0ee0256fb861684b8a6e0d7f726b2838bdff09f2d532be47fbc9a39ef3ec2",
    "b081c9a0091b6d053d260a3ce974f65088c7973dc44221566f9936ea0fe0e2cc",
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
    "62e1efcec30b2da62154631378baff86030ffa5d80131ba99d2069863f5c5ac1",
    "e2fce4f6ed9c2ec9e9d8f8f39e38cf622c82a97c3d42d4b0bf8200f4160160ee",
    "3c439977877b56617a7e27f62bdcd3d4f4e44ef5e0da5205b50b1648441e4799",
    "46f7fb046bd69aa001f2603b31386c95e35d4ab62548fb62794a185e329a2d2e",
    "d5f6b2847e6c7675a23d936772ca42c6c89a10f534f420d9f195b2ac7be4dcbe",
    "8490d4460237652d87cc1899d450af09357f044f97790e6451d86e1bcea2a7f2",
    "0f49df0be9a33d68cb49beda47a01c071d9ca44da37f011fce0728408d91f598",
    "277b6dccc84edba80980323030ff65457587d7002e7b231126afed7c95a9378d",
    "fe077d8eacfea3f5653e69c416f994b6c41883f665a9c7a5ab61469cd81956e3",
    "c80abd17acd8425b96c822022c506b604a94ee88f14d3c4bfd0b514909de4799",
    "4453c4cd7b2bde834acc6bf796c3d97fc4f10cec239cc6f276d9fa026d87c60c",
    "495dc0a1c316569b4989d835eaf342b4c687dd56592dc1ebcf78314245569c6c",
    "80c784f6900bc688b3b1bc752b049f0413ed05d48c51bb8266ded423c0aff8c7",
    "04e45f7a75f333be01e9ccd28e3ea69f4c1634bd32e939c0447f8c198c67535d",
    "7cf6f190389c9973987ddb4778eb120500d6e76d9d3be53f8294f23a5b6dffb4",
    "c6fae30f537f11e24c646c46274456cf0bfd89f1c59dc2a594cf1f6311532051",
    "3e83931d61cc092a02e2b1dbd623230e3a5c3ba160e0904cfa2d181692338bf7",
    "3ee9e1a68110559dc9792d42de651b63515df4f67ebcb8ed58a9c666a35b91d1",
    "e9b0e00dc344895ba6b379bc51a5b3d49c2dc09a5590ea09282a3ba81de38e5c",
    "8c0358d877418543467a189014eda8f170cc1406f429ab972a85c4807d75c8ac",
    "615af91e06bf03eafc15608d38dc585b3e5f66a6d95c1e639ae007678da20401",
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
