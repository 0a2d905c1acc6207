"""Joining a network, as people do it: ``gonka-p2p status`` and issue 12's "Done when" over real processes.

First, what ``status`` says about proof of compute (``ledger/query_answer.py``), through a
round driven block by block (``ledger_driver``): weights per model and voting power, the
next regular round, the confirmation round once open, and one prover's last result --
pending, then proven, fraud or unproven.

Then the README's "Join a network" over ``gonka-p2p`` processes on 127.0.0.1 (slow): a
three-node network written by ``gonka-p2p init --proof-of-compute``; a fourth node with a
fresh key started with ``--bootstrap`` and ``--genesis-hash`` alone. It commits in the next
round, and from the epoch after holds weight, executes requests drawn to it (sent across
a proof-of-compute window: every one completes), has that work validated, is paid at
settlement and signs blocks. Then one original node is stopped: the others keep
committing, and its weight falls after the next round, by no more than a missed round's
bounded step (``poc.declined_targets``; ``test_poc_ledger`` takes it to 0).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from helpers import MODEL, NodeProcess, eventually, free_port, gonka
from ledger_driver import LedgerDriver, poc_genesis
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore, create_signed_peer_record
from multiaddr import Multiaddr

from gonka_p2p.client import Completion, GonkaClient, GonkaError, NetworkUnavailable, build_request
from gonka_p2p.gossip.libp2p_patches import clean_peerstore
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.consensus_wire import CertificateWire, certificate_from_wire
from gonka_p2p.ledger.genesis import load_genesis
from gonka_p2p.ledger.poc import Phase, RoundKind, epoch_first_height, regular_start
from gonka_p2p.ledger.query import PocResultInfo, StatusQuery, StatusReply
from gonka_p2p.ledger.query_answer import answer
from gonka_p2p.ledger.rules import shift_budget
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import open_envelope
from gonka_p2p.wire.messages import InferenceRequest, inference_id
from gonka_p2p.wire.stream import StartedEvent
from gonka_p2p.wire.unsigned import decode_frame

KEYS = {n: Keypair.from_seed(f"join-process-{n}".encode()) for n in ("A", "B", "C", "N")}
PEER = {n: k.peer_id for n, k in KEYS.items()}


@dataclass
class View:
    """A replica as :func:`answer` sees it: the driven state and no traffic."""

    state: LedgerState
    evidence_count: int = 0
    mempool_size: int = 0

    def app_hash_at(self, height: int) -> bytes | None:
        return None

    def submit(self, raw: bytes) -> bytes:
        raise AssertionError("status submits nothing")


def status(d: LedgerDriver, who: str) -> StatusReply:
    reply = answer(View(d.state), StatusQuery(prover=PEER[who]))
    assert isinstance(reply, StatusReply)
    return reply


def verdicts(d: LedgerDriver) -> dict[str, list[tuple[int, str, int, str]]]:
    def brief(r: PocResultInfo) -> tuple[int, str, int, str]:
        return r.epoch, r.round, r.count, r.verdict

    return {who: [brief(r) for r in status(d, who).last_poc] for who in PEER}


def test_status_shows_weights_per_model_the_schedule_and_each_provers_last_result() -> None:
    """A proves 100 nonces, B 60 (judged false), C commits 30 but never opens its secret, and
    the newcomer N (no account) joins with 40; those who opened their round confirm it."""
    d = LedgerDriver(LedgerState.from_genesis(poc_genesis("join-status", KEYS, {"A": 10, "B": 10, "C": 10})),
                     KEYS, "A")
    params = d.state.params
    before = status(d, "A")
    assert before.poc_enabled and before.next_poc == regular_start(0, params) and before.confirmation == 0
    assert [(p.weight, p.power, [(m.model, m.weight) for m in p.model_weights]) for p in before.participants] \
        == [(10, 10, [("m", 10)])] * 3
    assert verdicts(d) == {"A": [], "B": [], "C": [], "N": []}

    d.to_phase(0, RoundKind.REGULAR, Phase.COMPUTE)
    counts = {"A": 100, "B": 60, "C": 30, "N": 40}
    d.ok(*[d.poc_commit(who, n, 0) for who, n in counts.items()])
    assert status(d, "A").next_poc == regular_start(1, params), "this epoch's round has begun: the next is next epoch's"
    assert verdicts(d)["N"] == [(0, "regular", 40, "pending")]
    d.to_phase(0, RoundKind.REGULAR, Phase.SECRET)
    d.ok(*[d.poc_secret(who, 0) for who in ("A", "B", "N")])
    d.to_phase(0, RoundKind.REGULAR, Phase.REVEAL)
    d.ok(*[d.poc_reveal(who, 0) for who in ("A", "B", "N")])
    d.to_phase(0, RoundKind.REGULAR, Phase.VERDICT)
    d.ok(*[d.poc_verdict(judge, who, who != "B", 0) for judge in ("A", "B", "C") for who in ("A", "B", "N")
           if judge != who])
    assert verdicts(d) == {"A": [(0, "regular", 100, "proven")], "B": [(0, "regular", 60, "fraud")],
                           "C": [(0, "regular", 30, "pending")], "N": [(0, "regular", 40, "proven")]}
    d.to_phase(0, RoundKind.REGULAR, Phase.OVER)
    assert verdicts(d)["C"] == [(0, "regular", 30, "unproven")]

    while not status(d, "A").confirmation:  # opens at a height nobody could predict
        d.block()
    opened = d.state.poc_rounds.get((0, RoundKind.CONFIRMATION))
    assert opened is not None and status(d, "A").confirmation == opened.start
    confirming = d.confirmation_counts({(who, "m"): counts[who] for who in ("A", "B", "N")})
    d.poc_round(0, RoundKind.CONFIRMATION, confirming)
    assert verdicts(d)["A"] == [(0, "confirmation", confirming[("A", "m")], "proven")]

    d.until(params.epoch_length_blocks)
    after = status(d, "A")
    assert {p.peer_id: (p.weight, p.power, [(m.model, m.weight) for m in p.model_weights])
            for p in after.participants} == {PEER["A"]: (100, 100, [("m", 100)]), PEER["B"]: (0, 0, []),
                                             PEER["C"]: (0, 0, []), PEER["N"]: (40, 40, [("m", 40)])}
    assert {p.peer_id: p.power for p in after.participants if p.power} == d.state.weights()


def test_a_peer_that_left_for_good_does_not_take_the_others_down() -> None:
    """Found by the process test below: once a leaver's addresses expired, py-libp2p's peerstore
    cleanup raised in the trio loop of every node that held its signed record, and they stopped."""
    store = PeerStore()
    keys = create_new_key_pair()
    leaver = ID.from_pubkey(keys.public_key)
    record = create_signed_peer_record(leaver, [Multiaddr("/ip4/127.0.0.1/tcp/9")], keys.private_key)
    assert store.consume_peer_record(record, 1)
    store.peer_data_map[leaver].last_identified -= 10  # its addresses' time to live ran out

    async def a_few_passes() -> None:
        with trio.move_on_after(0.2):
            await clean_peerstore(store, 0.05)

    trio.run(a_few_passes)
    assert leaver not in store.peer_data_map and leaver not in store.peer_record_map


# --------------------------------------------------------------------------- over real processes

ROOT = Path(__file__).resolve().parents[1]
# Added to the README's node commands: the engine the other process tests use with the tiny
# model, and blocks and announcements often enough for a test.
NODE_FLAGS = ("--engine", "torch", "--empty-block-interval", "0.5", "--announce-interval", "1")
ROUND_TIMEOUT_S = 900  # two epochs and a settlement on a loaded two-core machine, with room


def readme_commands() -> list[str]:
    """The ``gonka-p2p`` commands of README's "Join a network", in order, without the program."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Join a network")
    section = readme[start:readme.index("\n## ", start + 1)]
    blocks = re.findall(r"```\n(.*?)```", section, re.DOTALL)
    return [line.removeprefix(".venv/bin/gonka-p2p ") for block in blocks for line in block.splitlines()]


