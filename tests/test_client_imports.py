"""The client side stays lean: importing it loads no actor and no ledger state machine.

A client signs, streams and asks the ledger; it must not pay for (or depend
on) the node: the actors, the consensus core or the ledger's state machine.
Each module is imported in a fresh interpreter, since this test process has
long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN_PACKAGES = ("gonka_p2p.actors", "gonka_p2p.ledger.consensus")  # and their submodules
FORBIDDEN_MODULES = ("gonka_p2p.ledger.state",)


def forbidden(module: str) -> bool:
    return (module in FORBIDDEN_MODULES
            or any(module == p or module.startswith(p + ".") or module.startswith(p + "_")
                   for p in FORBIDDEN_PACKAGES))


def imported_by(module: str) -> list[str]:
    """Every ``gonka_p2p`` module that ``import module`` loads, in a fresh interpreter."""
    script = (f"import json, sys; import {module}; "
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('gonka_p2p'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["gonka_p2p.client", "gonka_p2p.openai.auth", "gonka_p2p.openai.format"])
def test_client_side_imports_no_actor_and_no_ledger_state_machine(module: str) -> None:
    loaded = imported_by(module)
    assert module in loaded
    assert [m for m in loaded if forbidden(m)] == []


def test_the_check_sees_the_server_side_load_the_node() -> None:
    assert forbidden("gonka_p2p.ledger.consensus_wire") and forbidden("gonka_p2p.ledger.state")
    assert not forbidden("gonka_p2p.ledger.query")
    assert "gonka_p2p.actors.transfer_agent" in imported_by("gonka_p2p.openai.gateway")
