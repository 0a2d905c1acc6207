"""Attack class: a bootstrap peer that lies to a joining node about the genesis.

A node that joins with a bootstrap address learns the chain from what its peers serve
(``actors/genesis_exchange.py``). A hostile peer may serve another network's genesis
(refused by the pin, naming the peer), a reply too large to hold (cut off at the frame
bound, or by the field's bound within it), bytes that are no genesis, or a *second encoding*
of the honest genesis -- one that decodes to the same record but is not the bytes its hash
covers (refused: one pin, one byte string). Whatever it sends, the joiner gets a typed error
and an answer line naming the peer, never an exception of another kind.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import mutate

from gonka_p2p.actors.genesis_exchange import ask_bootstrap_peers, ask_genesis, choose_genesis
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.gossip.service import NetworkError, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis import GenesisError
from gonka_p2p.ledger.genesis_wire import MAX_GENESIS_BYTES, GenesisReply, genesis_bytes, genesis_from_bytes
from gonka_p2p.wire.protocols import GENESIS_PROTOCOL, frame_limits
from gonka_p2p.wire.schema import Malformed, Oversize, WireError
from gonka_p2p.wire.unsigned import FRAME_VERSION, encode_frame

GENESIS = devnet_genesis([Keypair.from_seed(b"hostile-genesis").public_key], [], chain_id="honest")
RAW = genesis_bytes(GENESIS)


async def _liar(hub: MemoryHub, reply: bytes) -> MemoryService:
    """A peer that answers every genesis request with ``reply``."""
    async def serve(opener: str, frame: bytes, send: SendFrame) -> None:
        await send(reply)

    service = hub.service(Keypair.from_seed(reply[:64]))
    service.set_stream_handler(GENESIS_PROTOCOL, serve)
    await service.start()
    return service


async def _ask(reply: bytes) -> None:
    hub = MemoryHub()
    liar = await _liar(hub, reply)
    asker = hub.service(Keypair.from_seed(b"joiner"))
    await asker.start()
    await asker.connect(liar.listen_addrs[0])
    await ask_genesis(asker, liar.peer_id, timeout=5.0)


async def test_a_reply_over_the_frame_bound_is_cut_off_before_it_is_read() -> None:
    with pytest.raises(NetworkError, match="exceeds"):  # the sender's stream is cut: the joiner sees a reset
        await _ask(b"\x00" * (frame_limits(GENESIS_PROTOCOL).reply + 1))


async def test_a_genesis_over_its_bound_inside_an_admitted_frame_is_refused() -> None:
    body = msgpack.packb([FRAME_VERSION, GenesisReply.KIND, GenesisReply.VERSION,
                          {"genesis": b"\x00" * (MAX_GENESIS_BYTES + 1)}], use_bin_type=True)
    assert len(body) <= frame_limits(GENESIS_PROTOCOL).reply
    with pytest.raises(Oversize):
        await _ask(body)
    with pytest.raises(Oversize):
        genesis_from_bytes(b"\x00" * (MAX_GENESIS_BYTES + 1))


@pytest.mark.parametrize("genesis", [b"\xc1", msgpack.packb({"chain_id": 7}), msgpack.packb([1, 2, 3]),
                                     RAW[:-1]], ids=["not-msgpack", "bad-field", "not-a-table", "truncated"])
async def test_bytes_that_are_no_genesis_are_malformed(genesis: bytes) -> None:
    with pytest.raises(Malformed):
        await _ask(encode_frame(GenesisReply(genesis=genesis)))


async def test_a_frame_of_another_kind_is_refused() -> None:
    with pytest.raises(WireError):
        await _ask(b"garbage")


def test_a_second_encoding_of_the_honest_genesis_is_refused() -> None:
    """Same record, other bytes: its receiver would pin-check a hash of bytes it never got."""
    reordered = msgpack.packb(dict(reversed(list(GENESIS.to_obj().items()))), use_bin_type=True)
    assert reordered != RAW and msgpack.unpackb(reordered) == msgpack.unpackb(RAW)
    with pytest.raises(Malformed, match="canonical"):
        genesis_from_bytes(reordered)


@given(st.data())
def test_corrupted_genesis_bytes_raise_a_wire_error_or_are_canonical(data: st.DataObject) -> None:
    corrupted = mutate(data, RAW)
    try:
        genesis = genesis_from_bytes(corrupted)
    except WireError:
        return
    assert genesis_bytes(genesis) == corrupted


async def test_a_joiner_names_the_lying_peer_and_takes_the_honest_one() -> None:
    hub = MemoryHub()
    other = devnet_genesis([Keypair.from_seed(b"other").public_key], [], chain_id="other")
    liar = await _liar(hub, encode_frame(GenesisReply(genesis=genesis_bytes(other))))
    junk = await _liar(hub, encode_frame(GenesisReply(genesis=b"\xc1")))
    honest = await _liar(hub, encode_frame(GenesisReply(genesis=RAW)))
    answers = await ask_bootstrap_peers([s.listen_addrs[0] for s in (liar, junk, honest)],
                                        lambda key, listen: hub.service(key), "/ip4/127.0.0.1/tcp/9000")
    assert [a.error != "" for a in answers] == [False, True, False]
    assert choose_genesis(answers, GENESIS.hash()) == GENESIS
    with pytest.raises(GenesisError) as e:
        choose_genesis(answers[:2], GENESIS.hash())
    assert f"bootstrap peer {liar.listen_addrs[0]} serves genesis {other.hash().hex()}" in str(e.value)
    assert f"bootstrap peer {junk.listen_addrs[0]} did not answer" in str(e.value)
    with pytest.raises(GenesisError, match="serve different genesis records"):
        choose_genesis(answers, None)  # unpinned, two stories: the joiner trusts neither
