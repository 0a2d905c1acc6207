"""Attack class: flooding the peer directory. An announcement costs its sender one key, so
anyone can announce thousands of peers: the directory must keep bounded memory, keep every
weighted participant, dial participants before strangers, forget the silent, and never let
a dial to an announced address hold up the announcements behind it."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from helpers import eventually

from gonka_p2p.actors.directory import DIAL_BUDGET_S, MAX_STRANGERS, STRANGER_CONNECTIONS, PeerDirectory
from gonka_p2p.gossip.libp2p_patches import DELIVERY_SLOTS
from gonka_p2p.gossip.memory import MemoryHub, MemoryService
from gonka_p2p.gossip.service import PeerUnreachable
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.messages import MAX_ADDRS, MAX_MODEL_CHARS, MAX_MODELS, Announcement
from gonka_p2p.wire.protocols import ANNOUNCE_TOPIC

ME = Keypair.from_seed(b"directory-under-attack")
PARTICIPANT = Keypair.from_seed(b"weighted-participant")
WEIGHTS = {ME.peer_id: 10, PARTICIPANT.peer_id: 10}
FLOOD = 1_000
DIRECTORY_BYTES = 512 * 1024  # what 1,000 largest announcements may leave behind (it was ~5 MiB)


class Clock:
    """The directory's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def host(hub: MemoryHub, key: Keypair) -> MemoryService:
    service = hub.service(key)
    await service.start()
    return service


def announcement(key: Keypair, *, largest: bool = False, seq: int = 1) -> bytes:
    """``key``'s signed announcement; ``largest`` fills every field to its schema bound."""
    addr = f"/memory/{key.peer_id}/p2p/{key.peer_id}"
    if largest:
        addrs = [f"/dns4/{'a' * 150}/tcp/{i}/p2p/{key.peer_id}" for i in range(MAX_ADDRS)]
        models = [f"{i:03d}" + "m" * (MAX_MODEL_CHARS - 3) for i in range(MAX_MODELS)]
    else:
        addrs, models = [addr], ["m"]
    return seal(Announcement(addrs=addrs, models=models, capacity=1, seq=seq), key)


async def flushed(directory: PeerDirectory, relay: MemoryService, clock: Clock) -> None:
    """Return once every announcement published before has been judged and handled (the node's
    delivery slots all free), then show that an interval later a stranger is relayed again."""
    me = directory._service
    await eventually(lambda: me._slots._value == DELIVERY_SLOTS, what="the flood's deliveries")  # type: ignore[attr-defined]
    clock.now += directory.interval
    marker = Keypair.from_seed(b"marker")
    await relay.publish(ANNOUNCE_TOPIC, announcement(marker, largest=True))  # serves no model "m"
    await eventually(lambda: marker.peer_id in directory._peers, what="the announcements published before")


async def directory_under_attack(target_connections: int = 6) -> tuple[PeerDirectory, MemoryService, Clock]:
    """A directory whose node is connected to one peer only: the attacker's relay."""
    hub, clock = MemoryHub(), Clock()
    me = await host(hub, ME)
    relay = await host(hub, Keypair.from_seed(b"attacker-relay"))
    await relay.connect(me.listen_addrs[0])
    directory = PeerDirectory(me, ME, models=[], capacity=1, weights=WEIGHTS,
                              target_connections=target_connections, clock=clock)
    await directory.start()
    await host(hub, PARTICIPANT)
    return directory, relay, clock


async def test_a_flood_of_throwaway_keys_keeps_memory_bounded_and_the_participant_known() -> None:
    directory, relay, clock = await directory_under_attack()
    await relay.publish(ANNOUNCE_TOPIC, announcement(PARTICIPANT))
    await eventually(lambda: directory.is_live(PARTICIPANT.peer_id), what="the participant's announcement")
    keys = [Keypair.from_seed(b"throwaway-%d" % i) for i in range(FLOOD)]
    flood = [announcement(k, largest=True) for k in keys]

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for message in flood:
            await relay.publish(ANNOUNCE_TOPIC, message)
        await flushed(directory, relay, clock)
        del message
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert kept < DIRECTORY_BYTES, f"the directory kept {kept} bytes for {FLOOD} throw-away keys"
    strangers = [r for r in directory.live_peers() if r.peer_id != PARTICIPANT.peer_id]
    assert len(strangers) <= MAX_STRANGERS
    assert directory.executor_weights("m") == {PARTICIPANT.peer_id: 10}  # the flood serves other "models"


