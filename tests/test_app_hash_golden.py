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
    "c2b1301817bdaabe5efecdcdd034dde50fd93b0d92188961af301ad72288f805",
    "892d65ca0ba28b16514d79130089e4aabd93b027b452319a7675e1078aa83d87",
    "335e52d071e1683adc36e2b7cba712023af213a9560789206e84e2f9d997c177",
    "318b397d69849be162eaddb17c2601f33a3012c7086464804e72fd24fd8c0761",
    "3dabbd66a5f8ede87e7af0df0f2b782081b830f59298d38792e621b8204ee82e",
    "13bf0457c9c95a9628e047cc4fee1b157a66371c63d89824fdc0d89ee72bd811",
    "0f25b93603108c25e5cddbe959852a829d84f4a3001820bdf7bbc3ee51cff2fe",
    "84e32297a6b2a3eca4e512b24d6959798a135b3425a22408b060fdb53d6b42c0",
    "f9f7605806c9e2e6f11a32d6bd476246dd6437aa3bc0e2b5954995c84ad7479d",
    "85bd3b606a790adc1b5e50a8929e2cc1a79b016b9b3c6a5f7ac279f18c2e24d4",
    "13a0e9ef947b072517a236e56929447b4700d7918a99f6c3b03b0f8f7e95c862",
    "042f013d73f893346a5242d67c014e30c2b5f9ff5f94a753967d51b7aa998391",
    "47e9fa9ce40fed524961370ae423859f8729ebf609147fe24057140a0010c440",
    "87c39406dc7827025e3f26354298d8e7e8149ecaf537b8a78b7e6313100a5c7c",
    "d040b40d1beac7601767bc3510eb6bfc341c98107de83c53febe555054f61ac6",
    "30bee078ce91ab77884665963fd36f81c9f68fcefd381e0a9e46381a13774b08",
    "def1057bd92b070cec0e13d18618fd8daa7e0bf2cb1eed5ca367689652b84039",
    "37b252073a4b70610fd41d4ae054349439cfd6d53fd754a68aadbd6ddc5d7ff7",
    "caa6451868f2b694885b6fc2f7dd8df7fdb27eed9416edeb53abc70222569a12",
    "83770ac10ba169785e0daaf7125527d4170d23f251c85c18d575ef79862d2c33",
    "803c555ddb53ad5d1e5707f6e08be97e7c77f3ebc971fc7609fd5c6e4a5ab3d6",
    "564555b3cf189bf197dc75ae114debef9f36b564e0fa46d4f9ddda3d252f9d25",
    "63936dcf969d9e5d8a8ff835c98c5f6b24f998f345381a58eb63c665e8a31e3e",
    "8ae283a353df21709d3c4018f7a584ca3a2322f2613146f892dceae1b7e9ba64",
    "2feb4dd2aa27181dedeac5f4ef0bce55d109fb1aa64c25373709fcf0828c4ed1",
    "466c21cc71b89740ce127a5d96e4676a06366295d117002d67925de7952833a7",
    "a8a9e2b4b8dee382772ca4e578fb7c2b842e5f2a7e2e1307fd38216c6a3fcbc0",
    "7f2ac671ca16f71bac7bad4cc624d0cdc1fa67a0dd2d94395d740b0e1c70a4ff",
    "25863512e58f7d21184d74207f03b93308da9d74bcd6a235a92bdbee0214b8b6",
    "12ffcf29d483ad4a3b54739cfcebbe496bb6e33656d8a609bbb61bdc743f61e8",
    "649a523cc779322f758fac618cfb231186f1f03dce7e69e9d08ebc971c64e11c",
    "ec9b5a9a2850f4eebb852e03ec7416a11c5cfd980ae89d7a292cb092ae862635",
    "5c3025184f9370bfea78931ed881f90d5c87ab2fdebbccb9cb54d8b6da564514",
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
    "02ba5eb9e971337fcc9580198d58593d58897549d75926f624d81ff64c57cb30",
    "52f703c8847eeffa3deed52638ca069dbe2c493ffccadb970e2e0eb10e10fc83",
    "eb1c2342584106d982fb2df2ea908972f14975d5165ae1dcbe289c541d2b1a67",
    "ea32bb4e83b6fc2001c08e4a8590d3a52e86f8b0f91e7e361043fa74b025450e",
    "50d1e86d86f370ff7bfa7eb8bb330b6c745cde1fc465496d908dc7320ba767b6",
    "7d96f7a0f1fdb9b9e0cf2d07cd9c24a6302259c99cb7029d382c3b5cb04a4d4c",
    "45cc846d3d11fea6527a1c48a6535383d267b502b042db173be47524314a3796",
    "0cb1bee40405f02becf9ffde01ac6fa7aa7c0bec03e264fd5aa50811fcd6332a",
    "b9d871130eb3c3d62348b91229fb0a314f9a3bdf43b7ae54410e2ff900af9eae",
    "3f8c15d55c1f9fcc1dd227598e0fbfb0d6ba7654ba5afb29ed34fbd63c8d0a96",
    "303afd1dba7d3078fab35641f6628437d06d28cbae39defdb65150162207ceca",
    "d6f6c3442b4b8581b88a1c9cfb45ff22a42d0562dc31c5fae6881c6cc6340eb0",
    "ff078c3830e370de94a8c035bc5429686cbeffc7e8163b65a2c373e8e93acda2",
    "3e80b81d6395212a7971bd214476d275ff832b8495372d956d28fcbe9c48167c",
    "9f9680809ff7630ec1ca449d7e74fa5ec466576be64174df467aa01b009419c5",
    "0e3f9bd7521422fb190a1edb330c872b8605ba4c8c9dfa46e945a3fdee09b82a",
    "89964ccdd214e48ef50fc32092329d38c22df93fd8b512e1f7a859862fc78ea7",
    "4218d6be1ea80e91a098688652bdcf63368c343304fb3461c89a6dd16e6c6190",
    "2b78a039c85463d005fcec5d6c73c4fec9beb4d6005b60039fa670c87c5fb736",
    "592017bbbb1106b26be6ceb63b4e943547a8c56f95b40efdea612e63895db2d3",
    "fa5b841084c8d5aef1e30a89967da18200786401556dac4f2b860ed83973352a",
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
