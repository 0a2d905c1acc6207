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
    "414f326268a1ef91e36e4c354ca140509a9d85e97627a831d224785eab1eafed",
    "d71d78dde2a572542e7a1483bfb7c59ef075a6919c2097c64bbfe9bb223cb8da",
    "18026b2e26ee23aeddedff4ad968c1443038ebaca35f91bd8f3b0049c7b91e7f",
    "9d7dcae6a0c76452c454f85591fb4adf296024d57c6ba2dc7af763bd1080bb38",
    "98addfd2e9aa441c89ff9c27e1f548d5700011313cb824c5dfb0c186b5664dc4",
    "e7c25e50f78cc35cbb552fbf342e202dccbf3bc55bc9cee76aeb7368d2585889",
    "08daccd9e79aec41822a98318f2eb111f73ff23053a9ef9e43fe51ca4d022602",
    "ebdc7c4eae7477cab3bc7142cd3190bc9bc356b45ae8803844e0ff19395064ad",
    "0abf841738bfa0ed17c7fef5bbcb944557857dcef2d6a49e5229ba8109f7d4ca",
    "314ef1e35a605a11aa6a074eae16bbfd29bc11fe7b1920da01709de0256cd881",
    "f5df0546b2cd745c0f4c1ebb231d09ddebce35a6215a3957bb09dd87c086813f",
    "9f19170c5b41afef60da98e914254bbad4c22137bd35bf2f0f06079e635959ce",
    "dec6228520b8865c0efbc1e0b7edd5e5150f7bd0e8bdd389bd1788a2a8d00ee5",
    "6b1e4e17cb540f603d39e6a0b1e66307a7c8212cb7c4745d181325f3a230dfdf",
    "26bc8806082935466bff656c1956a52d5335e75f733102a549cefa86f0467c5b",
    "dc0b6b856569809130e0b48be913bb25434d50d207884dde5b5e786f131c276d",
    "c016d6da81ddafd77848c4c5f97300fd0db6cc2b2f258c7e6f99510d8190abb5",
    "587e8df5e19d505b06d098536e9cbbafde9b0f6e371a280039351c4affce0ea1",
    "a91f97ad171390cbc8b8888fcc02d67134c94afc2a07ee485bd21e6e818969e6",
    "e22e74cfbc022df1f3bdd9034b81a96e1e0fcbbf9274a7fe91653cb147856003",
    "bbd0d4eb4073ee0a3309c4a99ea08b0f2737467ed04bfc4e904796c76f5db7c4",
    "ed8ac10ad4a53d56b5a9cd5522f8da56e131956e1c424c32c4edcaef7dca479a",
    "5bc451e9900741e6c964f1a31515a60000b7097657bf581ed316af364b4bff40",
    "133893eef29f2b4691b64978e83d074090ca7fec4c318028377d2248bf2caef3",
    "4d7648fe19c552cb85075f7ea4ec630d44008c2ea4efe5fbbbd238cee10f7153",
    "8ff58cdb0b0eb552b239794cbdbd37877767b142e7fe8629565096cbadcc243a",
    "5b4aa487d7f16c35cd131e04387abc2e319067e85025af75f7351ea2a2fd904c",
    "96c2d393a007bd776ec0704730d8cb7a3d9e4b9dfb40cfd8d79b9f42805f89b8",
    "41c5d92ffea6c9ffa58adbad21fe4c07c4263068ae08e3e1f3c07997fd583964",
    "fc9aa6c2338d06f7058bdc8076aff4339414371282b08f2e9a66c96b0fd987b2",
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
    "9b0c9ec57cb9852b829415a5ff972b8606ab854f9cb2cb3124395ab4234a44d3",
    "968b1b408847857f7d0de7b0f6cea0f4061d06e2962aa3f63a1b067f2820299f",
    "83ca0dcc74e9f993f1b79a55535b68a947d272165c445abfa9c8b7be74961406",
    "856f6c0da90635931129eea5a8ebc0580795e767c14119068b6f653cbaead6b7",
    "1d5e14e06c31305047d9d2d210956d6355759a85460805bc2ef6e585cded219f",
    "64d0e33831de9a07f35586b34a281606b85104ea9202f02613046edda57d80ed",
    "08513401f78cd764afb0d5390fd8e70388f92eaee591e2dfb5590433dd475294",
    "1f2c3ec74db2e2332e96c596d7edbc598c9864f033ec7456f26b70be7a4eed6a",
    "74e84a38616e68f68267146d3d764c4078c2491afa4de18df7ffb95caf9c61e3",
    "7e79a72a0b2bc86c1aaac9eebc5e34c610838eb101cb8d7e0269847c2e3396da",
    "dc699a62a73a95ea16e5eb22bdd36dce88d3f9a357236c02636d5529aa18d18f",
    "c9d47cba620063328f20f248f78728ceb19b05ec2b96aca9738cf157c8b8f8e4",
    "7e992538264bfcc19bf13602912021fb57e9e8da7e10b012f1054e1f596d4d33",
    "11e291b11ecf90bf4791e63942257523a3c6c19f88c691d452b6fcd6f0864c96",
    "6d5051f6478fc852d10edf9fad934513f169ebcebb2faa56c909dcc7dd7a9180",
    "470003875f6a04a5e18093065dfa2355e3674720da43ebc715cae51da135e9de",
    "7ecd7d201ebc1622eac25bca8d815a7d3b35e83f76244b011b625d1f3eb8efdc",
    "ff5ff82d7d761476b9a6d26a34c81f254c5e1a3580246734470870978fd9ce2a",
    "80faddb5d1becb30769b803722f5504debe7e79844e9a56ed2b9dc7e232c774f",
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
