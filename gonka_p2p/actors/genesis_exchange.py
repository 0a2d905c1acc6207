"""Where a node's genesis comes from, and serving ours to the nodes that join.

A node must know its network's genesis before its actors exist: the
replica, the validator set and the chain id every admission checks are all
built from it. :func:`resolve_genesis` takes it from the first of:

1. ``--genesis FILE``, the operator's file;
2. ``<data dir>/genesis.json``, saved by an earlier run that learnt it from
   its peers (a restart needs no peer and trusts nobody anew);
3. the bootstrap peers, each asked over ``/gonka/ledger/genesis/1``, which
   every node serves (:func:`genesis_server`; the bytes and their checks are
   ``ledger/genesis_wire.py``'s). What one of them serves is saved to the
   data directory atomically (written aside, synced, renamed), so a crash
   leaves the old state or the new, never half a file.

``--genesis-hash`` pins it: from whichever source, a genesis with another
hash ends start-up with one sentence that names the source and both hashes.
Without a pin the first start trusts its bootstrap peers (trust on first
use): it refuses if they disagree, and logs the hash it accepted so that the
operator can pin it. A peer that answers with no genesis runs an ad-hoc
network without a ledger; a node given no pin whose answering peers all say
so joins that network without a ledger too, as a node without ``--genesis``
always has.

Why a throw-away host asks: the node's own host serves actors that are built
around the genesis, so the genesis must be known before that host starts. A
short-lived host with a fresh key, on an ephemeral port of the listen
interface, asks the bootstrap peers and stops: one extra host start, on the
first start of a joining node only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gonka_p2p.config import NodeConfig
from gonka_p2p.gossip.service import NetworkError, NetworkService, SendFrame, StreamHandler
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.genesis import Genesis, GenesisError, load_genesis, save_genesis
from gonka_p2p.ledger.genesis_wire import GenesisReply, GenesisRequest, genesis_bytes, genesis_from_bytes
from gonka_p2p.wire.protocols import GENESIS_PROTOCOL
from gonka_p2p.wire.schema import WireError
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

log = logging.getLogger(__name__)

GENESIS_FILE = "genesis.json"  # in the node's data directory
ASK_TIMEOUT_S = 10.0  # per bootstrap peer: the dial, then the answer


def genesis_server(genesis: Genesis | None) -> StreamHandler:
    """The ``/gonka/ledger/genesis/1`` handler: our genesis's canonical bytes (none without a ledger)."""
    reply = encode_frame(GenesisReply(genesis=genesis_bytes(genesis) if genesis is not None else b""))

    async def serve(opener: str, frame: bytes, send: SendFrame) -> None:
        decode_frame(frame, GenesisRequest)
        await send(reply)

    return serve


async def ask_genesis(service: NetworkService, peer: str, timeout: float = ASK_TIMEOUT_S) -> Genesis | None:
    """The genesis ``peer`` serves (None: it runs without a ledger).

    Raises NetworkError, TimeoutError, or WireError for an answer that is not a genesis."""
    frame = await service.request(peer, GENESIS_PROTOCOL, encode_frame(GenesisRequest()), timeout)
    reply = decode_frame(frame, GenesisReply)
    return genesis_from_bytes(reply.genesis) if reply.genesis else None


@dataclass(frozen=True)
class Answer:
    """What one bootstrap peer said: a genesis, no genesis (``error`` empty too), or why it did not answer
    (``unreachable``: its dial failed)."""

    addr: str
    genesis: Genesis | None = None
    error: str = ""
    unreachable: bool = False

    def describe(self, pin: bytes | None) -> str:
        """One line for people, as an error lists it."""
        if self.error:
            return f"bootstrap peer {self.addr} {'is unreachable' if self.unreachable else 'did not answer'}: " \
                   f"{self.error}"
        if self.genesis is None:
            return f"bootstrap peer {self.addr} runs without a ledger (it serves no genesis)"
        pinned = f", you pinned {pin.hex()}" if pin is not None else ""
        return f"bootstrap peer {self.addr} serves genesis {self.genesis.hash().hex()}{pinned}"


