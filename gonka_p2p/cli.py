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
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from gonka_p2p.config import ConfigError, load_config
from gonka_p2p.identity import Keypair, KeyFileError

err_console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


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
    from gonka_p2p.gossip.libp2p_service import Libp2pService
    from gonka_p2p.inference.factory import load_engine
    from gonka_p2p.ledger.genesis_weights import load_weights

    config = load_config(
        Path(args.config) if args.config else None,
        key=args.key, listen=args.listen, bootstrap=args.bootstrap or None,
        models=args.model or None, engine=args.engine, genesis=args.genesis,
        announce_interval=args.announce_interval, http=args.http,
    )
    if args.no_executor:
        config = type(config)(**{**config.__dict__, "models": []})
    weights = load_weights(config.genesis) if config.genesis else None

    def ready(node: object) -> None:
        addr = node.service.listen_addrs[0]  # type: ignore[attr-defined]
        gateway = node.gateway  # type: ignore[attr-defined]
        if gateway is not None:
            print(f"HTTP {gateway.url}", flush=True)
        print(f"READY {addr}", flush=True)
        err_console.print(f"[green]node {node.key.peer_id} serving {config.models or 'as TA only'}"  # type: ignore[attr-defined]
                          f" at {addr}[/green]")

    asyncio.run(run_node(config, Libp2pService, load_engine, weights, ready))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gonka_p2p.demo import run_demo

    return asyncio.run(run_demo(
        nodes=args.nodes, requests=args.requests, engine=args.engine, model=args.model,
        max_tokens=args.max_tokens,
    ))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gonka-p2p", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a secp256k1 key file (0600) and print its peer id")
    p.add_argument("--out", default="node.key")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("node", help="run a participant: TA, executor and directory")
    p.add_argument("--config", help="TOML config file (flags override it)")
    p.add_argument("--key", help="key file (created if missing)")
    p.add_argument("--listen", help="listen multiaddr, e.g. /ip4/127.0.0.1/tcp/9000")
    p.add_argument("--bootstrap", action="append", help="multiaddr of a peer to join through")
    p.add_argument("--model", action="append", help="model to serve (name or HF directory)")
    p.add_argument("--engine", choices=("vllm", "torch"))
    p.add_argument("--genesis", help="genesis file with participant weights")
    p.add_argument("--announce-interval", type=float)
    p.add_argument("--no-executor", action="store_true", help="serve as TA only, load no model")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible API here, e.g. 127.0.0.1:8000")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("demo", help="start a local network and send it chat requests")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--engine", choices=("vllm", "torch"), default="vllm")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from gonka_p2p.actors.node import StartupError
    from gonka_p2p.gossip.service import NetworkError
    from gonka_p2p.inference.engine import EngineError
    from gonka_p2p.ledger.genesis import GenesisError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ConfigError, KeyFileError, StartupError, EngineError, NetworkError, GenesisError) as e:
        if os.environ.get("GONKA_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {e}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
