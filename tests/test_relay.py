"""A peer behind a NAT, reached through a circuit relay v2: real py-libp2p hosts on 127.0.0.1.

One process, three hosts: a public relay, a peer "behind a NAT" (it reserves
a slot on the relay, announces only the circuit through it, and then stops
listening: like a NATed host, it can dial out and cannot be dialed) and a
public peer that is given nothing but that circuit address. Each test checks
that the connection it got is a relayed one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from helpers import eventually

from gonka_p2p.gossip import relay as relay_module
from gonka_p2p.gossip.libp2p_patches import close_connections
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.gossip.relay import RelayOptions, is_circuit, is_relayed
from gonka_p2p.gossip.service import NetworkError, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.testnet import netns
from gonka_p2p.testnet.invariants import judge_nat
from gonka_p2p.testnet.manifest import ManifestError, parse_manifest
from gonka_p2p.wire.protocols import DEFAULT_FRAMES

pytestmark = [pytest.mark.libp2p]

PROTOCOL = "/test/echo/1"  # any protocol: DEFAULT_FRAMES limits apply
TOPIC = "test-relay"


async def echo(opener: str, request: bytes, send: SendFrame) -> None:
    await send(request)


def relayed_to(service: Libp2pService, peer: str) -> list[bool]:
    """For each connection ``service`` holds to ``peer``: does it run through a relay?"""
    host = service._host  # noqa: SLF001 - the test inspects the transport under the service
    assert host is not None
    return [is_relayed(c) for p, conns in host.get_network().get_connections_map().items()
            if p.to_base58() == peer for c in conns]


async def stop_listening(service: Libp2pService) -> None:
    """Close ``service``'s listeners: its connections stay, nobody can dial it any more (a NAT)."""

    async def close() -> None:
        for listener in service._t_host().get_network().listeners.values():  # noqa: SLF001
            await listener.close()

    await service._running().call(close)  # noqa: SLF001


@pytest.fixture
async def trio_of_hosts() -> AsyncIterator[tuple[Libp2pService, Libp2pService, Libp2pService]]:
    relay = Libp2pService(Keypair.from_seed(b"relay"), relay=RelayOptions(hop=True))
    await relay.start()
    natted = Libp2pService(Keypair.from_seed(b"natted"),
                           relay=RelayOptions(hop=False, reserve_on=(relay.listen_addrs[0],)))
    dialer = Libp2pService(Keypair.from_seed(b"dialer"))
    try:
        await natted.start()
        await stop_listening(natted)
        await dialer.start()
        yield relay, natted, dialer
    finally:
        await asyncio.gather(natted.stop(), dialer.stop())
        await relay.stop()


def dials(dialer: Libp2pService, addr: str) -> Callable[[], Awaitable[bool]]:
    """A probe for ``eventually``: whether ``dialer`` connects to ``addr`` now."""
    async def reached() -> bool:
        try:
            await dialer.connect(addr, timeout=3)
            return True
        except NetworkError:
            return False

    return reached

async def test_a_peer_behind_a_nat_announces_only_circuits_through_its_relay(trio_of_hosts) -> None:
    relay, natted, dialer = trio_of_hosts
    with pytest.raises(NetworkError):  # the fixture's NAT: its own address no longer answers
        await dialer.connect(natted._listen_addrs[0], timeout=3)  # noqa: SLF001
    assert natted.listen_addrs == [f"{relay.listen_addrs[0]}/p2p-circuit/p2p/{natted.peer_id}"]
    assert all(is_circuit(a) and a.endswith("/p2p/" + natted.peer_id) for a in natted.listen_addrs)
    assert not any(is_circuit(a) for a in relay.listen_addrs)


