"""Node configuration: a TOML file, overridden by command-line flags.

Example ``node.toml``::

    key = "node.key"                      # created (0600) if missing
    listen = "/ip4/127.0.0.1/tcp/9000"
    bootstrap = ["/ip4/127.0.0.1/tcp/9001/p2p/16Uiu2..."]
    models = ["smollm2-135m"]             # models this node executes; [] = TA only
    engine = "vllm"                       # or "torch"
    genesis = "genesis.json"              # the network's genesis: with it the node runs a ledger replica
    data_dir = "node-ledger"              # the replica's SQLite store (default: <key file>-ledger/)
    empty_block_interval = 5.0            # seconds between blocks when nothing happens
    announce_interval = 2.0               # seconds
    http = "127.0.0.1:8000"               # OpenAI-compatible gateway; omit for none
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENGINES = ("vllm", "torch")


class ConfigError(Exception):
    """A configuration problem, explained for people."""


@dataclass(frozen=True)
class NodeConfig:
    key: Path = Path("node.key")
    listen: str = "/ip4/127.0.0.1/tcp/9000"
    bootstrap: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    engine: str = "vllm"
    genesis: Path | None = None
    announce_interval: float = 2.0
    max_concurrent: int = 16
    http: str | None = None  # "HOST:PORT" of the OpenAI-compatible gateway
    data_dir: Path | None = None  # the ledger replica's store; None: next to the key file
    empty_block_interval: float = 5.0  # seconds; an idle chain still commits a block this often
    cheater: str | None = None  # serve this cheat (gonka_p2p.adversary.cheats.CHEATS): demos and tests

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
        return self


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
    for name in ("key", "genesis", "data_dir"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    try:
        return replace(NodeConfig(), **values).validated()
    except TypeError as e:
        raise ConfigError(f"bad config value: {e}") from None
