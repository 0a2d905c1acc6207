"""Scenario files: a simulation's knobs as a TOML document, checked field by field.

A scenario names every knob it changes, in the sections :mod:`sim.config`
declares; anything it leaves out keeps its default. The seed is not part of
it: ``gonka-p2p sim SCENARIO --seed N`` pairs one file with one seed, and the
report carries the file's SHA-256 (of its bytes) and the seed, so the pair
names the run. Loading reports every bad field at once, one line each
(``network.peers: must be at least 3``), never a traceback.

``SCENARIO`` is a path, or the name of a ready scenario in ``sim/scenarios/``
(``honest``, ``int4``, ``q10-cheater``, ...).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gonka_p2p.ledger.genesis import PARAM_FIELDS, Genesis, GenesisError

from sim.config import SimConfig, knob_kind, scalar_knobs, table_entry_kind, table_knobs
from sim.poc import POC_PHASES
from sim.roster import CHAIN_ID, Strategy, identities, sim_params
from sim.verdicts import table_for
from sim.world import GENERATION_BLOCKS

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


class ScenarioError(Exception):
    """A scenario that cannot be simulated; the message has one line per bad field."""


@dataclass(frozen=True)
class Scenario:
    name: str  # the file's stem
    sha256: str  # of the file's bytes: with the seed, it names the run
    values: dict[str, Any]  # "section.name" -> value, for the knobs the file sets

    def config(self, seed: int, overrides: dict[str, Any] | None = None) -> SimConfig:
        """The run of this scenario with ``seed`` (and a sweep's ``overrides``), checked."""
        return checked(build(seed, {**self.values, **(overrides or {})}))


def resolve(name: str) -> Path:
    """A scenario path, or a ready scenario's name."""
    path = Path(name)
    if path.suffix != ".toml" and not path.exists():
        path = SCENARIOS / f"{name}.toml"
    if not path.is_file():
        ready = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.toml")))
        raise ScenarioError(f"{name}: no such scenario file (ready ones: {ready})")
    return path


def load(name: str) -> Scenario:
    """Read, parse and check a scenario (with seed 0: the checks do not depend on it)."""
    path = resolve(name)
    raw = path.read_bytes()
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{path}: not TOML: {e}") from None
    scenario = Scenario(path.stem, hashlib.sha256(raw).hexdigest(), flatten(doc))
    scenario.config(0)
    return scenario


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """``{"network": {"peers": 3}, "mix": {"int4": 1}}`` -> ``{"network.peers": 3, "mix": {...}}``;
    unknown sections and fields are refused, all at once."""
    scalars, tables = scalar_knobs(), table_knobs()
    values: dict[str, Any] = {}
    problems = []
    for section, body in doc.items():
        if not isinstance(body, dict):
            problems.append(f"{section}: must be a table ([{section}])")
            continue
        for key, value in body.items():
            path = f"{section}.{key}"
            if section in tables:
                values.setdefault(section, {})[key] = value
            elif path in tables:
                values[path] = value
            elif path in scalars:
                values[path] = value
            else:
                problems.append(f"{path}: unknown field (known: {', '.join(sorted({*scalars, *tables}))})")
    if problems:
        raise ScenarioError("\n".join(problems))
    return values


def build(seed: int, values: dict[str, Any]) -> SimConfig:
    """A SimConfig from flattened values; each value's type is checked against its knob's."""
    scalars, tables = scalar_knobs(), table_knobs()
    fields: dict[str, Any] = {}
    problems = []
    for path, value in values.items():
        if path in tables:
            default = tables[path].default_factory()  # type: ignore[misc]
            fields[tables[path].name] = {**default, **value} if isinstance(value, dict) else value
    for path, value in values.items():
        if path in tables:
            continue
        if table_entry_kind(path) is not None:  # one entry of a table, set on top of the table
            section, _, name = path.rpartition(".")
            table = tables[section]
            fields[table.name] = {**fields.get(table.name, table.default_factory()), name: value}  # type: ignore[misc]
            continue
        knob = scalars[path]
        kind = type(knob.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            problems.append(f"{path}: must be {kind.__name__}, not {value!r}")
            continue
        problem = knob.metadata["check"] and knob.metadata["check"](value)
        if problem:
            problems.append(f"{path}: {problem}")
        fields[knob.name] = value
    if problems:
        raise ScenarioError("\n".join(problems))
    return SimConfig(seed=seed, **fields)


def _count_table(name: str, table: Any, allowed: set[str], kind: type) -> list[str]:
    if not isinstance(table, dict):
        return [f"{name}: must be a table"]
    problems = []
    for key, value in table.items():
        if key not in allowed:
            problems.append(f"{name}.{key}: unknown (known: {', '.join(sorted(allowed))})")
        elif isinstance(value, bool) or not isinstance(value, (int, kind)) or value < 0:
            problems.append(f"{name}.{key}: must be a non-negative {kind.__name__}")
        elif kind is float and value > 1:
            problems.append(f"{name}.{key}: must be a share in [0, 1]")
    return problems


def checked(config: SimConfig) -> SimConfig:
    """``config``, or ScenarioError naming every knob the ledger or the loop cannot honour."""
    strategies = {str(s) for s in Strategy if s is not Strategy.HONEST}
    problems = _count_table("mix", config.mix, strategies, int)
    problems += _count_table("economics.savings", config.savings, strategies, float)
    settable = set(PARAM_FIELDS) - {"price_per_token"}  # the simulator prices its one model
    if not isinstance(config.params, dict) or not set(config.params) <= settable:
        problems.append(f"params: unknown genesis parameter(s) {sorted(set(config.params) - settable)}"
                        if isinstance(config.params, dict) else "params: must be a table")
    if problems:
        raise ScenarioError("\n".join(problems))
    nonhonest = len(identities(config.strategy_mix(), config.sybil_identities))
    if nonhonest >= config.peers:
        problems.append(f"mix: {nonhonest} non-honest identities leave no honest one among network.peers "
                        f"= {config.peers}")
    problems += _poc_problems(config)
    try:
        params = sim_params(config.epoch_blocks, config.floor, config.genesis_overrides())
        Genesis(chain_id=CHAIN_ID, params=params)
    except GenesisError as e:
        raise ScenarioError("\n".join([*problems, str(e)])) from None  # GenesisError names the field
    if not 0 <= config.latency < min(params.dispute_voting_blocks, params.validation_window_blocks):
        problems.append(f"network.latency: must be below {params.dispute_voting_blocks} blocks, so that a "
                        "dispute vote lands before its deadline")
    windows = [getattr(params, name) for name in POC_PHASES]
    if config.proof_of_compute and min(windows) <= config.latency:
        problems.append(f"params: every proof-of-compute phase ({', '.join(POC_PHASES)}) must be longer than "
                        f"network.latency = {config.latency} blocks, so that a message lands in its phase")
    if config.epoch_blocks <= GENERATION_BLOCKS[1] + 2 * config.latency + 1:
        problems.append("network.epoch_blocks: leaves no room for a request to finish within its epoch")
    try:
        table_for(config.verdicts, config.matrix_model, config.matrix_dtype, config.matrix)
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"validation.matrix: {e} (or validation.verdicts = \"design\")")
    if problems:
        raise ScenarioError("\n".join(problems))
    return config


def _poc_problems(config: SimConfig) -> list[str]:
    """Proof-of-compute knobs that need it on, or name an epoch the run does not have."""
    problems = []
    uses = [name for name, count in config.mix.items() if count and Strategy(name).needs_poc]
    uses += [f"poc.{knob}" for knob in ("joiners", "leavers") if getattr(config, knob)]
    if uses and not config.proof_of_compute:
        problems.append(f"poc.proof_of_compute: must be true for {', '.join(uses)}")
    if config.capacity_min > config.capacity_max:
        problems.append("poc.capacity_min: must not exceed poc.capacity_max")
    for count, knob in ((config.joiners, "join_epoch"), (config.leavers, "leave_epoch")):
        if count and getattr(config, knob) >= config.epochs:
            problems.append(f"poc.{knob}: must be below network.epochs = {config.epochs}")
    return problems


def parse_override(text: str) -> tuple[str, str]:
    """``section.name=value`` -> (path, value text); the path must be a scalar knob or one entry
    of a free table (``params.NAME``, ``mix.STRATEGY``, ``economics.savings.STRATEGY``)."""
    path, sep, value = text.partition("=")
    if not sep or knob_kind(path) is None:
        raise ScenarioError(f"{text!r}: expected section.name=value with one of "
                            f"{', '.join(sorted(scalar_knobs()))}, or params.NAME (a genesis parameter), "
                            "mix.STRATEGY, economics.savings.STRATEGY")
    return path, value


def typed(path: str, text: str) -> Any:
    """A command line's text as the knob's type (TOML syntax: 0.1, 3, true, "design")."""
    kind = knob_kind(path)
    assert kind is not None, path  # parse_override accepted it
    if kind is str:
        return text.strip('"')
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ScenarioError(f"{path}={text}: not a {kind.__name__}") from None
    return float(value) if kind is float and isinstance(value, int) and not isinstance(value, bool) else value

