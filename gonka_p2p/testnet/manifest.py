"""A testnet's manifest: one TOML file says who runs, what load they carry and what goes wrong.

Example (``testnet/short.toml``)::

    seed = 7
    duration_s = 180            # load and perturbations run this long
    nodes = 5                   # participants, each in its own namespace
    model = "tiny-llama"
    engine = "torch"
    weights = [10, 10, 10, 10, 10]   # optional, equal by default
    empty_block_interval = 1.0
    recovery_bound_s = 60       # the network must commit again this soon after each perturbation

    [load]
    rate = 0.5                  # requests per second, steady
    max_tokens = 8
    timeout_s = 60

    [[perturbation]]
    kind = "kill"               # kill | freeze | partition | drop | bandwidth | rolling
    at_s = 30
    for_s = 15                  # how long it lasts (kill: down time before the restart)
    targets = [2]               # optional: node indices; drawn from the seed when absent

Every field is declared once in the dataclasses below with its default; a
manifest with an unknown key, a bad kind or an out-of-range target is
refused with one sentence naming it (:class:`ManifestError`).
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gonka_p2p.inference.model_names import TINY_MODEL

# kind -> how many targets it takes when the manifest names none (0: the whole network)
PERTURBATIONS = {"kill": 1, "freeze": 1, "partition": 2, "drop": 1, "bandwidth": 1, "rolling": 0}


class ManifestError(Exception):
    """The manifest cannot be run as written; the message says which field and why."""


@dataclass(frozen=True)
class Load:
    rate: float = 0.5  # requests per second
    max_tokens: int = 8
    timeout_s: float = 60.0  # a request without its whole answer by then is an error
    concurrency: int = 8  # requests in flight at most; beyond it the client skips a tick


@dataclass(frozen=True)
class Perturbation:
    kind: str
    at_s: float  # seconds after the load starts
    for_s: float = 15.0
    targets: tuple[int, ...] = ()  # node indices (partition: the minority side)
    share: float = 0.3  # drop: the share of packets dropped each way
    rate_kbit: int = 64  # bandwidth: the cap each way
    forever: bool = False  # never undone: a freeze never thawed (byzantine power), a kill never restarted

    @property
    def end_s(self) -> float:
        return self.at_s + self.for_s


@dataclass(frozen=True)
class Manifest:
    seed: int = 1
    duration_s: float = 180.0
    nodes: int = 5
    model: str = TINY_MODEL
    engine: str = "torch"
    weights: tuple[int, ...] = ()
    empty_block_interval: float = 1.0
    recovery_bound_s: float = 60.0
    settle_s: float = 120.0  # after the load: how long requests may take to reach a final ledger status
    load: Load = field(default_factory=Load)
    perturbations: tuple[Perturbation, ...] = ()


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as e:
        raise ManifestError(f"{where}: {e}") from None


def _with_targets(p: Perturbation, nodes: int, rng: random.Random) -> Perturbation:
    """Fill in the targets the manifest left to the seed, and check the ones it named."""
    if p.kind not in PERTURBATIONS:
        raise ManifestError(f"perturbation kind {p.kind!r} unknown: one of {', '.join(PERTURBATIONS)}")
    if p.at_s < 0 or p.for_s <= 0:
        raise ManifestError(f"perturbation {p.kind} at {p.at_s}: at_s must be >= 0 and for_s > 0")
    if not 0 < p.share < 1:
        raise ManifestError(f"perturbation {p.kind}: share must lie strictly between 0 and 1")
    targets = p.targets or tuple(sorted(rng.sample(range(nodes), PERTURBATIONS[p.kind])))
    if any(not 0 <= t < nodes for t in targets) or len(set(targets)) != len(targets):
        raise ManifestError(f"perturbation {p.kind}: targets {list(targets)} must be distinct indices below {nodes}")
    if p.kind == "partition" and len(targets) >= nodes:
        raise ManifestError("partition: the named side must leave at least one node on the other side")
    return Perturbation(**{**p.__dict__, "targets": targets})


def parse_manifest(text: str, where: str = "manifest") -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{where} is not valid TOML: {e}") from None
    load = _build(Load, raw.pop("load", {}), f"{where} [load]")
    perturbations = [_build(Perturbation, {**p, "targets": tuple(p.get("targets", ()))}, f"{where} [[perturbation]]")
                     for p in raw.pop("perturbation", [])]
    raw["weights"] = tuple(raw.get("weights", ()))
    manifest: Manifest = _build(Manifest, raw, where)
    if manifest.nodes < 1 or manifest.duration_s <= 0 or load.rate <= 0:
        raise ManifestError(f"{where}: nodes >= 1, duration_s > 0 and load.rate > 0 are required")
    if manifest.weights and len(manifest.weights) != manifest.nodes:
        raise ManifestError(f"{where}: weights lists {len(manifest.weights)} nodes, nodes is {manifest.nodes}")
    rng = random.Random(manifest.seed)
    chosen = tuple(_with_targets(p, manifest.nodes, rng) for p in sorted(perturbations, key=lambda p: p.at_s))
    return Manifest(**{**manifest.__dict__, "load": load, "perturbations": chosen})


def load_manifest(path: Path) -> Manifest:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
    return parse_manifest(text, str(path))
