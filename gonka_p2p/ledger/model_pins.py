"""The genesis ``models`` table: per model, the digest of its files and the dtype it runs in.

A model name alone does not say which bytes a validator judges an executor
against; the pin does. ``digest`` is the hex SHA-256 identity of the model's
weight, tokenizer and configuration files (``inference/model_identity.py``
defines it), ``dtype`` the precision every engine of the network loads it in::

    [models."smollm2-135m"]
    digest = "5f0c..."
    dtype = "float32"

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

DIGEST_HEX_CHARS = 64
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ModelPin:
    """What the network means by one model name: its files' digest and its dtype."""

    digest: str  # lowercase hex SHA-256 (inference/model_identity.model_digest)
    dtype: str  # one of inference/model_names.DTYPES

    def __post_init__(self) -> None:
        if not (isinstance(self.digest, str) and len(self.digest) == DIGEST_HEX_CHARS
                and set(self.digest) <= _HEX):
            raise ValueError(f"digest must be {DIGEST_HEX_CHARS} lowercase hex digits, not {self.digest!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    def to_obj(self) -> dict[str, str]:
        return {"digest": self.digest, "dtype": self.dtype}


def pins_from_obj(obj: Any) -> dict[str, ModelPin]:
    """The ``[models]`` table of a parsed genesis: model name -> ``{digest, dtype}``, nothing else."""
    if not isinstance(obj, Mapping):
        raise ValueError("[models] must be a table of model = {digest, dtype}")
    pins = {}
    for model, entry in obj.items():
        where = f"models.{model}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"[{where}] must be a table with digest and dtype")
        if set(entry) != {"digest", "dtype"}:
            raise ValueError(f"[{where}] must hold exactly digest and dtype, not {', '.join(sorted(map(str, entry)))}")
        try:
            pins[str(model)] = ModelPin(digest=entry["digest"], dtype=entry["dtype"])
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
    return lines


def _quote(text: str) -> str:
    return json.dumps(text)
