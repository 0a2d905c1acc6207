"""Attack class: costing a node memory through the network layer before anything is
verified. Frames are bounded per protocol from their length prefix (an 8 MiB request
cost 558 MiB before its signature was checked), gossip messages per topic before their
validator decodes them, and inbound streams per peer, per protocol and by rate, in both
network services, so one peer over its limits cannot crowd out the others."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
import trio
from helpers import eventually
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from gonka_p2p.gossip import libp2p_streams
from gonka_p2p.gossip.inbound import InboundGate, InboundLimits
from gonka_p2p.gossip.libp2p_patches import Topic
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.gossip.service import FrameTooLarge, NetworkService, PublishError, SendFrame, StreamHandler, StreamReset
from gonka_p2p.identity import Keypair
from gonka_p2p.wire import protocols
from gonka_p2p.wire.protocols import ANNOUNCE_TOPIC, INFO_PROTOCOL, frame_limits, topic_max_bytes

TIGHT = InboundLimits(streams_total=16, streams_per_peer=3, streams_per_protocol=2,
                      requests_per_s=1000.0, request_burst=1000)
SLOW = InboundLimits(requests_per_s=0.01, request_burst=3)


# ---- frames and messages: declared per protocol, refused before they are read ------------


def test_every_protocol_and_topic_declares_its_bounds_in_the_table() -> None:
    ids = {v for k, v in vars(protocols).items() if k.endswith("_PROTOCOL")}
    topics = {v for k, v in vars(protocols).items() if k.endswith("_TOPIC")}
    assert ids == set(protocols.STREAMS) and topics == set(protocols.TOPICS)
    assert frame_limits(INFO_PROTOCOL).request <= 4096  # asking for the network's state is small
    assert topic_max_bytes(ANNOUNCE_TOPIC) <= 8192


class _HostileStream:
    """A stream whose peer announces a frame of ``length`` bytes and would send them all."""

    def __init__(self, length: int) -> None:
        self.pending = bytearray(struct.pack(">I", length))
        self.asked = 0

    async def read(self, n: int) -> bytes:
        self.asked += n
        chunk = bytes(self.pending[:n]) or b"x" * n
        del self.pending[:n]
        return chunk


def test_a_frame_over_its_bound_is_refused_from_its_length_prefix() -> None:
    limit = frame_limits(INFO_PROTOCOL).request
    stream = _HostileStream(8 * 1024 * 1024)
    with pytest.raises(FrameTooLarge):
        trio.run(libp2p_streams.read_frame, stream, limit)
    assert stream.asked == 4  # the header, and not a byte of the payload


@pytest.mark.libp2p
async def test_an_oversized_request_never_reaches_the_handler_over_libp2p() -> None:
    a, b = Libp2pService(Keypair.from_seed(b"net-a")), Libp2pService(Keypair.from_seed(b"net-b"))
    served: list[int] = []

    async def info(opener: str, request: bytes, send: SendFrame) -> None:
        served.append(len(request))
        await send(b"ok")

    b.set_stream_handler(INFO_PROTOCOL, info)
    await a.start()
    await b.start()
    try:
        await a.connect(b.listen_addrs[0])
        too_long = bytes(frame_limits(INFO_PROTOCOL).request + 1)
        with pytest.raises(FrameTooLarge):  # an honest opener refuses to send it
            await a.request(b.peer_id, INFO_PROTOCOL, too_long)

        async def hostile() -> bytes:  # one that does not check
            assert a._host is not None
            stream = await a._host.new_stream(ID.from_base58(b.peer_id), [TProtocol(INFO_PROTOCOL)])
            await libp2p_streams.write(stream, struct.pack(">I", len(too_long)) + too_long)
            return await stream.read(64)

        with pytest.raises(Exception):  # noqa: B017 - py-libp2p reports the reset in several types
            await a._running().call(hostile)
        assert served == []
        assert await a.request(b.peer_id, INFO_PROTOCOL, b"") == b"ok"  # the connection survived
        assert served == [0]
    finally:
        await asyncio.gather(a.stop(), b.stop())


def test_an_oversized_gossip_message_is_dropped_before_its_validator_decodes_it() -> None:
    decoded: list[int] = []

    def validator(sender: str, data: bytes) -> bool:
        decoded.append(len(data))
        return True

    service = Libp2pService(Keypair.from_seed(b"gossip-receiver"))
    validate = service._validator_for(Topic(lambda s, d: asyncio.sleep(0), validator))
    sender = ID.from_base58(Keypair.from_seed(b"gossip-sender").peer_id)
    for size in (topic_max_bytes(ANNOUNCE_TOPIC) + 1, topic_max_bytes(ANNOUNCE_TOPIC)):
        msg = rpc_pb2.Message(from_id=sender.to_bytes(), data=bytes(size), topicIDs=[ANNOUNCE_TOPIC])
        validate(sender, msg)
    assert decoded == [topic_max_bytes(ANNOUNCE_TOPIC)]


async def test_the_memory_service_bounds_frames_and_messages_as_libp2p_does() -> None:
    hub = MemoryHub()
    a, b = await _pair(hub)
    b.set_stream_handler(INFO_PROTOCOL, _answer)
    await b.subscribe(ANNOUNCE_TOPIC, _ignore)
    with pytest.raises(FrameTooLarge):
        await a.request(b.peer_id, INFO_PROTOCOL, bytes(frame_limits(INFO_PROTOCOL).request + 1))
    with pytest.raises(PublishError):
        await a.publish(ANNOUNCE_TOPIC, bytes(topic_max_bytes(ANNOUNCE_TOPIC) + 1))


# ---- streams: per peer, per protocol and by rate -----------------------------------------


async def _answer(opener: str, request: bytes, send: SendFrame) -> None:
    await send(b"ok")


async def _ignore(sender: str, data: bytes) -> None:
    pass


async def _pair(hub: MemoryHub, *seeds: bytes) -> tuple[MemoryService, ...]:
    services = tuple(hub.service(Keypair.from_seed(s)) for s in (seeds or (b"mem-a", b"mem-b")))
    for s in services:
        await s.start()
    for s in services[:-1]:
        await s.connect(services[-1].listen_addrs[0])
    return services


@contextlib.asynccontextmanager
async def _held(service: NetworkService, peer: str, protocol: str) -> AsyncIterator[None]:
    """A stream held open after its first frame (the server stalls); StreamReset if refused."""
    async with contextlib.aclosing(service.open_stream(peer, protocol, b"go", timeout=10)) as frames:
        assert await anext(frames) == b"first"
        yield


def _staller(done: asyncio.Event) -> StreamHandler:
    """A handler that sends one frame and then holds its stream until ``done``."""

    async def stall(opener: str, request: bytes, send: SendFrame) -> None:
        await send(b"first")
        await done.wait()

    return stall


async def _streams_are_limited_per_peer_and_protocol(
        attacker: NetworkService, honest: NetworkService, server: NetworkService) -> None:
    done = asyncio.Event()
    server.set_stream_handler("/stall/1", _staller(done))
    server.set_stream_handler("/other/1", _staller(done))
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(_held(attacker, server.peer_id, "/stall/1"))
        with pytest.raises(StreamReset):  # per peer and protocol
            await held.enter_async_context(_held(attacker, server.peer_id, "/stall/1"))
        await held.enter_async_context(_held(attacker, server.peer_id, "/other/1"))
        with pytest.raises(StreamReset):  # per peer
            await held.enter_async_context(_held(attacker, server.peer_id, "/other/1"))
        for _ in range(2):  # another peer is unaffected
            await held.enter_async_context(_held(honest, server.peer_id, "/stall/1"))
    done.set()
    await eventually(lambda: server._gate.open_streams == 0, what="the held streams to end")  # type: ignore[attr-defined]
    assert await attacker.request(server.peer_id, "/stall/1", b"go") == b"first"  # its slots came back


async def test_memory_streams_are_limited_per_peer_and_protocol() -> None:
    attacker, honest, server = await _pair(MemoryHub(limits=TIGHT), b"attacker", b"honest", b"server")
    await _streams_are_limited_per_peer_and_protocol(attacker, honest, server)


@pytest.mark.libp2p
async def test_libp2p_streams_are_limited_per_peer_and_protocol() -> None:
    attacker, honest = Libp2pService(Keypair.from_seed(b"attacker")), Libp2pService(Keypair.from_seed(b"honest"))
    server = Libp2pService(Keypair.from_seed(b"server"), limits=TIGHT)
    for s in (attacker, honest, server):
        await s.start()
    try:
        await attacker.connect(server.listen_addrs[0])
        await honest.connect(server.listen_addrs[0])
        await _streams_are_limited_per_peer_and_protocol(attacker, honest, server)
    finally:
        await asyncio.gather(attacker.stop(), honest.stop(), server.stop())


async def test_a_peer_over_its_request_rate_is_refused_and_others_are_not() -> None:
    attacker, honest, server = await _pair(MemoryHub(limits=SLOW), b"attacker", b"honest", b"server")
    server.set_stream_handler(INFO_PROTOCOL, _answer)
    for _ in range(SLOW.request_burst):
        assert await attacker.request(server.peer_id, INFO_PROTOCOL, b"") == b"ok"
    with pytest.raises(StreamReset, match="faster than"):
        await attacker.request(server.peer_id, INFO_PROTOCOL, b"")
    assert await honest.request(server.peer_id, INFO_PROTOCOL, b"") == b"ok"


# ---- the honest side of those limits: an opener waits for a slot instead of being refused ----


async def _more_streams_than_a_listener_admits_all_complete(opener: NetworkService, server: NetworkService) -> None:
    """A transfer agent relays more clients to one executor than the executor admits per
    protocol: its streams wait for slots and all complete. Refused, they were resets the
    opener could not tell from a crash (30 of 128 relayed clients got no frame at all)."""
    admitted = InboundLimits().streams_per_protocol
    open_now, all_admitted = 0, asyncio.Event()

    async def held_until_every_slot_is_taken(peer: str, request: bytes, send: SendFrame) -> None:
        nonlocal open_now
        open_now += 1
        if open_now >= admitted:  # the listener's limit is reached: every slot is held at once
            all_admitted.set()
        await all_admitted.wait()
        for i in range(3):
            await send(request + b"-%d" % i)
        open_now -= 1

    server.set_stream_handler("/many/1", held_until_every_slot_is_taken)

    async def one(i: int) -> list[bytes]:
        return [f async for f in opener.open_stream(server.peer_id, "/many/1", b"%d" % i, timeout=30)]

    answers = await asyncio.gather(*(one(i) for i in range(admitted + 16)))
    assert answers == [[b"%d-%d" % (i, k) for k in range(3)] for i in range(admitted + 16)]
    assert all_admitted.is_set()

    async def holds_forever(peer: str, request: bytes, send: SendFrame) -> None:
        await send(b"first")
        await asyncio.Event().wait()

    server.set_stream_handler("/stall/1", holds_forever)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(admitted):
            frames = await held.enter_async_context(
                contextlib.aclosing(opener.open_stream(server.peer_id, "/stall/1", b"go", timeout=30)))
            assert await anext(frames) == b"first"
        with pytest.raises(TimeoutError, match="would refuse one more /stall/1 stream"):  # bounded, and said why
            await opener.request(server.peer_id, "/stall/1", b"go", timeout=0.5)
    assert await one(0) == [b"0-0", b"0-1", b"0-2"]  # every slot came back


async def test_an_opener_over_a_memory_listeners_limits_waits_for_slots() -> None:
    opener, server = await _pair(MemoryHub())
    await _more_streams_than_a_listener_admits_all_complete(opener, server)


@pytest.mark.libp2p
async def test_an_opener_over_a_libp2p_listeners_limits_waits_for_slots() -> None:
    opener, server = Libp2pService(Keypair.from_seed(b"relay")), Libp2pService(Keypair.from_seed(b"executor"))
    for s in (opener, server):
        await s.start()
    try:
        await opener.connect(server.listen_addrs[0])
        await _more_streams_than_a_listener_admits_all_complete(opener, server)
    finally:
        await asyncio.gather(opener.stop(), server.stop())


# ---- gossip: a flood while a topic's handler is busy --------------------------------------


@pytest.mark.libp2p
async def test_a_flood_while_the_handler_is_busy_holds_at_most_a_few_messages_per_peer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: py-libp2p starts one task per inbound gossip message and reads on, and each task
    waited for a delivery slot *before* its signature was checked. Once a busy handler held
    every slot, each further message -- unsigned junk included, up to 1 MiB -- was held by a
    waiting task, as many as the peer sent. Junk is refused before the wait, and at most
    ``WAITING_PER_PEER`` of one forwarder's signed messages wait. (DELIVERY_SLOTS cut to 4.)"""
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    from gonka_p2p.gossip import libp2p_patches

    monkeypatch.setattr(libp2p_patches, "DELIVERY_SLOTS", 4)
    victim = Libp2pService(Keypair.from_seed(b"flood-victim"))
    attacker = Libp2pService(Keypair.from_seed(b"flood-attacker"))
    await victim.start()
    await attacker.start()
    busy = asyncio.Event()
    try:
        async def slow_handler(sender: str, data: bytes) -> None:
            await busy.wait()  # a handler that is behind (a long consensus step, a slow disk)

        await victim.subscribe("flood", slow_handler)
        await attacker.connect(victim.listen_addrs[0])
        await eventually(lambda: attacker.topic_peers("flood") == [victim.peer_id], what="subscription")
        for i in range(4):  # honest-looking messages take every slot
            await attacker.publish("flood", b"valid %d" % i)
        slots = victim._topics["flood"].slots

        async def waiting() -> int:
            async def count() -> int:
                return slots.statistics().tasks_waiting if slots.value == 0 else -1
            return await victim._running().call(count)

        await eventually(waiting, until=lambda w: w == 0, what="the slots taken")
        victim_id, me = ID.from_base58(victim.peer_id), ID.from_base58(attacker.peer_id).to_bytes()

        async def flood(signed: bool) -> None:
            pubsub = attacker._t_pubsub()
            key = attacker._t_host().get_private_key()
            for batch in range(20):
                msgs = [rpc_pb2.Message(from_id=me, seqno=(10 * batch + k).to_bytes(8, "big") + b"%d" % signed,
                                        data=bytes(50_000), topicIDs=["flood"]) for k in range(10)]
                for msg in msgs if signed else ():
                    msg.signature = key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
                assert await pubsub.write_msg(pubsub.peers[victim_id], rpc_pb2.RPC(publish=msgs))

        await attacker._running().call(flood, False)  # unsigned: refused before any wait
        await attacker._running().call(flood, True)  # signed by the attacker's own key
        limit = libp2p_patches.WAITING_PER_PEER
        await eventually(waiting, until=lambda w: w >= limit, what="the signed flood arriving")
        await asyncio.sleep(0.5)
        assert await waiting() == limit
    finally:
        busy.set()
        await asyncio.gather(victim.stop(), attacker.stop())