def choose_genesis(answers: list[Answer], pin: bytes | None) -> Genesis | None:
    """The genesis to join with, given every bootstrap peer's answer; None: an ad-hoc network.

    Raises GenesisError when no answer is acceptable: nothing served matches the pin, the
    peers disagree and nothing is pinned, or no peer answered at all."""
    if all(a.unreachable for a in answers):
        raise GenesisError(_listed("no bootstrap peer is reachable", answers, pin))
    served = {a.addr: a.genesis for a in answers if a.genesis is not None}
    if pin is not None:
        if match := next((g for g in served.values() if g.hash() == pin), None):
            return match
        raise GenesisError(_listed("no bootstrap peer serves the genesis you pinned", answers, pin))
    if len({g.hash() for g in served.values()}) > 1:
        raise GenesisError(_listed("the bootstrap peers serve different genesis records; pin yours with "
                                   "--genesis-hash", [a for a in answers if a.addr in served], None))
    if served:
        genesis = next(iter(served.values()))
        log.warning("chain %r: trusting the genesis the bootstrap peers serve (first use); to refuse any "
                    "other, pin it with --genesis-hash %s", genesis.chain_id, genesis.hash().hex())
        return genesis
    if any(not a.error for a in answers):
        return None
    raise GenesisError(_listed("no bootstrap peer serves a genesis", answers, None))


def _listed(headline: str, answers: list[Answer], pin: bytes | None) -> str:
    """The headline, then one line per answer: what a person needs to decide which peer to doubt."""
    return headline + ":\n  " + "\n  ".join(a.describe(pin) for a in answers)


async def ask_bootstrap_peers(bootstrap: list[str], service_factory: Callable[[Keypair, str], NetworkService],
                              listen: str) -> list[Answer]:
    """Every bootstrap peer's answer, asked at once from a throw-away host (see the module doc)."""
    service = service_factory(Keypair.generate(), "/".join(listen.split("/")[:3]) + "/tcp/0")
    await service.start()
    try:
        return list(await asyncio.gather(*(_ask(service, addr) for addr in bootstrap)))
    finally:
        await service.stop()


async def _ask(service: NetworkService, addr: str) -> Answer:
    try:
        peer = await service.connect(addr, ASK_TIMEOUT_S)
    except NetworkError as e:
        return Answer(addr, error=str(e) or type(e).__name__, unreachable=True)
    try:
        return Answer(addr, await ask_genesis(service, peer))
    except (NetworkError, TimeoutError, WireError) as e:
        return Answer(addr, error=str(e) or type(e).__name__)


def _check_pin(genesis: Genesis, pin: bytes | None, source: str) -> Genesis:
    if pin is not None and genesis.hash() != pin:
        raise GenesisError(f"{source} has genesis {genesis.hash().hex()}, you pinned {pin.hex()}")
    return genesis


def save_atomically(genesis: Genesis, path: Path) -> None:
    """Write ``genesis`` to ``path`` (JSON) so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.json")
    save_genesis(genesis, partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)


async def resolve_genesis(config: NodeConfig, from_file: Genesis | None,
                          service_factory: Callable[[Keypair, str], NetworkService]) -> Genesis | None:
    """This node's genesis (see the module doc for the order); None for an ad-hoc network.

    ``from_file``: the ``--genesis`` file's, loaded. Raises GenesisError, for people."""
    pin = bytes.fromhex(config.genesis_hash) if config.genesis_hash else None
    if from_file is not None:
        return _check_pin(from_file, pin, f"genesis file {config.genesis}")
    saved = config.ledger_dir / GENESIS_FILE
    if saved.exists():
        return _check_pin(load_genesis(saved), pin, f"the genesis saved in {saved}")
    if not config.bootstrap:
        if pin is not None:
            raise GenesisError("--genesis-hash needs a genesis to check: give --genesis FILE, or --bootstrap "
                               "peers that serve one")
        return None
    genesis = choose_genesis(await ask_bootstrap_peers(config.bootstrap, service_factory, config.listen), pin)
    if genesis is not None:
        save_atomically(genesis, saved)
    return genesis
