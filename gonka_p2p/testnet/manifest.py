"""A testnet's manifest: one TOML file says who runs, what load they carry and what goes wrong.

Example (``testnet/short.toml``)::

    seed = 7
    duration_s = 180            # load and perturbations run this long
    nodes = 5                   # participants, each in its own namespace
    model = "tiny-llama"
    engine = "torch"
    weights = [10, 10, 10, 10, 10]   # optional, equal by default; "poc": earned by proof of compute
    nat = [3]                   # optional: these participants sit behind a NAT, reached through relays
    epoch_length = 100          # blocks per epoch (proof of compute: one regular round each)
    empty_block_interval = 1.0
    stall_timeout_s = 8         # the TAs cancel an executor silent this long, or not started (shorter than any freeze)
    recovery_bound_s = 60       # the network must commit again this soon after each perturbation

    [load]
    rate = 0.5                  # requests per second, steady
    max_tokens = 8
    idle_s = 20                 # a TA silent this long is cut by the client (StreamStalled)
    timeout_s = 60              # a request with no end by then hung: the streams-never-hang row fails
    http_share = 0.3            # this share of requests goes through a TA's OpenAI gateway
    recovery_s = 120            # a request whose stream broke seeks the answer this long

    [[perturbation]]
    kind = "kill"               # kill | freeze | partition | drop | bandwidth | rolling | join | leave
    at_s = 30
    for_s = 15                  # how long it lasts (kill: down time before the restart)
    targets = [2]               # optional: node indices; drawn from the seed when absent

A participant in ``nat`` lives behind a masquerading router
(:func:`~gonka_p2p.testnet.netns.create_natted_host`) and runs with
``--behind-nat``: the others reach it only through the circuits its relays
(its bootstrap peers) hold for it; the load client sends it no HTTP
request (an HTTP gateway has no relay). Participant 0 starts first, with
nobody to relay for it, so it cannot be one.

``join`` starts a participant that is not in the genesis (index ``nodes``,
``nodes + 1``, ... in the order of the joins) with a fresh key and only
``--bootstrap``; ``leave`` stops one for good. Both are for good (never
undone) and need ``weights = "poc"``: a stranger earns weight, and a leaver
loses it, only by proof of compute. A participant that left is never the
target of a later perturbation.

Every field is declared once in the dataclasses below with its default; a
manifest with an unknown key, a bad kind or an out-of-range target is
refused with one sentence naming it (:class:`ManifestError`).
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from gonka_p2p.inference.model_names import TINY_MODEL
from gonka_p2p.ledger.devnet import DEVNET_EPOCH_BLOCKS

# kind -> how many targets it takes when the manifest names none (0: the whole network, or for a
# join the new participant)
PERTURBATIONS = {"kill": 1, "freeze": 1, "partition": 2, "drop": 1, "bandwidth": 1, "rolling": 0,
                 "join": 0, "leave": 1}
MEMBERSHIP = ("join", "leave")  # for good, and only with weights earned by proof of compute


class ManifestError(Exception):
    """The manifest cannot be run as written; the message says which field and why."""


@dataclass(frozen=True)
class Load:
    rate: float = 0.5  # requests per second
    max_tokens: int = 8
    idle_s: float = 20.0  # the client's idle timeout: a TA silent this long is cut (StreamStalled)
    timeout_s: float = 60.0  # a request with no end by then hung (the TA and the client both failed to cut it)
    concurrency: int = 8  # requests in flight at most; beyond it the client skips a tick
    http_share: float = 0.0  # share of requests sent through a TA's OpenAI gateway (streamed every other one)
    recovery_s: float = 120.0  # a request whose stream broke seeks its answer this long, until
    # the ledger settles it (fetched) or expires it (refunded): the client library's RECOVERY_TIMEOUT_S on
    # the libp2p path, the gateway's --answer-recovery on the HTTP one


@dataclass(frozen=True)
class Perturbation:
    kind: str
    at_s: float  # seconds after the load starts
    for_s: float = 15.0
    targets: tuple[int, ...] = ()  # node indices (partition: the minority side)
    share: float = 0.3  # drop: the share of packets dropped each way
    rate_kbit: int = 64  # bandwidth: the cap each way
    forever: bool = False  # never undone: a freeze never thawed (byzantine power), a kill never restarted;
    # join and leave always are

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
    weights: tuple[int, ...] | Literal["poc"] = ()  # () equal; "poc": earned by proof of compute
    nat: tuple[int, ...] = ()  # genesis participants behind a NAT (never 0: it starts with no relay)
    epoch_length: int = DEVNET_EPOCH_BLOCKS
    empty_block_interval: float = 1.0
    stall_timeout_s: float = 8.0  # every TA's stall_timeout: shorter than a freeze, so a frozen
    # executor's stream is cancelled, reported and refunded rather than left hanging
    recovery_bound_s: float = 60.0
    settle_s: float = 120.0  # after the load: how long requests may take to reach a final ledger status
    load: Load = field(default_factory=Load)
    perturbations: tuple[Perturbation, ...] = ()

    @property
    def proof_of_compute(self) -> bool:
        return self.weights == "poc"

    @property
    def joiners(self) -> int:
        return sum(p.kind == "join" for p in self.perturbations)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except TypeError as e:
        raise ManifestError(f"{where}: {e}") from None


def _with_targets(p: Perturbation, m: Manifest, rng: random.Random, left: set[int], joined: int) -> Perturbation:
    """Fill in the targets the manifest left to the seed, and check the ones it named. ``left``:
    the participants a leave before ``p`` stopped; ``joined``: the joins before ``p``."""
    if p.kind not in PERTURBATIONS:
        raise ManifestError(f"perturbation kind {p.kind!r} unknown: one of {', '.join(PERTURBATIONS)}")
    if p.at_s < 0 or p.for_s <= 0:
        raise ManifestError(f"perturbation {p.kind} at {p.at_s}: at_s must be >= 0 and for_s > 0")
    if not 0 < p.share < 1:
        raise ManifestError(f"perturbation {p.kind}: share must lie strictly between 0 and 1")
    if p.kind in MEMBERSHIP and not m.proof_of_compute:
        raise ManifestError(f'perturbation {p.kind}: needs weights = "poc" (weight is earned and lost '
                            "only by proof of compute)")
    if p.kind == "freeze" and not p.forever and p.for_s <= m.stall_timeout_s:
        raise ManifestError(f"freeze at {p.at_s}: for_s must exceed stall_timeout_s ({m.stall_timeout_s:g}) "
                            "so that the frozen executor's streams are cut, not waited out")
    if p.kind == "join":
        if p.targets:
            raise ManifestError("join: takes no targets (the new participant is the next index)")
        return replace(p, targets=(m.nodes + joined,), forever=True)
    present = [i for i in range(m.nodes) if i not in left]
    targets = p.targets or tuple(sorted(rng.sample(present, PERTURBATIONS[p.kind])))
    if any(t not in present for t in targets) or len(set(targets)) != len(targets):
        raise ManifestError(f"perturbation {p.kind} at {p.at_s}: targets {list(targets)} must be distinct "
                            f"indices below {m.nodes} of participants that have not left")
    if p.kind == "partition" and len(targets) >= len(present):
        raise ManifestError("partition: the named side must leave at least one node on the other side")
    return replace(p, targets=targets, forever=p.forever or p.kind == "leave")


def parse_manifest(text: str, where: str = "manifest") -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{where} is not valid TOML: {e}") from None
    load = _build(Load, raw.pop("load", {}), f"{where} [load]")
    perturbations = [_build(Perturbation, {**p, "targets": tuple(p.get("targets", ()))}, f"{where} [[perturbation]]")
                     for p in raw.pop("perturbation", [])]
    weights = raw.get("weights", ())
    if isinstance(weights, str) and weights != "poc":
        raise ManifestError(f'{where}: weights is a list of integers or "poc", not {weights!r}')
    raw["weights"] = weights if weights == "poc" else tuple(weights)
    raw["nat"] = tuple(raw.get("nat", ()))
    manifest: Manifest = _build(Manifest, raw, where)
    if manifest.nodes < 1 or manifest.duration_s <= 0 or load.rate <= 0:
        raise ManifestError(f"{where}: nodes >= 1, duration_s > 0 and load.rate > 0 are required")
    if not manifest.proof_of_compute and manifest.weights and len(manifest.weights) != manifest.nodes:
        raise ManifestError(f"{where}: weights lists {len(manifest.weights)} nodes, nodes is {manifest.nodes}")
    if not manifest.stall_timeout_s < load.idle_s < load.timeout_s:
        raise ManifestError(f"{where}: stall_timeout_s < [load] idle_s < [load] timeout_s is required (the TA "
                            "cuts a silent executor first, the client a silent TA next; the last bounds a hang)")
    if any(not isinstance(i, int) or not 0 < i < manifest.nodes for i in manifest.nat) or len(set(manifest.nat)) != len(manifest.nat):
        raise ManifestError(f"{where}: nat lists distinct participant indices from 1 to {manifest.nodes - 1} "
                            "(participant 0 starts first, with no peer to relay for it)")
    if not 0 <= load.http_share <= 1:
        raise ManifestError(f"{where} [load]: http_share must lie between 0 and 1")
    rng = random.Random(manifest.seed)
    chosen: list[Perturbation] = []
    left: set[int] = set()
    for p in sorted(perturbations, key=lambda p: p.at_s):
        chosen.append(_with_targets(p, manifest, rng, left, sum(c.kind == "join" for c in chosen)))
        if p.kind == "leave":
            left |= set(chosen[-1].targets)
    return replace(manifest, load=load, perturbations=tuple(chosen))


def load_manifest(path: Path) -> Manifest:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
    return parse_manifest(text, str(path))