def filled(command: str, **values: str) -> list[str]:
    """``command``'s words with each ``<placeholder>`` replaced (keyword: its text, spaces as _)."""
    for placeholder, value in values.items():
        command = command.replace(f"<{placeholder.replace('_', ' ')}>", value)
    assert "<" not in command, f"unfilled placeholder in README's {command!r}"
    return shlex.split(command)


class JoinNode(NodeProcess):
    """``gonka-p2p node ...`` (``argv``) run in ``cwd`` with :data:`NODE_FLAGS`, on a free port
    unless it names one."""

    def __init__(self, cwd: Path, argv: list[str]) -> None:
        key = argv[argv.index("--key") + 1]
        listen = [] if "--listen" in argv else ["--listen", f"/ip4/127.0.0.1/tcp/{free_port()}"]
        assert argv[0] == "node"
        super().__init__([*argv[1:], *listen, *NODE_FLAGS], cwd / key, cwd / f"{Path(key).name}.log", cwd)
        self.store = cwd / f"{key}-ledger" / "ledger.sqlite"


def signers(store: Path, since: int) -> set[str]:
    """Every validator whose precommit is in a commit certificate stored from height ``since`` on."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT certificate FROM blocks WHERE height >= ?", (since,)).fetchall()
    finally:
        db.close()
    return {vote.validator for (raw,) in rows
            for vote in certificate_from_wire(decode_frame(raw, CertificateWire)).precommits}


def quiet(log: str) -> str:
    """A node's log without py-libp2p's per-message queue warnings, which bury everything else."""
    return "\n".join(line for line in log.splitlines() if "pending message queue" not in line)


@dataclass
class Load:
    """Chat requests one after another through a TA, each outcome kept by inference id."""

    client: GonkaClient
    answered: dict[bytes, Completion] = field(default_factory=dict)
    failed: dict[bytes, str] = field(default_factory=dict)

    async def send(self, chain_id: str) -> None:
        while True:
            request = build_request(self.client.key, [("user", "Count to three.")], chain_id, model=MODEL,
                                    max_tokens=8)
            iid = inference_id(open_envelope(request, InferenceRequest))
            completion = Completion("", "", iid, "", 0)
            try:
                async for event in self.client.stream_request(request, timeout=60):
                    if isinstance(event, StartedEvent):
                        completion.executor = event.executor
                self.answered[iid] = completion
            except GonkaError as e:
                self.failed[iid] = f"{type(e).__name__}: {e}"

    def executed_by(self, peer: str) -> list[bytes]:
        return [iid for iid, c in self.answered.items() if c.executor == peer]


@pytest.mark.slow
@pytest.mark.libp2p
async def test_a_fresh_key_joins_with_a_bootstrap_address_and_earns_serves_validates_signs_and_is_paid(
        tmp_path: Path) -> None:
    """The README's "Join a network" commands, and what the section says happens epoch by epoch."""
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["keygen", "node", "status", "init", "node"], commands
    keygen_cmd, join_cmd, status_cmd, init_cmd, first_cmd = commands
    init = gonka(*filled(init_cmd), cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    genesis = load_genesis(tmp_path / "net" / "genesis.toml")
    params = genesis.params
    keygen = gonka(*filled(keygen_cmd), cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    first = filled(first_cmd.replace("/tcp/9000", f"/tcp/{free_port()}"))
    nodes = [JoinNode(tmp_path, first)]
    payer = Keypair.load(tmp_path / "net" / "client0.key")
    service = Libp2pService(payer, "/ip4/127.0.0.1/tcp/0")
    load_task: asyncio.Task[None] | None = None
    try:
        boot = await asyncio.to_thread(nodes[0].wait_ready)
        at = first.index("--listen")  # README: the other two with their keys, a port of their own, --bootstrap
        nodes += [JoinNode(tmp_path, [w.replace("node0.key", f"node{i}.key") for w in first[:at] + first[at + 2:]]
                              + ["--bootstrap", boot]) for i in (1, 2)]
        joiner = JoinNode(tmp_path, filled(join_cmd, multiaddr_of_any_participant=boot, m=MODEL,
                                              H=genesis.hash().hex()))
        nodes.append(joiner)
        for node in nodes[1:]:
            await asyncio.to_thread(node.wait_ready)
        assert joiner.peer_id == keygen.stdout.strip()
        await service.start()
        client = GonkaClient(payer, service, await service.connect(boot))

        async def status(prover: str = joiner.peer_id) -> StatusReply:
            try:
                return await client.status(prover)
            except NetworkUnavailable:  # py-libp2p drops a connection now and then on a loaded machine
                await service.connect(boot)
                return await client.status(prover)

        def weight(reply: StatusReply, peer: str) -> int:
            return next((p.weight for p in reply.participants if p.peer_id == peer), 0)

        # It commits in the next round with a join stamp, is judged, and holds weight from the
        # epoch after.
        joined = await eventually(status, ROUND_TIMEOUT_S, "the joiner to hold weight",
                                  until=lambda s: weight(s, joiner.peer_id) > 0, interval=1)
        assert [r.verdict for r in joined.last_poc] == ["proven"], joined.last_poc
        shown = gonka(*filled(status_cmd, multiaddr_of_the_new_node=joiner.addr), cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        # (its next round may have begun since: any result of its own, in the words status uses)
        assert re.search(rf"last proof of compute of {joiner.peer_id}: epoch \d+ (regular|confirmation) round, "
                         rf"{MODEL}, \d+ nonces: (pending|proven|fraud|unproven)", text), shown.stdout
        assert f"genesis {genesis.hash().hex()}" in text and "next regular round at height" in text
        assert f"{MODEL}: {weight(joined, joiner.peer_id)}" in text

        # It is drawn for requests (by weight), sent without pause across the epoch's
        # proof-of-compute window: serving goes on, and every request is answered.
        serving_epoch = joined.epoch
        window_end = regular_start(serving_epoch, params) + params.poc_compute_blocks
        load = Load(client)
        load_task = asyncio.create_task(load.send(genesis.chain_id))
        await eventually(lambda: status(), ROUND_TIMEOUT_S, "a request executed by the joiner, across a window",
                         until=lambda s: bool(load.executed_by(joiner.peer_id)) and s.height > window_end
                         or load_task.done(), interval=1)
        load_task.cancel()
        await asyncio.gather(load_task, return_exceptions=True)
        assert not load.failed, load.failed
        assert (await status()).epoch == serving_epoch, "the load outlived the epoch: the test is too slow"

        # It signs blocks.
        first_height = epoch_first_height(serving_epoch, params)
        assert joiner.peer_id in await asyncio.to_thread(signers, nodes[0].store, first_height)

        # Its work was validated, and it is paid when the epoch settles -- before anyone leaves: a
        # validator stopped before its reveal leaves its duties undone (fresh clone #18: the joiner's
        # one inference of the epoch fell to the leaver).
        summary = await eventually(lambda: client.epoch_summary(serving_epoch), ROUND_TIMEOUT_S,
                                   f"epoch {serving_epoch} to settle", until=lambda r: r.settled, interval=1)
        assert joiner.peer_id in summary.checked and joiner.peer_id in summary.paid, summary.text
        assert (await client.balance(joiner.peer_id)).balance > 0

        # An original participant leaves: the others keep committing, and its weight falls after
        # the next round, by a missed round's bounded step at most.
        leaving = min(nodes[1:3], key=lambda n: weight(joined, n.peer_id))
        assert leaving.stop() == 0
        stopped = await status()
        held = weight(stopped, leaving.peer_id)
        await eventually(status, 120, "commits after the leaver stopped",
                         until=lambda s: s.height >= stopped.height + 10, interval=1)
        fell = await eventually(status, ROUND_TIMEOUT_S, "the leaver's weight to fall",
                                until=lambda s: weight(s, leaving.peer_id) < held, interval=1)
        # It can neither open this epoch's round nor confirm: it falls from the next epoch (the one
        # after, had it stopped once both were done).
        assert fell.epoch <= stopped.epoch + 2, f"stopped in epoch {stopped.epoch}, weight kept until {fell.epoch}"
        step = shift_budget(sum(p.weight for p in stopped.participants), params.max_weight_shift_ppm)
        assert held - weight(fell, leaving.peer_id) <= step, (held, weight(fell, leaving.peer_id), step)
        assert weight(fell, joiner.peer_id) > 0
    except AssertionError as e:
        logs = "\n".join(f"--- {n.log.name}\n{quiet(n.log.read_text())[-4000:]}" for n in nodes)
        raise AssertionError(f"{e}\n{logs}") from None
    finally:
        if load_task is not None:
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
        await service.stop()
        codes = [n.stop() for n in nodes]
    assert codes == [0] * len(nodes), codes