async def test_a_stream_reaches_the_natted_peer_through_the_relay(trio_of_hosts) -> None:
    _, natted, dialer = trio_of_hosts
    natted.set_stream_handler(PROTOCOL, echo)
    assert await dialer.connect(natted.listen_addrs[0]) == natted.peer_id
    assert relayed_to(dialer, natted.peer_id) == [True]
    assert await dialer.request(natted.peer_id, PROTOCOL, b"ping") == b"ping"
    big = b"x" * (DEFAULT_FRAMES.reply // 2)  # many yamux frames inside the circuit
    assert await dialer.request(natted.peer_id, PROTOCOL, big) == big
    # and the other way, over the same relayed connection
    dialer.set_stream_handler(PROTOCOL, echo)
    assert await natted.request(dialer.peer_id, PROTOCOL, b"pong") == b"pong"
    assert relayed_to(natted, dialer.peer_id) == [True]


async def test_gossip_crosses_the_relayed_connection(trio_of_hosts) -> None:
    """The relay subscribes to nothing, so only the circuit can carry the message."""
    _, natted, dialer = trio_of_hosts
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(sender: str, data: bytes) -> None:
        got.put_nowait(data)

    await natted.subscribe(TOPIC, on_message)
    await dialer.subscribe(TOPIC, on_message)
    await dialer.connect(natted.listen_addrs[0])
    await eventually(lambda: natted.peer_id in dialer.topic_peers(TOPIC), what="the natted peer's subscription")
    await dialer.publish(TOPIC, b"hello through the relay")
    assert await asyncio.wait_for(got.get(), 10) == b"hello through the relay"


class RestartingRelay:
    """A relay, a peer behind a NAT reserved on it (not listening: reached only through the
    circuit) and a public dialer; the relay can be stopped and started afresh at its address."""

    async def __aenter__(self) -> RestartingRelay:
        self.key = Keypair.from_seed(b"relay")
        self.relay = Libp2pService(self.key, relay=RelayOptions(hop=True))
        await self.relay.start()
        self.addr = self.relay.listen_addrs[0]
        self.natted = Libp2pService(Keypair.from_seed(b"natted"),
                                    relay=RelayOptions(hop=False, reserve_on=(self.addr,)))
        await self.natted.start()
        await stop_listening(self.natted)
        self.natted.set_stream_handler(PROTOCOL, echo)
        self.dialer = Libp2pService(Keypair.from_seed(b"dialer"))
        await self.dialer.start()
        return self

    async def restart_relay(self, between: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.relay.stop()
        if between is not None:
            await between()
        self.relay = Libp2pService(self.key, self.addr.rsplit("/p2p/", 1)[0], relay=RelayOptions(hop=True))
        await self.relay.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(self.natted.stop(), self.dialer.stop(), self.relay.stop())


async def test_the_natted_peer_reserves_again_after_its_relay_restarts() -> None:
    async with RestartingRelay() as net:
        await net.restart_relay()
        await eventually(dials(net.dialer, net.natted.listen_addrs[0]), timeout=20,
                         what="a circuit through the restarted relay")
        assert await net.dialer.request(net.natted.peer_id, PROTOCOL, b"again") == b"again"


async def test_a_peer_that_failed_to_reach_a_natted_peer_while_its_relay_restarted_reaches_it_once_back() -> None:
    """The short testnet: a client whose TA sits behind a NAT asked it while the relay was
    restarting, the circuit's redial failed once, and no request reached that TA again (the
    dialer knows the peer by its circuit alone; its private addresses never answer)."""
    async with RestartingRelay() as net:
        dialer, natted = net.dialer, net.natted
        await dialer.connect(natted.listen_addrs[0])
        await stop_listening(dialer)  # a client: the natted peer cannot dial it back directly either

        async def ask_while_down() -> None:
            await eventually(lambda: natted.peer_id not in dialer.connected_peers(), what="the circuit to drop")
            with pytest.raises(NetworkError):  # the relay is down: nothing reaches the natted peer now
                await dialer.request(natted.peer_id, PROTOCOL, b"now", timeout=3)

        await net.restart_relay(between=ask_while_down)

        async def answered() -> bool:
            try:
                return await dialer.request(natted.peer_id, PROTOCOL, b"later", timeout=3) == b"later"
            except NetworkError:
                return False

        await eventually(answered, timeout=30, what="a request through the restarted relay, by peer id alone")
        assert relayed_to(dialer, natted.peer_id) == [True]


async def test_a_peer_behind_a_nat_without_a_relay_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody could dial it: it says so instead of running unreachable."""
    monkeypatch.setattr(relay_module, "FIRST_RESERVATION_TIMEOUT", 2.0)
    gone = Libp2pService(Keypair.from_seed(b"gone"))
    await gone.start()
    addr = gone.listen_addrs[0]
    await gone.stop()
    natted = Libp2pService(Keypair.from_seed(b"natted"), relay=RelayOptions(hop=False, reserve_on=(addr,)))
    with pytest.raises(NetworkError, match="no relay"):
        await natted.start()


# ---- the NAT in the testnet's namespaces (root only) -------------------------------------------

LISTEN = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000)); s.listen(); s.settimeout(float(sys.argv[2]))
conn, (peer, _) = s.accept(); print(peer, flush=True)
"""
DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 7000), timeout=3).close(); print("connected")
except OSError as e:
    print("refused:", e)
