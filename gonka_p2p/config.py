"""Node configuration: a TOML file, overridden by command-line flags.

One table, :class:`NodeConfig`: each field is one option, declared once with
its default, its help and how it is spelled on the command line
(:func:`_option`). The TOML keys are the field names, ``gonka-p2p node``'s
flags are made from the same fields (:func:`add_node_options`), and a flag a
person did not give leaves the file's value alone.

Example ``node.toml``::

    key = "node.key"                      # created (0600) if missing
    listen = "/ip4/127.0.0.1/tcp/9000"
    bootstrap = ["/ip4/127.0.0.1/tcp/9001/p2p/16Uiu2..."]
    behind_nat = false                    # true: not dialable; reachable through the bootstrap peers (relays)
    models = ["smollm2-135m"]             # models this node executes; [] = TA only
    engine = "vllm"                       # or "torch"
    tensor_parallel_size = 1              # vLLM on multi-GPU hosts: GPUs per engine
    gpu_memory_utilization = 0.9          # vLLM on a GPU: its share of GPU memory (omit: a 1 GiB KV cache)
    max_model_len = 8192                  # cap on prompt + completion tokens (omit: the model's own)
    genesis = "genesis.json"              # the network's genesis: with it the node runs a ledger replica
    genesis_hash = "3f1c..."              # pinned: without a file, the genesis is fetched from bootstrap peers
    data_dir = "node-ledger"              # the replica's and the evidence store (default: <key file>-ledger/)
    evidence_max_bytes = 1073741824       # artifacts kept for validators until their epoch settles
    empty_block_interval = 5.0            # seconds between blocks when nothing happens
    announce_interval = 2.0               # seconds
    stall_timeout = 30.0                  # seconds without a token before a stream is cancelled
    http = "127.0.0.1:8000"               # OpenAI-compatible gateway; omit for none
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gonka_p2p.inference.model_names import DEFAULT_MODEL

ENGINES = ("vllm", "torch")


class ConfigError(Exception):
    """A configuration problem, explained for people."""


def cheat_name(name: str) -> str:
    """argparse type of ``--cheater``: the canonical cheat name, or a usage error listing them."""
    from gonka_p2p.adversary.cheats import cheat_named

    try:
        return cheat_named(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _option(default: Any, help: str | None = None, *, flag: str | None = "", **cli: Any) -> Any:
    """One node option's single declaration: its default, its help (``{default}`` in it is
    the default), and its command-line flag with any further ``argparse`` keywords (``cli``).
    ``flag``: ``""`` derives ``--the-name`` from the field; ``None`` makes it a TOML-only option."""
    metadata = {"help": help.format(default=default) if help else None, "flag": flag, "cli": cli}
    if isinstance(default, list):  # a fresh list per config, never one shared default
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NodeConfig:
    """Every option of ``gonka-p2p node``, in the order ``--help`` lists them."""

    key: Path = _option(Path("node.key"), "key file (created if missing)")
    listen: str = _option("/ip4/127.0.0.1/tcp/9000", "listen multiaddr, e.g. /ip4/127.0.0.1/tcp/9000")
    bootstrap: list[str] = _option([], "multiaddr of a peer to join through", action="append")
    behind_nat: bool = _option(  # gossip/relay.py: configured, not detected (a private address says nothing)
        False, "this host cannot be dialed (behind a NAT): reserve a slot on the bootstrap peers, which relay, "
               "and announce the circuits through them instead of the listen address",
        action="store_const", const=True)  # absent: None, so a file's value stands
    models: list[str] = _option([DEFAULT_MODEL], "model to serve (name or HF directory)",
                                flag="--model", action="append")
    engine: str = _option("vllm", choices=ENGINES)
    # vLLM's engine arguments that matter on multi-GPU hosts (inference/vllm_engine.vllm_engine_args);
    # the torch engine and a CPU ignore the first two with a warning.
    tensor_parallel_size: int = _option(1, "GPUs one vLLM engine spans (default {default})", type=int)
    gpu_memory_utilization: float | None = _option(
        None, "share of each GPU's memory vLLM may take, e.g. 0.9 (default: a 1 GiB KV cache)", type=float)
    max_model_len: int | None = _option(
        None, "cap on a request's prompt + completion tokens (default: the model's context)", type=int)
    genesis: Path | None = _option(  # actors/genesis_exchange.py: where a genesis comes from
        None, "genesis file with participant weights (default: the one saved in the data dir, else the "
              "one the bootstrap peers serve)")
    genesis_hash: str | None = _option(
        None, "the network's genesis hash, pinned: a genesis with another (from any source) is refused",
        metavar="HEX")
    announce_interval: float = _option(2.0, type=float)  # seconds between announcements
    cheater: str | None = _option(  # a cheat of gonka_p2p.adversary.cheats.CHEATS: demos and tests
        None, "serve a cheating executor (demos and tests: validators must catch it); "
              "one of fp16 bf16 int8 int4 small-model (or small) prefill fabricated truncated "
              "altered wrong-temperature", metavar="CHEAT", type=cheat_name)
    http: str | None = _option(None, "also serve the OpenAI-compatible API here, e.g. 127.0.0.1:8000",
                               metavar="HOST:PORT")
    data_dir: Path | None = _option(
        None, "the ledger replica's store and the evidence store (default: <key file>-ledger beside the key)")
    empty_block_interval: float = _option(  # an idle chain still commits a block this often
        5.0, "seconds between blocks when there are no transactions (default {default:g})", type=float)
    max_concurrent: int = _option(16, flag=None)  # inferences the executor runs at once
    stall_timeout: float = _option(  # a stream's executor silent this long is cancelled and reported
        30.0, "seconds without a token after which the TA cancels an executor's stream and tells "
              "the client (default {default:g})", type=float)
    first_frame_timeout: float = _option(  # a draw whose executor has not started by then is redrawn
        60.0, "seconds the TA waits for a drawn executor's first frame (a dial that hangs, an executor "
              "frozen or busy proving compute) before it draws the next one; a whole-answer HTTP client "
              "may wait attempts x this (default {default:g})", type=float)
    answer_recovery: float = _option(  # the OpenAI gateway's twin of the client library's recovery
        120.0, "seconds the OpenAI gateway seeks an answer its relay lost after the executor started "
               "(a partition may cut it while the executor finishes and is paid) before it reports "
               "the failure; 0: never (default {default:g})", type=float)
    evidence_max_bytes: int = _option(  # sized to an epoch's traffic plus its settlement delay
        1 << 30, "bytes of evidence kept for validators until its epoch settles; when full the node "
                 "executes nothing new (default {default})", type=int)

    @property
    def ledger_dir(self) -> Path:
        """Where the replica keeps its store: ``data_dir``, or ``<key file>-ledger`` beside the key."""
        return self.data_dir if self.data_dir is not None else self.key.parent / f"{self.key.name}-ledger"

    def validated(self) -> NodeConfig:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not self.listen.startswith("/ip4/") and not self.listen.startswith("/ip6/"):
            raise ConfigError(f"listen must be a multiaddr like /ip4/127.0.0.1/tcp/9000, not {self.listen!r}")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ConfigError(f"bootstrap address {addr!r} must end in /p2p/<peer id>")
        if self.behind_nat and not self.bootstrap:
            raise ConfigError("behind_nat needs a --bootstrap peer with a public address to relay for it")
        if self.genesis_hash is not None and not _is_hash_hex(self.genesis_hash):
            raise ConfigError(f"genesis_hash must be 64 hex digits (a SHA-256), not {self.genesis_hash!r}")
        if self.announce_interval <= 0:
            raise ConfigError("announce_interval must be positive")
        if self.http is not None:
            parse_http_address(self.http)
        if self.cheater is not None:
            from gonka_p2p.adversary.cheats import CHEATS

            if self.cheater not in CHEATS:
                raise ConfigError(f"unknown cheat {self.cheater!r}: choose from {', '.join(CHEATS)}")
        if self.empty_block_interval <= 0:
            raise ConfigError("empty_block_interval must be positive")
        if self.evidence_max_bytes <= 0:
            raise ConfigError("evidence_max_bytes must be positive")
        if self.stall_timeout <= 0 or self.first_frame_timeout <= 0:
            raise ConfigError("stall_timeout and first_frame_timeout must be positive")
        if self.answer_recovery < 0:
            raise ConfigError("answer_recovery must not be negative")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be at least 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be at least 1")
        return self


def _is_hash_hex(text: str) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def _flags() -> list[tuple[Field[Any], str]]:
    """The options that have a command-line flag, with it, in table order."""
    return [(f, f.metadata["flag"] or "--" + f.name.replace("_", "-"))
            for f in fields(NodeConfig) if f.metadata["flag"] is not None]


def add_node_options(parser: argparse.ArgumentParser) -> None:
    """Add a flag per option. Defaults stay None, so an absent flag keeps the file's value."""
    for f, flag in _flags():
        cli = {"metavar": flag.removeprefix("--").replace("-", "_").upper(), **f.metadata["cli"]}
        if "choices" in cli or "const" in cli:
            del cli["metavar"]  # argparse then lists the choices; a switch takes no value
        parser.add_argument(flag, dest=f.name, help=f.metadata["help"], **cli)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (see :func:`add_node_options`), for :func:`load_config`."""
    return {f.name: getattr(args, f.name) for f, _ in _flags()}


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); brackets around an IPv6 host are dropped; port 0 picks one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"http must be HOST:PORT like 127.0.0.1:8000, not {text!r}")
    return host.strip("[]"), int(port)


def load_config(path: Path | None, **overrides: Any) -> NodeConfig:
    """Read ``path`` (if given) and apply the non-None ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.name for f in fields(NodeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    for f in fields(NodeConfig):
        if str(f.type).startswith("Path") and values.get(f.name) is not None:  # TOML has no path type
            values[f.name] = Path(values[f.name])
    try:
        return replace(NodeConfig(), **values).validated()
    except TypeError as e:
        raise ConfigError(f"bad config value: {e}") from None
