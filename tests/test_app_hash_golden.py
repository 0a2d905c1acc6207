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

from ledger_driver import BAD, OK, LedgerDriver

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
    """The golden ledger, recording the app hash after each block."""

    def __init__(self) -> None:
        super().__init__(LedgerState.from_genesis(golden_genesis()), KEYS, "ta", MODEL)
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
    d = Driver()
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
    "206095072c6a902a62537206551f7658968e03c9d9c11975bb0b2aa1be6e1eae",
    "c3f7c3fb79ff872d7bcdee2841e921522b70a0be93c8580c069b06bbd1189117",
    "c4717feb1ec166d34a336d5a6fcbc59eeee26444551e0bc841f7c0f4d48ca414",
    "194bd7384f0d9a6328032d6be2cb61d2293105283f7b6ede5faa34d455b0225d",
    "8e0cfce65ed2c7309bfecb4e06be9899709a25ea1b092cfb02f27ec41c398ead",
    "3ebd59e2e2c04a4e464ab65e03652a0b761ee126830db000bd0bb440d4c58011",
    "55621f3ecbafe95729946180ce7a9427a5efc7491ead0551dee4515975a7f69a",
    "638822235d41aa19eb7b47a1f67dbadfa5ab18719807555ae5b55a4b639cc4db",
    "d2e4b92f3e28726917dfba2f596a43aef5ae0c70daeb8fba5ce22e02c848951b",
    "66bbbe5a5f0a335560ebfe206af9a3e91dac179e739ffcac0ce3bda83789d948",
    "977b5831071554ee96a03e286ff42a2a6c5328670853d770926d969d5e80e145",
    "f9fe8149e0adc732c08a3d8f41b6dfc4a4a90e7f3f680e046b43a4b86a85b288",
    "dfd958b32dff1a42c017975cfb3cd3f42b961bd43c698b4280b9d55fcfd06697",
    "41a14cef618b0a40c6a7045f714d0458c002322c99e1f6cd9a17da0dbf46236d",
    "a5bf0619f08b990cbde2b9ecb55c2e5a4b31beffddecc8a9f49153d876e6482b",
    "ff08b3e024f72d2d2deb01107c49c302bee06cd28680060e65c247e0cdbbd82c",
    "91cfb69ddbfca6cd3d56a8e9b358721f8eb8730da3f670059f4167a407dd2359",
    "2f5afd3a9d1b0d19ca0b5550f10885cbe3b2e7d43631befff5151a61c3fc1588",
    "3131fb73be998cd04741cb96dc77384fc4662c2c0ca90d70efb57e1b9c6ba4de",
    "1817fd315087718a7add5b2123f299c57d575ae328ce2ad5309d55dcdb1d895e",
    "188d4404fb6900115e4cff9775540cab0aa1c33e2cacd95e3911bb005f1cd71d",
    "52995516118c4cb034fea85c5dfc8ff4eff8b64e96bce2d8b2617b4fb8a39a77",
    "28e0dd13b60ab9e85543f2f4ee9f1e1ef77c1ad0646e43daf2e5dc5fe21a4248",
    "3990697d9b26ec5b3e8a66805fc496950878a9770e4e7dcd46b35934120214a4",
    "342869e445e16925737ddaa74784d9965139146fc15ae25c5f096eddd1def862",
    "e4c02f73aa7c6b757e0af4bb0e1f0e5e335293562fa7971a4144265f96c8b5ea",
    "bee2d2a75434ebb74d9f3450a5207f29900341cd2a9f7d5e869c8fba64f79142",
    "52bf050f3dd32f1d71f1119f991c7c70bd835076828dbff42b3ab35e1edc668d",
    "fd36c6fdc506f2deb738c909388f781613dd9ded9e012cd7db16195f3e280526",
    "a254e45c6d36388aad4fc3cebfc2e761ee8bdd9b05b0c8ab3e11ff1bc1f741b9",
    "f0d930b48dce27df3a14dbaf16c08d389c7e191dc0788177bdeff382e6cdf3f8",
    "ba213d145939315f78b8418576b6bd1d5575903a7869bd5bd21f1979afd136dd",
    "99cba5952382f8abef6362f0ceca9448b0fbe6c6aef2ceaef7d3fb388e5ce0b6",
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
