"""Libp2pService against real py-libp2p hosts on 127.0.0.1.

Behaviour only: gossip, request and stream rates are measured by
``benchmarks/netbench.py``, with one host per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from helpers import a_raising_handler_is_contained, eventually, free_port
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux

from gonka_p2p.gossip.libp2p_patches import DIAL_BACKOFF_S, TCP_USER_TIMEOUT_S
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.service import (
    AddressInUse,
    FrameTooLarge,
    NetworkError,
    PeerUnreachable,
    PublishError,
    SendFrame,
    StreamReset,
)
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.protocols import DEFAULT_FRAMES

pytestmark = [pytest.mark.libp2p]

Factory = Callable[..., Awaitable[Libp2pService]]


@pytest.fixture
async def make_host() -> AsyncIterator[Factory]:
    """Starts hosts with deterministic keys and stops them all after the test."""
    started: list[Libp2pService] = []
    counter = iter(range(1000))

    async def make(listen: str = "/ip4/127.0.0.1/tcp/0", key: Keypair | None = None) -> Libp2pService:
        svc = Libp2pService(key or Keypair.from_seed(b"host-%d" % next(counter)), listen)
        await svc.start()
        started.append(svc)
        return svc

    yield make
    await asyncio.gather(*(svc.stop() for svc in started))


async def link(a: Libp2pService, b: Libp2pService) -> None:
    assert await a.connect(b.listen_addrs[0]) == b.peer_id


async def echo(opener: str, request: bytes, send: SendFrame) -> None:
    await send(request)


# ---- identity, addresses, security ---------------------------------------


async def test_peer_id_is_the_keypair_identity_and_noise_is_the_only_security(make_host: Factory) -> None:
    key = Keypair.from_seed(b"identity")
    svc = await make_host(key=key)
    assert svc.peer_id == key.peer_id

    async def inspect() -> tuple[str, list[str], list[str]]:
        host = svc._host
        assert host is not None
        upgrader = host.get_network().upgrader  # type: ignore[attr-defined]
        return (
            host.get_id().to_base58(),
            [str(p) for p in upgrader.security_multistream.transports],
            [str(p) for p in upgrader.muxer_multistream.transports],
        )

    host_id, security, muxers = await svc._running().call(inspect)
    assert host_id == key.peer_id
    assert security == ["/noise"]
    assert muxers == ["/yamux/1.0.0"]
    [addr] = svc.listen_addrs
    assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{key.peer_id}")
    assert int(addr.split("/")[4]) > 0


async def test_connect_reports_peer_id_and_both_sides_see_the_connection(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    assert await a.connect(b.listen_addrs[0]) == b.peer_id
    await eventually(lambda: a.connected_peers() == [b.peer_id] and b.connected_peers() == [a.peer_id], what="peers")


def tcp_socket_of(layer: object, depth: int = 8) -> trio.socket.SocketType:
    """The TCP socket under a libp2p connection's layers (muxer, security, raw connection)."""
    if isinstance(layer, trio.SocketStream):
        return layer.socket
    for inner in vars(layer).values() if depth and hasattr(layer, "__dict__") else ():
        with contextlib.suppress(LookupError):
            return tcp_socket_of(inner, depth - 1)
    raise LookupError("no TCP socket")


async def test_both_ends_of_a_connection_bound_how_long_a_stall_lasts(make_host: Factory) -> None:
    """After a link outage TCP's retransmission backoff left connections stalled for tens of
    seconds (testnet runs 24, 25): every connection, dialed or accepted, ends once its data stays
    unacknowledged for ``TCP_USER_TIMEOUT_S`` and probes an idle peer."""
    a, b = await make_host(), await make_host()
    await link(a, b)
    await eventually(lambda: b.connected_peers() == [a.peer_id], what="b sees a")

    def options(svc: Libp2pService, peer: str) -> Callable[[], Awaitable[tuple[int, int]]]:
        async def read() -> tuple[int, int]:
            [conn] = svc._t_host().get_network().get_connections(ID.from_base58(peer))
            sock = tcp_socket_of(conn)
            return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        return read

    for svc, peer in ((a, b.peer_id), (b, a.peer_id)):  # the dialer's end and the listener's
        assert await svc._running().call(options(svc, peer)) == (TCP_USER_TIMEOUT_S * 1000, 1)


async def test_address_in_use(make_host: Factory) -> None:
    a = await make_host()
    taken = a.listen_addrs[0].split("/p2p/")[0]
    b = Libp2pService(Keypair.from_seed(b"second"), taken)
    with pytest.raises(AddressInUse, match="already in use"):
        await b.start()
    await b.stop()  # idempotent on a service that never started