# ---- streams: throw-away identities holding silent streams ---------------------------------


def test_strangers_share_their_part_of_the_slots_and_keep_the_standing_they_were_admitted_with() -> None:
    known = {"participant"}
    gate = InboundGate(InboundLimits(streams_total=8, streams_per_peer=2, streams_per_protocol=2,
                                     streams_strangers=4), lambda peer: peer in known)
    for sybil in ("s1", "s2"):
        assert gate.admit(sybil, "/p", 0.0) is None and gate.admit(sybil, "/p", 0.0) is None
    assert "does not know" in (gate.admit("s3", "/p", 0.0) or "")  # strangers' part taken
    assert gate.admit("participant", "/p", 0.0) is None and gate.admit("participant", "/p", 0.0) is None
    known.add("s1")  # the ledger changes while s1's streams are open: they still count as a stranger's
    gate.release("s1", "/p")
    assert gate.admit("s1", "/p", 0.0) is None
    assert "does not know" in (gate.admit("s3", "/p", 0.0) or "")
    gate.release("s1", "/p"), gate.release("s1", "/p")
    assert gate.admit("s3", "/p", 0.0) is None  # their slots came back to the strangers


@pytest.mark.libp2p
async def test_four_throwaway_identities_holding_silent_streams_lock_no_participant_out() -> None:
    """Attack: InboundLimits keeps one peer from taking every slot (64 of 256), but not four:
    a key costs nothing, and a stream that sends no request holds its slot for
    REQUEST_READ_TIMEOUT (30 s), then is simply opened again. Four identities opening 64
    silent streams each left no inbound stream for anyone -- the ledger's sync, the serving
    path, every protocol -- for as long as they kept it up. Strangers now share
    ``streams_strangers`` of the slots; a peer the victim's ledger knows keeps the rest."""
    from gonka_p2p.gossip.service import NetworkError

    limits = InboundLimits()
    victim = Libp2pService(Keypair.from_seed(b"slots-victim"))
    honest = Libp2pService(Keypair.from_seed(b"slots-honest"))
    sybils = [Libp2pService(Keypair.from_seed(b"slots-sybil-%d" % i))
              for i in range(limits.streams_total // limits.streams_per_peer)]
    hosts = [victim, honest, *sybils]
    for host in hosts:
        await host.start()
    try:
        victim.set_stream_handler("/audit/query/1", _answer)
        victim.set_stream_handler("/audit/other/1", _answer)  # a node serves a dozen protocols
        victim.set_vouched(lambda peer: peer == honest.peer_id)  # its ledger knows the honest peer
        await honest.connect(victim.listen_addrs[0])
        assert await honest.request(victim.peer_id, "/audit/query/1", b"?") == b"ok"
        for sybil in sybils:
            await sybil.connect(victim.listen_addrs[0])

            async def open_silent(sybil: Libp2pService = sybil) -> None:
                host = sybil._t_host()
                for k in range(limits.streams_per_peer):  # negotiated, then nothing: no request frame
                    protocol = "/audit/query/1" if k < limits.streams_per_protocol else "/audit/other/1"
                    with contextlib.suppress(Exception):  # refused once strangers' part is taken: go on
                        await host.new_stream(ID.from_base58(victim.peer_id), [TProtocol(protocol)])

            await sybil._running().call(open_silent)

        async def open_streams() -> int:
            async def count() -> int:
                return victim._gate.open_streams
            return await victim._running().call(count)

        await eventually(open_streams, until=lambda n: n >= limits.streams_strangers, timeout=20,
                         what="the sybils' streams admitted")
        try:
            assert await honest.request(victim.peer_id, "/audit/query/1", b"?", timeout=5) == b"ok"
        except NetworkError as e:
            pytest.fail(f"an honest peer is refused while four throw-away identities hold silent streams: {e!r}")
    finally:
        await asyncio.gather(*(host.stop() for host in hosts))
