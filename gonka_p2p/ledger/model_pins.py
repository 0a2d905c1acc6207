"""The genesis ``models`` table: per model, the digest of its files, the dtype it runs in and,
optionally, its distance run (``distance_test.py``).

A model name alone does not say which bytes a validator judges an executor
against; the pin does. ``digest`` is the hex SHA-256 identity of the model's
weight, tokenizer and configuration files (``inference/model_identity.py``
defines it), ``dtype`` the precision every engine of the network loads it in::

    [models."smollm2-135m"]
    digest = "5f0c..."
    dtype = "bfloat16"
    [models."smollm2-135m".distance_test]  # optional: the epoch test's distance run
    mid_nano = 65716771
    ...

The state machine reads only ``distance_test`` (integers, at settlement); the
digest and dtype are for the nodes, which refuse other files or precisions.

A model may be priced and not pinned (genesis records built in code by tests,
older networks): then nodes serve whatever files they hold, in float32, as
before pins existed. ``gonka-p2p init`` always pins. Errors are ``ValueError``
naming the entry; the genesis loader turns them into ``GenesisError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gonka_p2p.inference.model_names import DTYPES
from gonka_p2p.ledger.distance_test import DistanceTest

DIGEST_HEX_CHARS = 64
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ModelPin:
    """What the network means by one model name: its files' digest, its dtype, and how far
    from the model its honest executors stay (the distance run; None: no such run)."""

    digest: str  # lowercase hex SHA-256 (inference/model_identity.model_digest)
    dtype: str  # one of inference/model_names.DTYPES
    distance_test: DistanceTest | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.digest, str) and len(self.digest) == DIGEST_HEX_CHARS
                and set(self.digest) <= _HEX):
            raise ValueError(f"digest must be {DIGEST_HEX_CHARS} lowercase hex digits, not {self.digest!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.distance_test is not None and not isinstance(self.distance_test, DistanceTest):
            raise ValueError(f"distance_test must be a DistanceTest, not {type(self.distance_test).__name__}")

    def to_obj(self) -> dict[str, Any]:
        """The pin's tree; ``distance_test`` only when set, so a pin without one hashes as before."""
        test = {} if self.distance_test is None else {"distance_test": self.distance_test.to_obj()}
        return {"digest": self.digest, "dtype": self.dtype, **test}


def pins_from_obj(obj: Any) -> dict[str, ModelPin]:
    """The ``[models]`` table of a parsed genesis: model name -> ``{digest, dtype}``, nothing else."""
    if not isinstance(obj, Mapping):
        raise ValueError("[models] must be a table of model = {digest, dtype[, distance_test]}")
    pins = {}
    for model, entry in obj.items():
        where = f"models.{model}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"[{where}] must be a table with digest and dtype")
        if not {"digest", "dtype"} <= set(entry) <= {"digest", "dtype", "distance_test"}:
            raise ValueError(f"[{where}] must hold digest, dtype and optionally distance_test, "
                             f"not {', '.join(sorted(map(str, entry)))}")
        try:
            test = entry.get("distance_test")
            pins[str(model)] = ModelPin(digest=entry["digest"], dtype=entry["dtype"],
                                        distance_test=None if test is None else DistanceTest.from_obj(test))
        except ValueError as e:
            raise ValueError(f"[{where}]: {e}") from None
    return pins


def check_pins(pins: Mapping[str, ModelPin], priced: Mapping[str, int]) -> None:
    """Every pin is a :class:`ModelPin` of a model the network prices (a pin of an unpriced one
    is a typo that would otherwise pin nothing)."""
    for model, pin in pins.items():
        if not isinstance(pin, ModelPin):
            raise ValueError(f"models.{model} must be a ModelPin, not {type(pin).__name__}")
        if model not in priced:
            raise ValueError(f"models.{model} is pinned but has no price in params.price_per_token")


def pins_toml(pins: Mapping[str, ModelPin]) -> list[str]:
    """TOML lines of the ``[models]`` table (JSON-quoted strings are TOML basic strings)."""
    lines = ["# Each model's identity: the SHA-256 of its weight, tokenizer and config files (see",
             "# gonka_p2p/inference/model_identity.py) and the dtype every engine loads it in."]
    for model, pin in pins.items():
        lines += ["", f"[models.{_quote(model)}]", f"digest = {_quote(pin.digest)}", f"dtype = {_quote(pin.dtype)}"]
        if pin.distance_test is not None:
            lines += [f"[models.{_quote(model)}.distance_test]  # the epoch test's distance run "
                      "(gonka_p2p/ledger/distance_test.py)",
                      *(f"{name} = {value}" for name, value in pin.distance_test.to_obj().items())]
    return lines


def _quote(text: str) -> str:
    return json.dumps(text)
