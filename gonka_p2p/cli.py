"""``gonka-p2p``: the command line.

Every failure a person can cause or fix (bad flag, missing key or model,
port in use, unreachable bootstrap peer) ends in one plain sentence on
stderr and a non-zero exit -- never a traceback. Set ``GONKA_DEBUG=1`` to
see tracebacks anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler

from gonka_p2p.config import (
    ENGINES,
    ConfigError,
    NodeConfig,
    add_node_options,
    cheat_name,
    load_config,
    overrides_from_args,
)
from gonka_p2p.identity import Keypair, KeyFileError

if TYPE_CHECKING:
    from gonka_p2p.client import GonkaClient
    from gonka_p2p.ledger.query import StatusReply

err_console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageProblem(Exception):
    """An argument that parses but cannot be right (e.g. a malformed peer id)."""


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _setup_logging(level: str) -> None:
    """Warnings by default; ``info`` adds what the node's actors decide (a validator asking
    again, a TA redrawing an executor), ``debug`` everything, py-libp2p's too. On a terminal
    rich renders it; written to a file, each record is one timestamped line, so a testnet's
    node logs can be searched and lined up with its report."""
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if level == "debug" else logging.WARNING, handlers=[handler])
    logging.getLogger("gonka_p2p").setLevel(LOG_LEVELS[level])


def cmd_keygen(args: argparse.Namespace) -> int:
    key = Keypair.generate()
    try:
        key.save(Path(args.out))
    except FileExistsError:
        raise KeyFileError(f"{args.out} already exists; refusing to overwrite a key")
    print(key.peer_id)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from gonka_p2p.actors.node import run_node
    from gonka_p2p.adversary.engine import cheating_loader
    from gonka_p2p.gossip.libp2p_service import Libp2pService
    from gonka_p2p.gossip.relay import RelayOptions, relay_addrs
    from gonka_p2p.inference.factory import load_engine
    from gonka_p2p.ledger.genesis import load_genesis

    config = load_config(Path(args.config) if args.config else None, **overrides_from_args(args))
    if args.no_executor:
        config = type(config)(**{**config.__dict__, "models": []})
    genesis = load_genesis(config.genesis) if config.genesis else None

    status = err_console.status("starting the node")  # model loads and warm-ups take seconds

    def ready(node: object) -> None:
        status.stop()
        addr = node.service.listen_addrs[0]  # type: ignore[attr-defined]
        gateway = node.gateway  # type: ignore[attr-defined]
        if gateway is not None:
            print(f"HTTP {gateway.url}", flush=True)
        print(f"READY {addr}", flush=True)
        err_console.print(f"[green]node {node.key.peer_id} serving {config.models or 'as TA only'}"  # type: ignore[attr-defined]
                          f" at {addr}[/green]")

    loader = cheating_loader(load_engine, config.cheater) if config.cheater else load_engine
    # public hosts relay for those behind NATs; one behind a NAT reserves on its bootstrap peers
    relay = RelayOptions(hop=not config.behind_nat,
                         reserve_on=relay_addrs(config.bootstrap) if config.behind_nat else ())
    with status:
        asyncio.run(run_node(config, partial(Libp2pService, relay=relay), loader, genesis, ready, status.update))
    return 0


def _poc_params(args: argparse.Namespace) -> dict[str, int]:
    """Genesis parameters of ``init --proof-of-compute``: weights earned by proof of compute,
    with the round windows scaled to the epoch (``ledger/poc.py``) and a cheap join stamp."""
    if not args.proof_of_compute:
        return {}
    unit = max(1, args.epoch_length // 20)
    return {"poc_enabled": 1, "poc_start_offset_blocks": unit, "poc_compute_blocks": 2 * unit + 2,
            "poc_secret_blocks": unit + 1, "poc_reveal_blocks": unit + 1, "poc_verdict_blocks": 2 * unit + 2,
            "poc_confirm_compute_blocks": unit + 2, "poc_join_pow_bits": 12}


def cmd_init(args: argparse.Namespace) -> int:
    from gonka_p2p.inference.verification_params import thresholds_table
    from gonka_p2p.ledger.devnet import DEFAULT_MODELS, init_local_network

    net = init_local_network(Path(args.out), nodes=args.nodes, clients=args.clients,
                             models=tuple(args.model or DEFAULT_MODELS), client_balance=args.client_balance,
                             epoch_length_blocks=args.epoch_length, chain_id=args.chain_id,
                             verification=thresholds_table(), dtype=args.dtype, **_poc_params(args))
    print(f"local network {net.genesis.chain_id!r} in {args.out}: genesis {net.genesis_path}")
    for model, pin in net.genesis.models.items():
        print(f"  model {model} pinned: {pin.dtype}, digest {pin.digest}")
    weights = net.genesis.weights()
    for path in net.node_keys + net.client_keys:
        peer = Keypair.load(path).peer_id
        role = (f"node, weight {weights[peer]}" if peer in weights
                else f"client, balance {net.genesis.allocations[peer]}")
        print(f"  {path}  {peer}  {role}")
    first = f"gonka-p2p node --key {net.node_keys[0]} --genesis {net.genesis_path} --listen /ip4/127.0.0.1/tcp/9000"
    first += "".join(f" --model {model}" for model in args.model or ())
    print(f"start the first node with:\n  {first}\nand the others with --key {args.out}/nodeN.key, "
          "another --listen port and --bootstrap <the first node's READY address>")
    return 0


async def _ask_node(node: str, question: Callable[[GonkaClient], Awaitable[object]]) -> object:
    """Dial ``node`` with a throw-away client key and ask it one thing."""
    from gonka_p2p.client import GonkaClient

    client = await GonkaClient.connect(node)
    async with client:
        return await question(client)


async def _status_and_genesis_hash(client: GonkaClient, prover: str | None) -> tuple[object, str]:
    """The node's ledger status (with ``prover``'s last proof-of-compute result, the node's own
    by default), and the hash of the genesis it serves to joining nodes (or why not)."""
    from gonka_p2p.actors.genesis_exchange import ask_genesis
    from gonka_p2p.gossip.service import NetworkError
    from gonka_p2p.wire.schema import WireError

    status = await client.status(prover)
    try:
        genesis = await ask_genesis(client.service, client.ta)
    except (NetworkError, TimeoutError, WireError) as e:
        return status, f"unknown ({str(e) or type(e).__name__})"
    return status, genesis.hash().hex() if genesis is not None else "none"


def _poc_lines(status: StatusReply) -> list[str]:
    """The proof-of-compute schedule, and the asked prover's last result."""
    if not status.poc_enabled:
        return ["proof of compute: off (weights are fixed at genesis)"]
    confirmation = (f"opened at height {status.confirmation}" if status.confirmation
                    else "not yet open (it opens at an unpredictable height after the regular round)")
    lines = [f"proof of compute: next regular round at height {status.next_poc}; "
             f"this epoch's confirmation: {confirmation}"]
    if not status.last_poc:
        lines.append(f"last proof of compute of {status.prover}: none")
    for r in status.last_poc:
        lines.append(f"last proof of compute of {status.prover}: epoch {r.epoch} {r.round} round, "
                     f"{r.model}, {r.count} nonces: {r.verdict}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from gonka_p2p.ledger.query import StatusReply
    from gonka_p2p.ledger.rules import is_account_address

    if args.peer is not None and not is_account_address(args.peer):
        raise UsageProblem(f"{args.peer!r} is not a peer id (a peer id looks like 16Uiu2HAm...)")
    status, genesis_hash = asyncio.run(_ask_node(  # type: ignore[misc]
        args.node, lambda client: _status_and_genesis_hash(client, args.peer)))
    assert isinstance(status, StatusReply)
    console = Console()
    console.print(f"chain {status.chain_id}  height {status.height}  epoch {status.epoch}  "
                  f"app hash {status.app_hash.hex()}")
    console.print(f"genesis {genesis_hash}")
    console.print(f"mempool {status.mempool} transactions, {status.evidence} equivocations seen")
    for line in _poc_lines(status):
        console.print(line, highlight=False)
    # One line each, not a table: a peer id alone is 53 characters, and a table squeezed into a
    # terminal would cut ids and weights short.
    console.print("participants (power: consensus voting power):")
    for p in status.participants:
        per_model = ", ".join(f"{m.model}: {m.weight}" for m in p.model_weights) or "none"
        print(f"  {p.peer_id}  weight {p.weight}  power {p.power}  per model {per_model}  "
              f"completed {p.completed}  missed {p.missed}")
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    from gonka_p2p.ledger.query import BalanceReply
    from gonka_p2p.ledger.rules import is_account_address

    if not is_account_address(args.peer_id):
        raise UsageProblem(f"{args.peer_id!r} is not a peer id (an account address looks like 16Uiu2HAm...)")
    reply = asyncio.run(_ask_node(args.node, lambda c: c.balance(args.peer_id)))
    assert isinstance(reply, BalanceReply)
    if not reply.exists:
        print(f"{args.peer_id}: no account (balance 0) at height {reply.height}")
    else:
        print(f"{args.peer_id}: balance {reply.balance}, sequence {reply.sequence}, "
              f"pending fees {reply.pending_fees} (height {reply.height})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gonka_p2p.demo import run_demo

    return asyncio.run(run_demo(
        nodes=args.nodes, requests=args.requests, engine=args.engine, model=args.model,
        max_tokens=args.max_tokens, cheater=args.cheater,
    ))


def cmd_sim(args: argparse.Namespace) -> int:
    try:
        from sim.command import main as sim_main
    except ModuleNotFoundError as e:
        if e.name != "sim":
            raise
        raise UsageProblem("gonka-p2p sim needs the repository's sim/ package: install the clone "
                           "in editable mode (scripts/setup.sh), or run python -m sim in it") from None
    return sim_main(args.sim_args)


def cmd_testnet(args: argparse.Namespace) -> int:
    from gonka_p2p.testnet import netns
    from gonka_p2p.testnet.manifest import load_manifest
    from gonka_p2p.testnet.report import save, show
    from gonka_p2p.testnet.runner import Testnet

    if args.action == "down":
        netns.require_privilege()
        removed = netns.cleanup()
        print(f"removed {len(removed)} testnet namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if args.manifest is None:
        raise UsageProblem(f"gonka-p2p testnet {args.action} needs a MANIFEST (e.g. testnet/short.toml)")
    net = Testnet(load_manifest(Path(args.manifest)), Path(args.workdir))
    console = Console()
    try:
        net.up()
        console.print(f"{len(net.participants)} participants up: "
                      + ", ".join(p.addr for p in net.participants))
        if args.action == "up":
            console.print("Ctrl-C stops them and removes the namespaces")
            signal.pause()
            return 0
        verdict = net.run(console.print)
    finally:
        net.down()
    show(verdict, net.applied, console)
    save(verdict, net.applied, Path(args.workdir) / "report.json")
    return 0 if verdict.passed else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    from gonka_p2p.inference.model_names import DEFAULT_DTYPE, DEFAULT_MODEL, DTYPES
    from gonka_p2p.ledger.devnet import DEFAULT_MODELS, DEVNET_CHAIN_ID, DEVNET_CLIENT_BALANCE, DEVNET_EPOCH_BLOCKS

    parser = argparse.ArgumentParser(prog="gonka-p2p", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", choices=tuple(LOG_LEVELS), default="warning",
                        help="what the node logs to stderr (default: warning)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                        help="debug logging (--log-level debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a secp256k1 key file (0600) and print its peer id")
    p.add_argument("--out", default=str(NodeConfig().key))
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("node", help="run a participant: TA, executor and directory")
    p.add_argument("--config", help="TOML config file (flags override it)")
    add_node_options(p)
    p.add_argument("--no-executor", action="store_true", help="serve as TA only, load no model")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("init", help="write keys and a genesis for a local network")
    p.add_argument("--nodes", type=int, required=True, help="participants (equal weights)")
    p.add_argument("--clients", type=int, default=1, help="funded client keys")
    p.add_argument("--out", default="devnet", help="directory to write into (default: devnet)")
    p.add_argument("--model", action="append", help=f"model the nodes serve (default {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--client-balance", type=int, default=DEVNET_CLIENT_BALANCE, help="coins per client")
    p.add_argument("--epoch-length", type=int, default=DEVNET_EPOCH_BLOCKS, help="blocks per epoch")
    p.add_argument("--chain-id", default=DEVNET_CHAIN_ID)
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="the dtype every engine loads the models in (pinned in genesis beside each model's "
                        "digest, which init computes from this machine's files)")
    p.add_argument("--proof-of-compute", action="store_true",
                   help="open membership: weights are earned each epoch by proof of compute, and a node "
                        "with a fresh key joins with --bootstrap alone")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("status", help="ask a node for the ledger's height, epoch, app hash, participants' "
                       "weights and voting power, and the proof-of-compute schedule and results")
    p.add_argument("--node", required=True, help="multiaddr of a running node")
    p.add_argument("--peer", help="whose last proof-of-compute result to show (default: the node's own)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("balance", help="ask a node for an account's balance")
    p.add_argument("peer_id", help="the account (a peer id)")
    p.add_argument("--node", required=True, help="multiaddr of a running node")
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser("demo", help="start a local network and send it chat requests")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--engine", choices=ENGINES, default=NodeConfig().engine)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--cheater", metavar="CHEAT", type=cheat_name,
                   help="add a participant that cheats (e.g. int4, prefill, small) and show it caught")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sim", add_help=False, prefix_chars="+",
                       help="the researchers' simulator: run a scenario file (gonka-p2p sim SCENARIO --seed N "
                       "--out DIR), sweep a knob (gonka-p2p sim sweep SCENARIO --param K=LOW:HIGH:STEPS), "
                       "list the ready scenarios (gonka-p2p sim list)")
    # prefix_chars "+": every word after "sim", --help included, is the simulator's to parse
    p.add_argument("sim_args", nargs=argparse.REMAINDER, help="see gonka-p2p sim --help")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("testnet", help="run participants in their own network namespaces under load and "
                       "faults, and check the invariants (needs root)")
    p.add_argument("action", choices=("run", "up", "down"), help="run a manifest; only start it; remove leftovers")
    p.add_argument("manifest", nargs="?", help="the TOML manifest (see testnet/)")
    p.add_argument("--workdir", default="testnet-run", help="keys, logs and the report (default testnet-run)")
    p.set_defaults(func=cmd_testnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    from gonka_p2p.actors.node import StartupError
    from gonka_p2p.gossip.service import NetworkError
    from gonka_p2p.inference.engine import EngineError
    from gonka_p2p.client import GonkaError
    from gonka_p2p.ledger.devnet import DevnetError
    from gonka_p2p.ledger.genesis import GenesisError
    from gonka_p2p.testnet.manifest import ManifestError
    from gonka_p2p.testnet.netns import PrivilegeError
    from gonka_p2p.testnet.runner import TestnetError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ConfigError, KeyFileError, StartupError, EngineError, NetworkError, GenesisError, DevnetError,
            GonkaError, UsageProblem, ManifestError, PrivilegeError, TestnetError) as e:
        if os.environ.get("GONKA_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {e}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