async def test_announced_sybils_cannot_take_the_connections_a_participant_needs() -> None:
    """First come, first served, eight reachable sybils announced before the participant
    filled every connection (an eclipse); strangers now get at most a small quota."""
    directory, relay, _ = await directory_under_attack(target_connections=4)
    hub_sybils = [await host(relay._hub, Keypair.from_seed(b"sybil-%d" % i)) for i in range(8)]
    dialing = asyncio.create_task(directory.run())
    try:
        for sybil in hub_sybils:
            await relay.publish(ANNOUNCE_TOPIC, announcement(Keypair.from_seed(b"sybil-%d" % hub_sybils.index(sybil))))
        await relay.publish(ANNOUNCE_TOPIC, announcement(PARTICIPANT))
        me = directory._service
        await eventually(lambda: PARTICIPANT.peer_id in me.connected_peers(), what="a dial to the participant")
        sybils = {s.peer_id for s in hub_sybils}
        assert len(sybils & set(me.connected_peers())) < STRANGER_CONNECTIONS  # the relay is a stranger too
    finally:
        dialing.cancel()


async def test_the_participant_leads_the_dial_set_whatever_strangers_announce() -> None:
    directory, relay, clock = await directory_under_attack(target_connections=1)  # full: nobody is dialled
    await relay.publish(ANNOUNCE_TOPIC, announcement(PARTICIPANT))
    keys = [Keypair.from_seed(b"throwaway-%d" % i) for i in range(200)]
    for key in keys:
        await relay.publish(ANNOUNCE_TOPIC, announcement(key))
    await flushed(directory, relay, clock)
    assert len(directory.live_peers()) == MAX_STRANGERS + 1
    candidates = directory.dial_candidates()
    assert candidates[0] == PARTICIPANT.peer_id
    assert len(candidates) <= 1 + STRANGER_CONNECTIONS


async def test_silent_peers_are_forgotten_without_anyone_new_announcing() -> None:
    directory, relay, clock = await directory_under_attack()
    directory.interval = 0.01  # the announcement tick, on the real clock; silence is on the test's
    await relay.publish(ANNOUNCE_TOPIC, announcement(PARTICIPANT))
    await relay.publish(ANNOUNCE_TOPIC, announcement(Keypair.from_seed(b"stranger")))
    await eventually(lambda: len(directory._peers) == 2, what="two announcements")
    ticking = asyncio.create_task(directory.run())
    try:
        clock.now += directory.forget_after + 1
        await eventually(lambda: not directory._peers, what="the silent peers to be forgotten")
    finally:
        ticking.cancel()


