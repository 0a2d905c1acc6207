"""The architecture, checked: what README's Layout section promises about imports and sizes.

Read from the source (``ast``), not by importing it, so a violation is found even in a
module no test imports, and inside functions as well as at module level. Imports under
``if TYPE_CHECKING:`` count too: a type-only import of an upper layer is still a dependency
a reader must follow. Rules about what a module may not import are checked transitively
through ``gonka_p2p``: a sans-I/O core that imports a helper that imports asyncio is not
sans-I/O. Each failure prints the chain of imports that breaks the rule.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gonka_p2p"

# Imports flow one way: cli/demo/openai/sim -> actors (and the adversary tooling that wraps
# them) -> gossip/inference/ledger/wire. The lower layers never reach back up.
LOWER_LAYERS = ("gossip", "inference", "ledger", "wire")
UPPER_LAYERS = ("gonka_p2p.actors", "gonka_p2p.adversary", "gonka_p2p.cli", "gonka_p2p.demo",
                "gonka_p2p.openai", "sim")

# The protocol cores run inside the simulator on virtual time and inside the replica's
# driver: no event loop, no network, no async database. Every ledger module is one, except
# the store, its SQLite persistence.
IO_PACKAGES = ("asyncio", "trio", "aiosqlite", "libp2p")
SANS_IO_EXCEPT = ("gonka_p2p.ledger.store",)
SANS_IO_INFERENCE = ("gonka_p2p.inference.sampler", "gonka_p2p.inference.verification",
                     "gonka_p2p.inference.verification_params")

MAX_LINES = 600
# Modules allowed past MAX_LINES, each with why it reads better as one file.
LONG_MODULES: set[str] = set()  # none now: consensus.py split its admission into consensus_admission.py


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package and of ``sim/``, by dotted name."""
    paths = [*PACKAGE.rglob("*.py"), *(ROOT / "sim").rglob("*.py")]  # sim: an upper layer
    return {module_name(p): p for p in paths if "__pycache__" not in p.parts}


@cache
def imports_of(name: str) -> frozenset[str]:
    """The absolute names a module's import statements mention, wherever they stand; for
    ``from a import b`` both ``a`` and, when it is one of ours, the submodule ``a.b``."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            here = package.split(".")
            base = here[:len(here) - node.level + 1] if node.level else []  # "from .. import x"
            origin = ".".join([*base, node.module] if node.module else base)
            found.add(origin)
            found.update(sub for alias in node.names if (sub := f"{origin}.{alias.name}") in modules())
    return frozenset(found)


def loaded_with(name: str) -> list[str]:
    """The modules Python runs to import ``name``: its parent packages, then itself."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules()]


def within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(starts: Iterable[str], bad: Iterable[str]) -> list[str]:
    """Import chains from a start module, through modules of ours that importing it runs, to a
    module named by ``bad`` (a prefix: "asyncio" covers "asyncio.subprocess")."""
    bad = tuple(bad)
    found = set()
    for start in starts:
        chains = {m: [m] for m in loaded_with(start)}  # one chain to each module reached
        todo = list(chains)
        while todo:
            current = todo.pop()
            for imported in sorted(imports_of(current)):
                if within(imported, bad):
                    found.add(" -> ".join([*chains[current], imported]))
                    continue
                for target in loaded_with(imported):
                    if target not in chains:
                        chains[target] = [*chains[current], target]
                        todo.append(target)
    return sorted(found)


def in_packages(*packages: str) -> list[str]:
    return [m for m in modules() if within(m, packages)]


def test_the_layout_knows_the_package() -> None:
    """The guards below read real modules, not an empty list (say, after a rename of ROOT)."""
    names = modules()
    for expected in ("gonka_p2p.client", "gonka_p2p.ledger.consensus", "gonka_p2p.ledger.rules",
                     "gonka_p2p.ledger.state", "gonka_p2p.ledger.store", *SANS_IO_INFERENCE):
        assert expected in names, expected
    assert "gonka_p2p.ledger.store" in violations(["gonka_p2p.ledger.store"], ["aiosqlite"])[0]


def test_lower_layers_never_import_the_layers_above() -> None:
    lower = in_packages(*(f"gonka_p2p.{layer}" for layer in LOWER_LAYERS))
    assert not violations(lower, UPPER_LAYERS), "\n".join(violations(lower, UPPER_LAYERS))


def test_sans_io_cores_import_no_event_loop_network_or_async_database() -> None:
    cores = [m for m in in_packages("gonka_p2p.ledger") if not within(m, SANS_IO_EXCEPT)]
    cores += SANS_IO_INFERENCE
    found = violations(cores, IO_PACKAGES)
    assert not found, "\n".join(found)


def test_the_client_library_imports_no_actor() -> None:
    found = violations(["gonka_p2p.client"], ["gonka_p2p.actors"])
    assert not found, "\n".join(found)


def test_the_client_library_imports_no_consensus_module() -> None:
    """A client speaks the query protocol; the BFT core and its wire format are the replicas' business."""
    found = violations(["gonka_p2p.client"], ["gonka_p2p.ledger.consensus", "gonka_p2p.ledger.consensus_types",
                                              "gonka_p2p.ledger.consensus_wire"])
    assert not found, "\n".join(found)


def test_no_module_is_longer_than_one_sitting() -> None:
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {path: n for path, n in sorted(lengths.items()) if n > MAX_LINES and path not in LONG_MODULES}
    assert not too_long, f"over {MAX_LINES} lines (split them, or allow one in LONG_MODULES with why): {too_long}"
    assert LONG_MODULES <= lengths.keys(), "LONG_MODULES names a module that no longer exists"