"""


def _in(host: netns.Host, code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(host.exec_argv() + [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def nat_topology() -> Iterator[tuple[netns.Host, netns.Host]]:
    try:
        netns.require_privilege()
    except netns.PrivilegeError as e:
        pytest.skip(str(e))
    netns.create_hub()
    try:
        yield netns.create_host("public", 10), netns.create_natted_host("natted", 11, 0)
    finally:
        netns.cleanup()


def test_the_natted_host_dials_out_masqueraded_and_nobody_dials_in(nat_topology) -> None:
    public, natted = nat_topology
    assert natted.ip.startswith(netns.NAT_SUBNET) and natted.public_ip.startswith(netns.SUBNET)
    listener = _in(public, LISTEN, public.ip, "10")
    time.sleep(0.5)
    assert _in(natted, DIAL, public.ip).communicate(timeout=10)[0].strip() == "connected"
    assert listener.communicate(timeout=10)[0].strip() == natted.public_ip  # the router's address
    # inbound: even a peer that routes the private subnet through the router gets nowhere
    netns.in_ns(public.ns, "ip", "route", "add", f"{natted.ip.rsplit('.', 1)[0]}.0/24", "via", natted.public_ip)
    listener = _in(natted, LISTEN, natted.ip, "6")
    time.sleep(0.5)
    assert _in(public, DIAL, natted.ip).communicate(timeout=10)[0].startswith("refused")
    listener.kill()
    listener.wait()


def test_the_manifest_puts_participants_behind_a_nat_but_never_the_first() -> None:
    assert parse_manifest("nodes = 5\nnat = [3]").nat == (3,)
    for bad in ("nat = [0]", "nat = [5]", "nat = [2, 2]", 'nat = ["x"]'):
        with pytest.raises(ManifestError, match="nat"):
            parse_manifest("nodes = 5\n" + bad)


def test_the_nat_row_needs_executions_validations_and_answers_through_the_relay() -> None:
    peer = "natted-peer"
    answers = {"aa": {"executor": peer}, "bb": {"executor": "other"}}
    sent = [{"ta": 3, "outcome": "ok"}, {"ta": 3, "outcome": "error"}, {"ta": 1, "outcome": "ok"}]
    row = judge_nat(3, peer, sent, answers, {("aa", "other"), ("bb", peer)})
    assert row.holds and row.detail.startswith("1 inferences settled as executor, 1 validations committed, 1 ")
    assert not judge_nat(3, peer, sent, answers, {("bb", "other")}).holds  # it never validated
    assert not judge_nat(3, peer, sent[1:], answers, {("bb", peer)}).holds  # nobody reached it as TA


async def test_a_lost_relayed_connection_is_dialed_again_through_its_circuit(trio_of_hosts) -> None:
    """py-libp2p's dialer skips circuits: without the redial, the next stream would find no address."""
    _, natted, dialer = trio_of_hosts
    natted.set_stream_handler(PROTOCOL, echo)
    await dialer.connect(natted.listen_addrs[0])
    await dialer._running().call(close_connections, dialer._t_host())  # noqa: SLF001 - a dropped connection
    await eventually(lambda: natted.peer_id not in dialer.connected_peers(), what="the connection to drop")
    assert await dialer.request(natted.peer_id, PROTOCOL, b"back") == b"back"
    assert relayed_to(dialer, natted.peer_id) == [True]


async def test_a_reservation_is_made_again_over_a_direct_connection_when_the_relay_dials_back_through_a_circuit(
) -> None:
    """A relay that restarts and reaches the natted peer through another relay first: the natted
    peer must not take that circuit for its reservation (the relay refuses one asked through it)."""
    first = Libp2pService(Keypair.from_seed(b"relay"), relay=RelayOptions(hop=True))
    second = Libp2pService(Keypair.from_seed(b"relay2"), relay=RelayOptions(hop=True))
    await first.start()
    await second.start()
    relays = (first.listen_addrs[0], second.listen_addrs[0])
    natted = Libp2pService(Keypair.from_seed(b"natted"), relay=RelayOptions(reserve_on=relays))
    await natted.start()
    dialer = Libp2pService(Keypair.from_seed(b"dialer"))
    await dialer.start()
    natted.set_stream_handler(PROTOCOL, echo)
    via_first, via_second = natted.listen_addrs
    try:
        await second.stop()
        second = Libp2pService(Keypair.from_seed(b"relay2"), relays[1].rsplit("/p2p/", 1)[0],
                               relay=RelayOptions(hop=True))
        await second.start()
        await second.connect(via_first)  # back to the natted peer through the first relay's circuit
        assert relayed_to(second, natted.peer_id) == [True]

        await eventually(dials(dialer, via_second), timeout=30, what="a circuit through the restarted relay")
        assert await dialer.request(natted.peer_id, PROTOCOL, b"second") == b"second"
    finally:
        await asyncio.gather(natted.stop(), dialer.stop(), first.stop(), second.stop())