async def test_a_stranger_whose_addresses_never_answer_holds_up_no_announcement() -> None:
    """Topics are handled one message at a time, and the directory dialed from the announcement
    handler: a stranger announcing 8 addresses that accept and never answer held every later
    announcement for 8 dials of 5 s (the participant's liveness, and with it the executor draw,
    lapsed behind it). Dials now run beside the handler, a candidate's within one budget."""
    directory, relay, _ = await directory_under_attack()
    me = directory._service
    staller = Keypair.from_seed(b"silent-addresses")
    dialing = asyncio.Event()
    connect = me.connect

    async def stalling_connect(multiaddr: str, timeout: float = 10.0) -> str:
        if staller.peer_id not in multiaddr:
            return await connect(multiaddr, timeout)
        dialing.set()
        await asyncio.sleep(timeout)
        raise PeerUnreachable(f"{multiaddr}: no answer")

    me.connect = stalling_connect  # type: ignore[method-assign]
    addrs = [f"/ip4/127.0.0.1/tcp/{9000 + i}/p2p/{staller.peer_id}" for i in range(MAX_ADDRS)]
    stranger = seal(Announcement(addrs=addrs, models=["m"], capacity=1, seq=1), staller)
    running = asyncio.create_task(directory.run())
    try:  # the handler is called as libp2p calls it: the topic's next message waits for it to return
        await asyncio.wait_for(directory._on_announcement(relay.peer_id, stranger), timeout=1.0)
        await eventually(dialing.is_set, what="a dial to the stranger's first address")
        await asyncio.wait_for(directory._on_announcement(relay.peer_id, announcement(PARTICIPANT)), timeout=1.0)
        assert directory.is_live(PARTICIPANT.peer_id)
        await eventually(lambda: PARTICIPANT.peer_id in me.connected_peers(), timeout=DIAL_BUDGET_S + 5,
                         what="a dial to the participant once the stranger's budget is spent")
    finally:
        running.cancel()


async def test_an_announcement_its_validator_would_refuse_is_dropped_by_the_handler_too() -> None:
    """Attack: the handler trusted the topic's validator and decoded again without a guard, so
    bytes that got past the validator (py-libp2p's validation cache let a replayed message id
    skip it) raised in the handler -- which stopped the node's network service."""
    directory, _, _ = await directory_under_attack()
    stranger = Keypair.from_seed(b"lies-about-addresses")
    liar = seal(Announcement(addrs=[f"/memory/x/p2p/{PARTICIPANT.peer_id}"], models=["m"], capacity=1, seq=1), stranger)
    for data in (b"not an announcement", liar):
        assert not directory._is_valid(stranger.peer_id, data)
        await directory._on_announcement(stranger.peer_id, data)  # dropped, not raised
    assert stranger.peer_id not in directory._peers


async def test_an_announcement_held_already_or_older_is_not_relayed_again() -> None:
    """Attack: the topic's validator checked the signature only, so anyone could re-publish a
    captured announcement in new gossip messages for every node to relay again."""
    directory, _, _ = await directory_under_attack()
    fresh = announcement(PARTICIPANT, seq=5)
    assert directory._is_valid(PARTICIPANT.peer_id, fresh)
    await directory._on_announcement(PARTICIPANT.peer_id, fresh)
    assert not directory._is_valid(PARTICIPANT.peer_id, fresh)
    assert not directory._is_valid(PARTICIPANT.peer_id, announcement(PARTICIPANT, seq=4))


async def test_one_key_announcing_faster_than_the_interval_is_relayed_at_its_pace() -> None:
    """Attack: the sender picks ``seq``; one key counting it up as fast as it can publish had
    every announcement relayed by every node."""
    directory, _, clock = await directory_under_attack()
    await directory._on_announcement(PARTICIPANT.peer_id, announcement(PARTICIPANT, seq=1))
    clock.now += 0.1
    assert not directory._is_valid(PARTICIPANT.peer_id, announcement(PARTICIPANT, seq=2))
    clock.now += directory.interval / 2
    assert directory._is_valid(PARTICIPANT.peer_id, announcement(PARTICIPANT, seq=3))


async def test_throwaway_keys_have_at_most_the_strangers_share_of_announcements_relayed() -> None:
    """Attack: each fresh key's announcement is new, and keys cost nothing, so a flood of them
    crossed the whole network. Strangers' announcements are relayed at the pace the directory
    keeps strangers (``MAX_STRANGERS`` an interval); a participant's always."""
    directory, _, clock = await directory_under_attack()
    keys = [Keypair.from_seed(b"throwaway-%d" % i) for i in range(3 * MAX_STRANGERS)]
    relayed = sum(directory._is_valid(k.peer_id, announcement(k)) for k in keys)
    assert relayed == MAX_STRANGERS
    assert directory._is_valid(PARTICIPANT.peer_id, announcement(PARTICIPANT))
    clock.now += directory.interval
    assert directory._is_valid(keys[-1].peer_id, announcement(keys[-1]))