async def test_dial_dead_port_or_unknown_peer_is_unreachable(make_host: Factory) -> None:
    a = await make_host()
    ghost = Keypair.from_seed(b"ghost").peer_id
    with pytest.raises(PeerUnreachable, match="cannot connect") as refused:
        await a.connect(f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{ghost}", timeout=5)
    assert "timed out" not in str(refused.value)  # a refused dial fails at once, not at the timeout
    with pytest.raises(PeerUnreachable, match="/p2p/"):
        await a.connect("/ip4/127.0.0.1/tcp/1")
    with pytest.raises(PeerUnreachable, match="no known addresses|No known addresses"):
        await a.request(Keypair.from_seed(b"stranger").peer_id, "/echo/1", b"x", timeout=5)
    with pytest.raises(PeerUnreachable, match="not a valid peer id"):
        await a.request("not-a-peer-id", "/echo/1", b"x")


# ---- gossip ----------------------------------------------------------------


async def test_burst_of_500_reaches_every_subscriber_without_loss(make_host: Factory) -> None:
    """Line A - B - C: B gets the burst directly, C only through B's forwarding."""
    a, b, c = await make_host(), await make_host(), await make_host()
    received: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": [], "c": []}
    for name, svc in (("a", a), ("b", b), ("c", c)):

        async def handler(sender: str, data: bytes, name: str = name) -> None:
            received[name].append((sender, data))

        await svc.subscribe("burst", handler)
    await link(a, b)
    await link(b, c)
    await eventually(lambda: set(b.topic_peers("burst")) == {a.peer_id, c.peer_id}, what="subscriptions")
    await eventually(lambda: a.topic_peers("burst") == [b.peer_id] and c.topic_peers("burst") == [b.peer_id])

    n = 500
    sent = [b"burst-%04d" % i for i in range(n)]
    for data in sent:
        await a.publish("burst", data)
    await eventually(lambda: len(received["b"]) >= n and len(received["c"]) >= n, timeout=30, what="delivery")
    await asyncio.sleep(0.3)  # late duplicates or echoes would show up here

    for name in ("b", "c"):
        assert len(received[name]) == n, f"{name} got {len(received[name])} messages"
        assert sorted(data for _, data in received[name]) == sent
        assert {sender for sender, _ in received[name]} == {a.peer_id}
    assert received["a"] == []  # our own messages never come back to us

    async def scores(svc: Libp2pService) -> list[tuple[float, bool, bool]]:
        pubsub = svc._pubsub
        assert pubsub is not None
        scorer = pubsub.router.scorer  # type: ignore[attr-defined]
        return [
            (scorer.score(p, ["burst"]), scorer.allow_publish(p, ["burst"]), scorer.is_graylisted(p, ["burst"]))
            for p in pubsub.peers
        ]

    for svc in (a, b, c):
        for score, may_publish, graylisted in await svc._running().call(scores, svc):
            assert score == 0 and may_publish and not graylisted


async def test_a_peer_subscribed_to_nothing_costs_a_publisher_no_log_and_a_small_queue(
        make_host: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """A client speaks gossip but subscribes to nothing. py-libp2p 0.8.1 queued every message
    for it "until its subscription arrives" (100 per peer, for 30 s) and logged a WARNING for
    each one past that: 99 % of every participant's log in testnet run 10, and one line per
    message per connected stranger -- a full disk for whoever opens enough identities."""
    from gonka_p2p.gossip.libp2p_gossipsub import PENDING_PER_PEER

    a, b, client = await make_host(), await make_host(), await make_host()
    received: list[bytes] = []

    async def handler(sender: str, data: bytes) -> None:
        received.append(data)

    await a.subscribe("t", handler)
    await b.subscribe("t", handler)
    await link(a, b)
    await link(client, a)
    await eventually(lambda: a.topic_peers("t") == [b.peer_id], what="subscriptions")
    n = 200
    with caplog.at_level(logging.WARNING, logger="libp2p"):
        for i in range(n):
            await a.publish("t", b"m%d" % i)
        await eventually(lambda: len(received) == n, what="delivery")

    async def pending() -> dict[str, int]:
        pubsub = a._pubsub
        assert pubsub is not None
        return {p.to_base58(): len(q) for p, q in pubsub.router._pending_messages.items()}  # type: ignore[attr-defined]

    assert [r.getMessage() for r in caplog.records if r.name == "libp2p.pubsub.gossipsub"] == []
    assert all(size <= PENDING_PER_PEER for size in (await a._running().call(pending)).values())


async def test_validator_rejects_before_delivery_and_forwarding(make_host: Factory) -> None:
    """Line A - B - C where B rejects "bad" messages: neither B nor C ever sees one."""
    a, b, c = await make_host(), await make_host(), await make_host()
    seen_by_validator: list[tuple[str, bytes]] = []
    got: dict[str, list[bytes]] = {"b": [], "c": []}

    def b_validator(sender: str, data: bytes) -> bool:
        seen_by_validator.append((sender, data))
        if data == b"explode":
            raise ValueError("validators must not raise; this one does")
        return not data.startswith(b"bad")

    async def on_b(sender: str, data: bytes) -> None:
        got["b"].append(data)

    async def on_c(sender: str, data: bytes) -> None:
        got["c"].append(data)

    await b.subscribe("votes", on_b, b_validator)
    await c.subscribe("votes", on_c, lambda sender, data: True)
    await link(a, b)
    await link(b, c)
    await eventually(lambda: a.topic_peers("votes") == [b.peer_id] and c.peer_id in b.topic_peers("votes"))

    messages = [b"bad-1", b"good-1", b"explode", b"bad-2", b"good-2", b"good-last"]
    for data in messages:
        await a.publish("votes", data)
    await eventually(lambda: b"good-last" in got["c"] and b"good-last" in got["b"], what="good messages")
    await asyncio.sleep(1.5)  # past a heartbeat, so gossip (IHAVE/IWANT) had its chance too

    assert sorted(got["b"]) == [b"good-1", b"good-2", b"good-last"]
    assert sorted(got["c"]) == [b"good-1", b"good-2", b"good-last"]
    assert sorted(data for _, data in seen_by_validator) == sorted(messages)
    assert {sender for sender, _ in seen_by_validator} == {a.peer_id}


async def test_publish_raises_instead_of_dropping(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    with pytest.raises(PublishError, match="no peer is subscribed"):
        await a.publish("lonely", b"x")
    await link(a, b)
    await b.subscribe("other", echo_handler)
    await eventually(lambda: a.topic_peers("other") == [b.peer_id])
    with pytest.raises(PublishError, match="no peer is subscribed"):
        await a.publish("nobody-here", b"x")
    with pytest.raises(PublishError, match="use a stream"):
        await a.publish("other", b"x" * 2_000_000)
    await a.publish("other", b"fine")  # the same host can publish where someone listens


async def echo_handler(sender: str, data: bytes) -> None:
    pass


async def test_a_gossip_handler_that_raises_is_logged_and_the_service_goes_on(
        make_host: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """A handler runs on a peer's bytes: when one raised, the service stopped, so any peer
    that found a message a handler chokes on could stop a node with it (a replayed message
    id once let such bytes past the announce validator). The error is logged, the message
    dropped, and the next one handled."""
    a, b = await make_host(), await make_host()

    async def linked() -> None:
        await link(a, b)
        await eventually(lambda: a.topic_peers("t") == [b.peer_id])

    owner = await a_raising_handler_is_contained(a, b, caplog, "gonka_p2p.gossip.libp2p_service", linked)
    await b.stop()
    await owner  # a clean stop returns without raising


# ---- streams ---------------------------------------------------------------


async def test_a_gossip_frame_that_is_not_an_rpc_resets_that_stream_not_the_node(make_host: Factory) -> None:
    """py-libp2p's pubsub raised DecodeError out of its stream handler, which crashed the trio
    loop: two testnet participants exited on one truncated frame each."""
    from libp2p.custom_types import TProtocol
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11

    from gonka_p2p.gossip.libp2p_service import _parse_peer_id

    a, b = await make_host(), await make_host()
    b.set_stream_handler("/upper/1", echo)
    await link(a, b)

    async def send_garbage() -> None:
        stream = await a._t_host().new_stream(_parse_peer_id(b.peer_id), [TProtocol(PROTOCOL_ID_V11)])
        await stream.write(b"\x08\xff\xff\xff\xff\xff\xff\xff\xff")  # a length, then no valid RPC
        await stream.close()

    for _ in range(3):
        await a._running().call(send_garbage)
        assert await a.request(b.peer_id, "/upper/1", b"still here") == b"still here"
    await asyncio.sleep(0)
    assert not b._owner.closed  # type: ignore[union-attr]


async def test_request_response(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    openers: list[str] = []

    async def upper(opener: str, request: bytes, send: SendFrame) -> None:
        openers.append(opener)
        await send(request.upper())

    b.set_stream_handler("/upper/1", upper)
    await link(a, b)
    assert await a.request(b.peer_id, "/upper/1", b"hello") == b"HELLO"
    assert openers == [a.peer_id]

    for i in range(50):  # a new stream each
        assert await a.request(b.peer_id, "/upper/1", b"ping %d" % i) == b"PING %d" % i

    with pytest.raises(StreamReset, match="does not serve"):
        await a.request(b.peer_id, "/nobody/1", b"x", timeout=5)


async def test_stream_of_many_small_frames_and_of_1_mib_frames(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()

    async def count(opener: str, request: bytes, send: SendFrame) -> None:
        for i in range(int(request)):
            await send(b"token %d" % i)

    async def blobs(opener: str, request: bytes, send: SendFrame) -> None:
        blob = bytes(1 << 20)
        for _ in range(int(request)):
            await send(blob)

    b.set_stream_handler("/count/1", count)
    b.set_stream_handler("/blobs/1", blobs)
    await link(a, b)
    frames = [f async for f in a.open_stream(b.peer_id, "/count/1", b"300")]
    assert frames == [b"token %d" % i for i in range(300)]
    assert [f async for f in a.open_stream(b.peer_id, "/count/1", b"0")] == []

    n_blobs = 48
    total = 0
    async for frame in a.open_stream(b.peer_id, "/blobs/1", b"%d" % n_blobs):
        assert len(frame) == 1 << 20
        total += len(frame)
    assert total == n_blobs << 20


async def test_a_reader_gives_credit_back_per_half_window_not_per_frame(
        make_host: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """py-libp2p 0.8.1 answered about every second read of a small frame with a WINDOW_UPDATE
    frame (its "partial slack" branch): a third of a token stream reader's CPU. Credit now goes
    back once half the window is read, and a stream several windows long still completes."""
    a, b = await make_host(), await make_host()
    updates: list[int] = []
    real_update = yamux.YamuxStream.send_window_update

    async def counted(stream: yamux.YamuxStream, increment: int, skip_lock: bool = False) -> None:
        if stream.conn.peer_id.to_base58() == b.peer_id:  # a's reads of b's frames
            updates.append(increment)
        await real_update(stream, increment, skip_lock)

    monkeypatch.setattr(yamux.YamuxStream, "send_window_update", counted)
    frame = bytes(300)

    async def tokens(opener: str, request: bytes, send: SendFrame) -> None:
        for _ in range(int(request)):
            await send(frame)

    b.set_stream_handler("/tokens/1", tokens)
    await link(a, b)
    n = 3000  # 0.9 MB: several windows
    assert [f async for f in a.open_stream(b.peer_id, "/tokens/1", b"%d" % n)] == [frame] * n
    half_window = yamux.DEFAULT_WINDOW_SIZE // 2
    assert 1 <= len(updates) <= n * len(frame) // half_window + 2, updates


async def test_handler_raising_resets_the_stream(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()

    async def broken(opener: str, request: bytes, send: SendFrame) -> None:
        await send(b"partial")
        raise RuntimeError("handler bug")

    async def silent(opener: str, request: bytes, send: SendFrame) -> None:
        pass

    b.set_stream_handler("/broken/1", broken)
    b.set_stream_handler("/silent/1", silent)
    await link(a, b)
    frames: list[bytes] = []
    with pytest.raises(StreamReset):
        async for frame in a.open_stream(b.peer_id, "/broken/1", b"go"):
            frames.append(frame)
    assert frames in ([], [b"partial"])  # a reset may discard frames the opener has not read yet
    with pytest.raises(StreamReset):
        await a.request(b.peer_id, "/broken/1", b"go")
    with pytest.raises(StreamReset, match="without a response"):
        await a.request(b.peer_id, "/silent/1", b"go")


async def test_oversized_frames(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    handler_errors: list[BaseException] = []

    async def too_big(opener: str, request: bytes, send: SendFrame) -> None:
        try:
            await send(bytes(DEFAULT_FRAMES.reply + 1))
        except FrameTooLarge as e:
            handler_errors.append(e)
            raise

    async def lying_header(stream) -> None:  # a peer that does not play by the rules
        await stream.read(4096)
        await stream.write(struct.pack(">I", DEFAULT_FRAMES.reply + 1) + b"x" * 100)

    async def install() -> None:
        assert b._host is not None
        b._host.set_stream_handler("/liar/1", lying_header)

    b.set_stream_handler("/too-big/1", too_big)
    await b._running().call(install)
    await link(a, b)

    with pytest.raises(FrameTooLarge):
        await a.request(b.peer_id, "/too-big/1", bytes(DEFAULT_FRAMES.request + 1))
    with pytest.raises(StreamReset):
        await a.request(b.peer_id, "/too-big/1", b"go")
    assert len(handler_errors) == 1
    with pytest.raises(FrameTooLarge, match="announced"):
        await a.request(b.peer_id, "/liar/1", b"go")
    assert await a.connect(b.listen_addrs[0]) == b.peer_id  # the connection survived


async def test_peer_stopping_mid_stream_is_a_reset_and_silence_is_a_timeout(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    never = asyncio.Event()

    async def stall(opener: str, request: bytes, send: SendFrame) -> None:
        await send(b"first")
        await never.wait()

    b.set_stream_handler("/stall/1", stall)
    await link(a, b)

    with pytest.raises(TimeoutError):
        async for _ in a.open_stream(b.peer_id, "/stall/1", b"go", timeout=0.5):
            pass

    frames = a.open_stream(b.peer_id, "/stall/1", b"go", timeout=20)
    assert await anext(frames) == b"first"
    stopper = asyncio.create_task(b.stop())
    with pytest.raises(StreamReset):  # a hang would end in TimeoutError after the stream's 20 s
        await anext(frames)
    await stopper


async def test_peer_crashing_mid_stream_is_a_reset_not_a_hang(make_host: Factory) -> None:
    """The server's sockets die under it (as when its process is killed): no libp2p goodbye."""
    a, b = await make_host(), await make_host()
    never = asyncio.Event()

    async def stall(opener: str, request: bytes, send: SendFrame) -> None:
        await send(b"first")
        await never.wait()

    async def crash() -> None:
        assert b._host is not None
        for conns in b._host.get_network().get_connections_map().values():
            for conn in conns:
                session = conn.muxed_conn.secured_conn  # yamux -> noise -> raw TCP
                tcp = session.conn.read_writer.read_write_closer.stream.stream
                tcp.socket.shutdown(socket.SHUT_RDWR)

    b.set_stream_handler("/stall/1", stall)
    await link(a, b)
    frames = a.open_stream(b.peer_id, "/stall/1", b"go", timeout=20)
    assert await anext(frames) == b"first"
    await b._running().call(crash)
    with pytest.raises(StreamReset):  # a hang would end in TimeoutError after the stream's 20 s
        await anext(frames)
    await eventually(lambda: b.peer_id not in a.connected_peers(), what="a to notice the dead connection")


@pytest.mark.parametrize("asked_while_down", [False, True])
async def test_open_stream_dials_a_known_peer_after_it_restarts(make_host: Factory, asked_while_down: bool) -> None:
    """Asked while it was down too: py-libp2p's negative dial cache then refused every dial to
    it for 60 s -- in the short testnet, clients cut off from a restarting TA could not recover
    their answers from it for a minute; here the dial waits ``DIAL_BACKOFF_S`` at most."""
    a = await make_host()
    key, port = Keypair.from_seed(b"restarts"), free_port()
    b = await make_host(f"/ip4/127.0.0.1/tcp/{port}", key)
    await link(a, b)
    await b.stop()
    await eventually(lambda: a.connected_peers() == [], what="disconnect")
    if asked_while_down:
        with pytest.raises(NetworkError):
            await a.request(key.peer_id, "/echo/1", b"anyone?", timeout=3)
    b2 = await make_host(f"/ip4/127.0.0.1/tcp/{port}", key)
    b2.set_stream_handler("/echo/1", echo)
    await eventually(lambda: answers(a, key.peer_id), timeout=4 * DIAL_BACKOFF_S, what="a dial after the backoff",
                     interval=0.2)
    assert b2.connected_peers() == [a.peer_id]


async def test_a_peer_connected_to_long_ago_is_dialed_again_after_it_restarts(make_host: Factory) -> None:
    """Testnet run 17: py-libp2p's ``host.connect`` sets a peer's address TTL to 120 s whatever
    ours was, so a client connected to its TA for longer than that found "No known addresses"
    when the TA restarted, and failed every request to it until the client was made again."""
    from gonka_p2p.gossip.libp2p_service import _parse_peer_id

    a = await make_host()
    key, port = Keypair.from_seed(b"restarts late"), free_port()
    b = await make_host(f"/ip4/127.0.0.1/tcp/{port}", key)
    await link(a, b)

    async def three_hours_pass() -> None:
        a._t_host().get_peerstore().peer_data_map[_parse_peer_id(key.peer_id)].last_identified -= 3 * 3600

    await a._running().call(three_hours_pass)
    await b.stop()
    await eventually(lambda: a.connected_peers() == [], what="disconnect")
    b2 = await make_host(f"/ip4/127.0.0.1/tcp/{port}", key)
    b2.set_stream_handler("/echo/1", echo)
    await eventually(lambda: answers(a, key.peer_id), timeout=4 * DIAL_BACKOFF_S, what="a dial to the restarted peer",
                     interval=0.2)


async def test_connect_dials_the_address_it_is_given_not_one_it_knew_before(make_host: Factory) -> None:
    """py-libp2p dials the first address its peerstore lists for a peer, one per transport,
    whatever address ``connect`` was given: after one failed dial at a dead address (a lying
    executor's first one), or once a peer came back at another port, the peer could never be
    dialed again where it now listens."""
    a = await make_host()
    key = Keypair.from_seed(b"moves")
    b = await make_host(key=key)
    with pytest.raises(PeerUnreachable):
        await a.connect(f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{key.peer_id}", timeout=5)
    await link(a, b)
    await b.stop()
    await eventually(lambda: a.connected_peers() == [], what="disconnect")
    moved = await make_host(key=key)  # the same peer, at another port
    moved.set_stream_handler("/echo/1", echo)
    await link(a, moved)
    assert await answers(a, key.peer_id)


async def answers(a: Libp2pService, peer_id: str) -> bool:
    """Whether ``peer_id`` echoes a request from ``a`` now."""
    try:
        return await a.request(peer_id, "/echo/1", b"back again", timeout=3) == b"back again"
    except NetworkError:
        return False


async def test_abandoning_a_stream_does_not_leak(make_host: Factory) -> None:
    a, b = await make_host(), await make_host()
    b.set_stream_handler("/echo/1", echo)

    async def endless(opener: str, request: bytes, send: SendFrame) -> None:
        while True:
            await send(b"more")

    b.set_stream_handler("/endless/1", endless)
    await link(a, b)
    for _ in range(20):
        async with contextlib.aclosing(a.open_stream(b.peer_id, "/endless/1", b"go")) as frames:
            async for frame in frames:
                assert frame == b"more"
                break
    assert await a.request(b.peer_id, "/echo/1", b"still fine") == b"still fine"
    await eventually(lambda: b._gate.open_streams == 0, what="server streams to end")


async def test_abandoning_streams_mid_frame_keeps_the_connection(make_host: Factory) -> None:
    """Abandoning a stream cancels the writer that serves it, often in the middle of a frame.
    py-libp2p then left the noise session one ciphertext out of step and the peer dropped the
    whole connection ("Failed authentication of message"); frames are now written whole."""
    a, b = await make_host(), await make_host()
    b.set_stream_handler("/echo/1", echo)
    big = b"x" * 300_000  # several noise messages and yamux frames per stream frame

    async def flood(opener: str, request: bytes, send: SendFrame) -> None:
        while True:
            await send(big)

    b.set_stream_handler("/flood/1", flood)
    await link(a, b)
    for _ in range(10):
        async with contextlib.aclosing(a.open_stream(b.peer_id, "/flood/1", b"go")) as frames:
            async for frame in frames:
                assert frame == big
                break
    assert await a.request(b.peer_id, "/echo/1", b"still fine") == b"still fine"
    await eventually(lambda: b._gate.open_streams == 0, what="server streams to end")


def test_a_frame_write_finishes_through_a_cancellation_and_a_stuck_one_closes_the_connection() -> None:
    """WholeFrameYamux on trio's virtual clock, over a stand-in connection: a cancelled writer
    still writes its whole frame (then sees the cancellation); a write the peer never drains
    closes the connection after FRAME_WRITE_TIMEOUT instead of hanging."""
    import trio
    import trio.testing
    from libp2p.io.exceptions import ConnectionClosedError

    from gonka_p2p.gossip.libp2p_yamux import FRAME_WRITE_TIMEOUT, WholeFrameYamux

    class SlowConnection:
        def __init__(self, takes: float) -> None:
            self.takes, self.written, self.closed = takes, [], False

        async def write(self, data: bytes) -> None:
            await trio.sleep(self.takes)
            self.written.append(data)

        async def close(self) -> None:
            self.closed = True

    def muxer(takes: float) -> WholeFrameYamux:
        m = object.__new__(WholeFrameYamux)  # only what _write_frame touches
        m._write_lock, m.secured_conn, m.peer_id = trio.Lock(), SlowConnection(takes), "peer"
        return m

    async def cancelled_mid_frame() -> tuple[list[bytes], bool]:
        m = muxer(takes=1.0)
        with trio.move_on_after(0.1) as scope:
            await m._write_frame(b"frame")
        return m.secured_conn.written, scope.cancelled_caught

    async def never_drained() -> tuple[float, bool]:
        m = muxer(takes=float("inf"))
        started = trio.current_time()
        with pytest.raises(ConnectionClosedError):
            await m._write_frame(b"frame")
        return trio.current_time() - started, m.secured_conn.closed

    written, cancelled = trio.run(cancelled_mid_frame, clock=trio.testing.MockClock(autojump_threshold=0))
    assert written == [b"frame"] and cancelled
    waited, closed = trio.run(never_drained, clock=trio.testing.MockClock(autojump_threshold=0))
    assert waited == pytest.approx(FRAME_WRITE_TIMEOUT) and closed


def test_noise_messages_that_arrive_together_share_one_tcp_read() -> None:
    """py-libp2p reads a noise message as its 2-byte length, then its body: two recv calls per
    yamux frame. The read-ahead connection serves both, and the next messages, from one recv,
    in order, and still reports the end of the connection."""
    import trio
    import trio.testing
    from libp2p.io.utils import read_exactly

    from gonka_p2p.gossip.libp2p_yamux import ReadAheadTCPStream

    messages = [b"message %d " % i * (i % 7 + 1) for i in range(100)]
    wire = b"".join(struct.pack(">H", len(m)) + m for m in messages)

    async def scenario() -> tuple[list[bytes], int, bytes]:
        send, receive = trio.testing.memory_stream_one_way_pair()
        recvs = 0
        real_receive = receive.receive_some

        async def counted(max_bytes: int | None = None) -> bytes:
            nonlocal recvs
            recvs += 1
            return await real_receive(max_bytes)

        receive.receive_some = counted  # type: ignore[method-assign]
        conn = ReadAheadTCPStream(receive)  # type: ignore[arg-type]
        await send.send_all(wire)
        read = []
        for _ in messages:
            (length,) = struct.unpack(">H", await read_exactly(conn, 2))
            read.append(await read_exactly(conn, length))
        await send.aclose()
        return read, recvs, await conn.read(2)

    read, recvs, at_end = trio.run(scenario)
    assert read == messages
    assert recvs == 1  # was 200: one per length prefix and one per body
    assert at_end == b""


def test_publishing_waits_for_outbound_room_but_not_twice_for_a_stalled_peer() -> None:
    """wait_for_room on stand-in queues: waits while a queue drains, gives up on a stuck one once.
    On trio's virtual clock, so the waits are exact."""
    import types

    import trio
    import trio.testing

    from gonka_p2p.gossip.libp2p_patches import OUTBOUND_HIGH_WATER, GossipPubsub

    queues = {"draining": [0] * OUTBOUND_HIGH_WATER, "stuck": [0] * OUTBOUND_HIGH_WATER, "idle": []}
    fake = types.SimpleNamespace(peer_queues=queues, _stalled=set())

    async def scenario() -> list[tuple[list[str], float]]:
        async def drain() -> None:
            await trio.sleep(0.2)
            queues["draining"].clear()

        results = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            for _ in range(2):
                started = trio.current_time()
                ready = await GossipPubsub.wait_for_room(fake, ["draining", "stuck", "idle"], 0.5)  # type: ignore[arg-type]
                results.append((sorted(ready), trio.current_time() - started))
        return results

    virtual = trio.testing.MockClock(autojump_threshold=0)
    (first, first_wait), (second, second_wait) = trio.run(scenario, clock=virtual)
    assert first == second == ["draining", "idle"]
    assert 0.5 <= first_wait < 0.51 and second_wait == 0  # the full timeout once, then not again
    assert fake._stalled == {"stuck"}
    queues["stuck"].clear()
    assert trio.run(GossipPubsub.wait_for_room, fake, ["stuck"], 0.5) == ["stuck"]  # type: ignore[arg-type]
    assert fake._stalled == set()


class FrameRecorder:
    """Stands in for a yamux connection: records the frames a stream writes."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes]] = []  # (type, flags, payload)
        self.finalized = False

    async def _write_frame(self, frame: bytes) -> None:
        import trio

        _version, kind, flags, _stream_id, _length = struct.unpack(yamux.YAMUX_HEADER_FORMAT, frame[:12])
        self.frames.append((kind, flags, frame[12:]))
        await trio.sleep(0)

    async def _finalize_stream(self, stream: object, fully_closed: bool) -> None:
        self.finalized = fully_closed

    def data(self) -> bytes:
        return b"".join(payload for kind, _flags, payload in self.frames if kind == yamux.TYPE_DATA)

    def reset_sent(self) -> bool:
        return any(flags & yamux.FLAG_RST for _kind, flags, _payload in self.frames)


def test_concurrent_writes_to_one_stream_arrive_each_whole() -> None:
    """py-libp2p 0.8.1 took the stream's write lock per yamux frame, not per write: two tasks
    writing to one stream (gossipsub's sending loop and its flush of pending messages, both to the
    same peer) interleaved their frames whenever a message outgrew the send window, and the peer
    read a corrupt, length-prefixed RPC (testnet run 10: two participants exited on one)."""
    import trio
    import trio.testing

    from gonka_p2p.gossip.libp2p_yamux import WholeMessageStream

    async def scenario() -> bytes:
        conn = FrameRecorder()
        stream = WholeMessageStream(1, conn, is_initiator=True)  # type: ignore[arg-type]
        stream.send_window = 10
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.write, b"A" * 25)
            nursery.start_soon(stream.write, b"B" * 25)
            while len(conn.data()) < 50:  # the peer's credit, 10 bytes at a time
                await trio.sleep(0.05)
                stream.send_window += 10
        return conn.data()

    data = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert data in (b"A" * 25 + b"B" * 25, b"B" * 25 + b"A" * 25), data


def test_a_write_cut_short_resets_the_stream_and_one_not_begun_does_not() -> None:
    """A write cancelled (or timed out waiting for credit) after part of its message went out left
    the stream open in py-libp2p 0.8.1: the peer read the next message's bytes as the rest of
    this one. Such a stream is now reset, so the peer sees a reset, not a corrupt message; a
    write that sent nothing leaves the stream as it was."""
    import trio
    import trio.testing

    from gonka_p2p.gossip.libp2p_yamux import WholeMessageStream

    async def scenario(window: int) -> tuple[FrameRecorder, WholeMessageStream]:
        conn = FrameRecorder()
        stream = WholeMessageStream(1, conn, is_initiator=True)  # type: ignore[arg-type]
        stream.send_window = window
        with trio.move_on_after(1.0):
            await stream.write(b"x" * 25)
        return conn, stream

    clock = trio.testing.MockClock(autojump_threshold=0)
    conn, stream = trio.run(scenario, 10, clock=clock)
    assert conn.data() == b"x" * 10
    assert conn.reset_sent() and stream.closed and conn.finalized

    conn, stream = trio.run(scenario, 0, clock=clock)
    assert conn.frames == []
    assert not stream.closed


def test_the_dial_book_restores_remembered_addresses_and_forgets_the_oldest_peer_past_its_bound() -> None:
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    from gonka_p2p.gossip.dial_book import PEER_ADDR_TTL, DialBook

    class Peerstore:
        def __init__(self) -> None:
            self.added: list[tuple[ID, list[Multiaddr], int]] = []
            self.cleared: ID | None = None

        def add_addrs(self, peer: ID, addrs: list[Multiaddr], ttl: int) -> None:
            if self.cleared == peer:  # the remembered addresses replace the others
                self.added.append((peer, list(addrs), ttl))
            self.cleared = None

        def clear_addrs(self, peer: ID) -> None:
            self.cleared = peer

    store, book = Peerstore(), DialBook(max_peers=2)
    peers = [ID(b"peer-%d" % i) for i in range(3)]
    addrs = [[Multiaddr(f"/ip4/127.0.0.1/tcp/{4000 + i}")] for i in range(3)]
    for peer, at in zip(peers, addrs):
        book.remember(store, peer, at)  # type: ignore[arg-type]
    store.added.clear()
    for peer in peers:
        book.restore(store, peer)  # type: ignore[arg-type]
    assert store.added == [(peers[1], addrs[1], PEER_ADDR_TTL), (peers[2], addrs[2], PEER_ADDR_TTL)]


# ---- hostile gossip peers ------------------------------------------------------------------


async def in_trio(service: Libp2pService, fn: Callable[[], object]) -> object:
    """``fn()`` run in ``service``'s network thread (py-libp2p's state lives there)."""
    async def call() -> object:
        return fn()
    return await service._running().call(call)


async def send_rpc(sender: Libp2pService, to: Libp2pService, rpc: object) -> None:
    """Write ``rpc`` on ``sender``'s gossip stream to ``to`` as a hostile peer's own code would,
    then wait until ``to`` has handled it: a later RPC on the same stream subscribes ``sender``
    to a marker topic, and ``to`` reads the RPCs of one stream in order, control included."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    to_id = ID.from_base58(to.peer_id)
    await eventually(lambda: in_trio(sender, lambda: to_id in sender._t_pubsub().peers), what="a gossip stream")
    marker = f"marker-{id(rpc)}"

    async def write() -> None:
        pubsub = sender._t_pubsub()
        assert await pubsub.write_msg(pubsub.peers[to_id], rpc)
        assert await pubsub.write_msg(pubsub.peers[to_id], rpc_pb2.RPC(
            subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=marker)]))

    await sender._running().call(write)
    await eventually(lambda: sender.peer_id in to.topic_peers(marker), what="the RPC handled")


async def test_a_replayed_message_id_with_other_data_still_meets_the_topic_validator(make_host: Factory) -> None:
    """Attack: py-libp2p cached each message's validation result for 300 s under its id
    (sender + seqno, not the data) but forgets having *seen* the id after 120 s. In between, a
    peer re-publishes its own earlier valid message's seqno with other data, correctly signed:
    not seen, signature good, "valid" from the cache -- the validator never ran and the
    handler got bytes it rejects (the directory's raised, and that stopped the node)."""
    victim, attacker = await make_host(), await make_host()
    handled: list[bytes] = []

    async def handler(sender: str, data: bytes) -> None:
        handled.append(data)

    await victim.subscribe("t", handler, lambda sender, data: data.startswith(b"valid"))
    await link(attacker, victim)
    await eventually(lambda: attacker.topic_peers("t") == [victim.peer_id], what="subscription")
    seqno_before = await in_trio(attacker, lambda: attacker._t_pubsub().counter)
    await attacker.publish("t", b"valid 1")
    await eventually(lambda: handled == [b"valid 1"], what="the valid message")
    await in_trio(victim, lambda: victim._t_pubsub().seen_messages.cache.clear())  # its 120 s are up

    def replay_the_same_seqno() -> None:  # the attacker's own code: same seqno, nothing remembered
        pubsub = attacker._t_pubsub()
        pubsub.counter = seqno_before
        pubsub.seen_messages.cache.clear()
        pubsub.router.equivocation_detection.clear()  # type: ignore[attr-defined]

    await in_trio(attacker, replay_the_same_seqno)
    await attacker.publish("t", b"rejected by the validator")
    await attacker.publish("t", b"valid 2")
    await eventually(lambda: b"valid 2" in handled, what="the message after the replay")
    assert handled == [b"valid 1", b"valid 2"]


def _signed_record_for_a_throwaway_key(addr: str) -> tuple[bytes, bytes]:
    """(peer id bytes, signed peer record envelope) of a fresh key that claims to listen at ``addr``."""
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.envelope import seal_record
    from libp2p.peer.id import ID
    from libp2p.peer.peer_record import PeerRecord
    from multiaddr import Multiaddr

    pair = create_new_key_pair()
    peer = ID.from_pubkey(pair.public_key)
    envelope = seal_record(PeerRecord(peer, [Multiaddr(addr)]), pair.private_key)
    return peer.to_bytes(), envelope.marshal_envelope()


async def test_a_prunes_peer_exchange_makes_us_dial_nobody_and_the_auto_connector_only_our_own_peers(
        make_host: Factory) -> None:
    """Attack: a PRUNE may carry "peer exchange" records, and py-libp2p 0.8.1 dialed every one
    (16 per PRUNE, any number of PRUNEs per RPC) whatever ``do_px`` says, with no score gate.
    Any connected peer aimed our dials where it liked (a victim's address: a reflector; its
    sybils: an eclipse), past the directory's rules on whom to dial, and filled our peerstore
    with entries py-libp2p's auto-connector redials every 30 s -- as it redials any address
    the peerstore learns. The records are dropped; the auto-connector dials only peers this
    host was asked to connect to."""
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from multiaddr import Multiaddr

    victim, attacker, friend = await make_host(), await make_host(), await make_host()
    dialed = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dialed
        dialed += 1
        writer.close()

    target = await asyncio.start_server(count, "127.0.0.1", 0)  # stands in for a third party's server
    port = target.sockets[0].getsockname()[1]
    try:
        await link(attacker, victim)
        records = [_signed_record_for_a_throwaway_key(f"/ip4/127.0.0.1/tcp/{port}") for _ in range(32)]
        prunes = [rpc_pb2.ControlPrune(topicID=f"any-{k}", peers=[
            rpc_pb2.PeerInfo(peerID=peer, signedPeerRecord=record) for peer, record in records[16 * k:16 * k + 16]])
            for k in range(2)]
        await send_rpc(attacker, victim, rpc_pb2.RPC(control=rpc_pb2.ControlMessage(prune=prunes)))
        await asyncio.sleep(0.2)  # a dial's TCP handshake reaching the server
        assert dialed == 0, f"one RPC from a peer made the victim dial an address it named {dialed} times"

        await link(victim, friend)
        await friend.stop()  # a peer we connected to, gone: the auto-connector's to redial
        stranger = ID.from_pubkey(create_new_key_pair().public_key)

        async def candidates() -> list[ID]:
            network = victim._t_host().get_network()
            network.peerstore.add_addrs(stranger, [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], 7200)  # identify's way
            return await network.auto_connector._get_candidate_peers()  # type: ignore[attr-defined]

        await eventually(lambda: friend.peer_id not in victim.connected_peers(), what="the friend gone")
        assert await victim._running().call(candidates) == [ID.from_base58(friend.peer_id)]
    finally:
        target.close()


async def test_prunes_for_topics_without_a_mesh_leave_nothing_behind(make_host: Factory) -> None:
    """Attack: py-libp2p filed a backoff entry under every topic a PRUNE names, known here or
    not, for as long as it asks, and never removed a topic from the table: one 1 MiB RPC of
    20,000 PRUNEs for made-up topics left 20,000 entries for good, after the peer left."""
    from libp2p.pubsub.pb import rpc_pb2

    victim, attacker = await make_host(), await make_host()
    await link(attacker, victim)
    prunes = [rpc_pb2.ControlPrune(topicID=f"no-such-topic-{i}", backoff=2**40) for i in range(20_000)]
    await send_rpc(attacker, victim, rpc_pb2.RPC(control=rpc_pb2.ControlMessage(prune=prunes)))
    router = victim._t_pubsub().router
    assert await in_trio(victim, lambda: (len(router.back_off), len(router.graft_flood_tracking))) == (0, 0)  # type: ignore[attr-defined]


def test_a_prunes_backoff_is_clamped_and_swept_once_it_runs_out() -> None:
    """The backoff a PRUNE for a meshed topic asks for is capped (2**40 s was kept as asked),
    and expired entries go at the next heartbeat, the topic's table with them."""
    import time

    import trio
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    from gonka_p2p.gossip.libp2p_gossipsub import MAX_PRUNE_BACKOFF_S, gossip_router

    router = gossip_router()
    peer = ID.from_base58(Keypair.from_seed(b"pruner").peer_id)
    router.mesh["t"] = {peer}
    trio.run(router.handle_prune, rpc_pb2.ControlPrune(topicID="t", backoff=2**40), peer)
    assert peer not in router.mesh["t"]
    assert router.back_off["t"][peer] <= time.time() + MAX_PRUNE_BACKOFF_S
    router.back_off["t"][peer] = int(time.time()) - 1  # ran out
    router.mesh.clear()  # (a mesh's upkeep needs a running pubsub)
    router.mesh_heartbeat()
    assert router.back_off == {}


def test_the_equivocation_check_keeps_a_digest_not_each_message() -> None:
    """Attack: upstream kept up to 1,000 forwarded messages whole for its equivocation check;
    a funded key's transaction batches (1 MB each, every one valid against the committed
    state) held a gigabyte on every node. A digest of what the check compares is kept."""
    from libp2p.pubsub.pb import rpc_pb2

    from gonka_p2p.gossip.libp2p_gossipsub import gossip_router

    router = gossip_router()
    big = rpc_pb2.Message(from_id=b"sender", seqno=b"\x00" * 8, data=b"x" * 1_000_000, topicIDs=["/t"])
    assert router._check_equivocation(big)
    assert router._check_equivocation(big)  # the same message again (another forwarder)
    held = sum(len(v) for v in router.equivocation_detection.values())  # type: ignore[arg-type]
    assert held <= 64
    for other in (rpc_pb2.Message(from_id=b"sender", seqno=b"\x00" * 8, data=b"y" * 1_000_000, topicIDs=["/t"]),
                  rpc_pb2.Message(from_id=b"sender", seqno=b"\x00" * 8, data=b"x" * 1_000_000, topicIDs=["/u"])):
        assert not router._check_equivocation(other)  # same id, other content: an equivocation