async def test_one_connection_takes_no_more_than_its_own_reservation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: a public peer relays with HOP_LIMITS (8 reservations, 3600 s each), and
    py-libp2p 0.8.1 filed a reservation under the peer id *written in the request*, not the
    connection's authenticated peer, counting those of peers long disconnected. One
    connection sent eight RESERVEs naming eight made-up ids, and for an hour no peer behind
    a NAT could start on that relay (NoRelay). Now each is its own connection's, and gone
    with that connection."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    monkeypatch.setattr(relay_module, "FIRST_RESERVATION_TIMEOUT", 3.0)
    relay = Libp2pService(Keypair.from_seed(b"reserve-relay"), relay=RelayOptions(hop=True))
    attacker = Libp2pService(Keypair.from_seed(b"reserve-attacker"))
    natted: Libp2pService | None = None
    await relay.start()
    await attacker.start()
    try:
        assert await attacker.connect(relay.listen_addrs[0]) == relay.peer_id
        made_up = [Keypair.from_seed(b"made-up-%d" % i).peer_id for i in range(relay_module.HOP_LIMITS.max_reservations)]

        async def reserve_for_everyone() -> None:
            for peer in made_up:
                stream = await attacker._t_host().new_stream(ID.from_base58(relay.peer_id), [TProtocol(HOP_PROTOCOL_ID)])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                             peer=CircuitPeerId(id=ID.from_base58(peer).to_bytes())))
                await read_delimited_msg(stream, HopMessage)
                await stream.close()

        async def reserved() -> list[str]:
            return sorted(p.to_base58() for p in relay._t_relay()._protocol.resource_manager._reservations)

        await attacker._running().call(reserve_for_everyone)
        assert await relay._running().call(reserved) == [attacker.peer_id]
        await attacker._running().call(close_connections, attacker._t_host())
        await eventually(lambda: attacker.peer_id not in relay.connected_peers(), what="the attacker gone")
        natted = Libp2pService(Keypair.from_seed(b"reserve-natted"), relay=RelayOptions(reserve_on=(relay.listen_addrs[0],)))
        await natted.start()  # NoRelay if the relay had no reservation left for it
        assert await relay._running().call(reserved) == [natted.peer_id]
    finally:
        await asyncio.gather(*(s.stop() for s in (natted, attacker, relay) if s is not None))


async def test_throwaway_identities_hold_no_more_than_the_strangers_share_of_reservations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: eight throw-away keys, each connected, each reserving, held every reservation of a
    public relay (HOP_LIMITS: 8), and no participant behind a NAT could start on it. Peers the
    relay's ledger does not know hold at most STRANGER_RESERVATIONS together."""
    monkeypatch.setattr(relay_module, "FIRST_RESERVATION_TIMEOUT", 3.0)
    relay = Libp2pService(Keypair.from_seed(b"share-relay"), relay=RelayOptions(hop=True))
    hosts: list[Libp2pService] = [relay]
    await relay.start()
    try:
        participant_key = Keypair.from_seed(b"share-participant")
        relay.set_vouched(lambda peer: peer == participant_key.peer_id)
        on_relay = RelayOptions(reserve_on=(relay.listen_addrs[0],))
        for i in range(relay_module.STRANGER_RESERVATIONS):
            hosts.append(stranger := Libp2pService(Keypair.from_seed(b"share-stranger-%d" % i), relay=on_relay))
            await stranger.start()
        hosts.append(one_more := Libp2pService(Keypair.from_seed(b"share-stranger-x"), relay=on_relay))
        with pytest.raises(relay_module.NoRelay):
            await one_more.start()
        hosts.append(participant := Libp2pService(participant_key, relay=on_relay))
        await participant.start()  # NoRelay if the strangers had taken its reservation

        async def reserved() -> int:
            return len(relay._t_relay()._protocol.resource_manager._reservations)

        assert await relay._running().call(reserved) == relay_module.STRANGER_RESERVATIONS + 1
    finally:
        await asyncio.gather(*(h.stop() for h in hosts), return_exceptions=True)
