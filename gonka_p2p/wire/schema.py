"""Explicit, versioned message schemas with total, bounded decoders.

A schema is a frozen dataclass deriving from :class:`Message` with a ``KIND``
and ``VERSION``. Its wire body is a msgpack map of exactly its fields. The
decoder is *total*: whatever bytes arrive, it returns a message whose every
field has its declared type and lies inside its declared bounds, or raises a
:class:`WireError` subclass -- never anything else. Bounds default to
conservative sizes and are tightened per field with ``bounded(...)``.

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``bytes``,
``list[T]`` and nested ``Message`` subclasses (encoded as maps). A list's
items carry bounds of their own (``bounded(items=each(...))``), so a list of
eight addresses cannot hold eight megabytes.

Memory is bounded before trust: :func:`unpack` refuses input over its size
limit before parsing, and counts the containers msgpack builds (an empty
array costs one byte on the wire but ~64 bytes in Python), refusing input
with more than one container per ``BYTES_PER_CONTAINER`` bytes -- so no
decode allocates more than a small multiple of its input, whatever it holds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgpack

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_STR = 64 * 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ITEMS = 65536
_INT64 = 2**63
# Honest messages hold far fewer containers than one per 8 bytes (a token's
# top-k row of ids and logprobs is ~75 bytes for two lists); a hostile one of
# nested empty arrays would hold one per byte (~64x amplification).
BYTES_PER_CONTAINER = 8


class WireError(Exception):
    """Base of every decoding/verification failure. ``code`` is stable, ``str()`` is for people."""

    code = "malformed"


class Malformed(WireError):
    code = "malformed"


class Oversize(WireError):
    code = "oversize"


class UnknownKind(WireError):
    code = "unknown_kind"


class UnsupportedVersion(WireError):
    code = "unsupported_version"


class BadSignature(WireError):
    code = "bad_signature"


def each(*, max_len: int | None = None, min_value: float | None = None,
         max_value: float | None = None, items: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bounds of one value: ``max_len`` for str/bytes/list, value range for numbers, and
    ``items`` (another ``each``) for the items of a list."""
    return {"max_len": max_len, "min": min_value, "max": max_value, "items": items}


def bounded(*, max_len: int | None = None, min_value: float | None = None,
            max_value: float | None = None, items: dict[str, Any] | None = None) -> Any:
    """A schema field with the bounds of :func:`each`."""
    return dataclasses.field(metadata=each(max_len=max_len, min_value=min_value,
                                           max_value=max_value, items=items))


M = TypeVar("M", bound="Message")
_REGISTRY: dict[str, type[Message]] = {}


class Message:
    """Base of all wire schemas. Subclasses are frozen dataclasses with KIND and VERSION."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("KIND")
        if kind is not None:
            if kind in _REGISTRY:
                raise TypeError(f"duplicate message kind {kind!r}")
            _REGISTRY[kind] = cls

    def to_obj(self) -> dict[str, Any]:
        return {f.name: _to_obj(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def encode(self) -> bytes:
        return msgpack.packb(self.to_obj(), use_bin_type=True)

    @classmethod
    def from_obj(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise Malformed(f"{cls.KIND}: expected a map")
        hints = _hints(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in fields}
        if set(obj) != names:
            missing, extra = names - set(obj), set(obj) - names
            raise Malformed(f"{cls.KIND}: missing {sorted(missing)} extra {sorted(map(str, extra))}")
        values = {f.name: _check(obj[f.name], hints[f.name], f.metadata, f"{cls.KIND}.{f.name}")
                  for f in fields}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise Malformed(f"{cls.KIND}: {e}") from None

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        return cls.from_obj(unpack(data))


def message_class(kind: str) -> type[Message]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise UnknownKind(f"unknown message kind {kind!r}") from None


class _ContainerBudget:
    """Counts the arrays and maps one decode builds; raises past its budget."""

    def __init__(self, budget: int) -> None:
        self.left = budget

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise Oversize("message holds more nested containers than its size justifies")

    def on_list(self, value: list[Any]) -> list[Any]:
        self._spend()
        return value

    def on_map(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        self._spend()
        return dict(pairs)


def unpack(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Bounded msgpack decode: never allocates more than a small multiple of the input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed("expected bytes")
    if len(data) > max_bytes:
        raise Oversize(f"message of {len(data)} bytes exceeds {max_bytes}")
    budget = _ContainerBudget(16 + len(data) // BYTES_PER_CONTAINER)
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            list_hook=budget.on_list, object_pairs_hook=budget.on_map,
            max_str_len=DEFAULT_MAX_BYTES, max_bin_len=DEFAULT_MAX_BYTES,
            max_array_len=DEFAULT_MAX_ITEMS, max_map_len=1024, max_ext_len=0,
        )
    except Oversize:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError, TypeError) as e:
        raise Malformed(f"not valid msgpack: {e}") from None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _to_obj(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_obj()
    if isinstance(value, (list, tuple)):
        return [_to_obj(v) for v in value]
    return value


def _check(value: Any, tp: Any, meta: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise Malformed/Oversize."""
    max_len = meta.get("max_len") if meta else None
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise Malformed(f"{where}: expected a list")
        limit = max_len if max_len is not None else DEFAULT_MAX_ITEMS
        if len(value) > limit:
            raise Oversize(f"{where}: {len(value)} items exceeds {limit}")
        (item_tp, *_rest) = typing.get_args(tp)
        item_meta = meta.get("items") if meta else None
        items = [_check(v, item_tp, item_meta, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, Message):
        return tp.from_obj(value)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        raise TypeError(f"{where}: unions are not supported on the wire")
    if tp is bool:
        if not isinstance(value, bool):
            raise Malformed(f"{where}: expected a bool")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or not -_INT64 <= value < _INT64:
            raise Malformed(f"{where}: expected a 64-bit int")
        return _in_range(value, meta, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Malformed(f"{where}: expected a number")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise Malformed(f"{where}: expected a finite number")
        return _in_range(value, meta, where)
    if tp is str:
        if not isinstance(value, str):
            raise Malformed(f"{where}: expected a string")
        return _within(value, max_len if max_len is not None else DEFAULT_MAX_STR, where)
    if tp is bytes:
        if not isinstance(value, bytes):
            raise Malformed(f"{where}: expected bytes")
        return _within(value, max_len if max_len is not None else DEFAULT_MAX_BYTES, where)
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _within(value: Any, limit: int, where: str) -> Any:
    if len(value) > limit:
        raise Oversize(f"{where}: length {len(value)} exceeds {limit}")
    return value


def _in_range(value: Any, meta: Any, where: str) -> Any:
    lo = meta.get("min") if meta else None
    hi = meta.get("max") if meta else None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise Malformed(f"{where}: {value} outside [{lo}, {hi}]")
    return value
