"""Model identity: the digest a genesis pins per model, so that every participant runs the same files.

A model name says nothing about the bytes behind it: two nodes serving
"smollm2-135m" from different weights would judge each other's honest work
as cheating. So the genesis pins, per model, a digest of the files that decide
what an engine computes, and a node whose local copy differs refuses to serve
or validate that model (:func:`pinned_name`).

**What is hashed.** Every regular file at the top level of the model directory
(symlinks followed: a Hugging Face hub snapshot is links into its blob store)
whose name is one of

* configuration and tokenizer tables: ``*.json`` (``config.json``,
  ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``vocab.json``, a safetensors index, ...);
* tokenizer data and the chat template: ``tokenizer.model``, ``merges.txt``,
  ``*.tiktoken``, ``*.jinja``;
* weights: ``*.safetensors``, ``*.bin``, ``*.gguf``.

Nothing else (README, licence, training notes, hidden files, subdirectories):
they do not change a single logit. A directory with no weight file has no
identity worth pinning and is refused.

**Canonical form.** SHA-256 over ``DOMAIN``, then for each file in byte order
of its UTF-8 name: the name's length (2 bytes, big-endian), the name, the
file's size (8 bytes, big-endian) and the SHA-256 of its contents. So anyone
can recompute it from ``sha256sum`` of the files; files are streamed in 1 MiB
chunks, never read whole.

**Cache.** Hashing a 7B model reads ~15 GB, so each file's SHA-256 is kept per
directory under ``<model cache>/.digests/``, keyed by (name, size, mtime in
ns): a restart re-hashes only files whose size or mtime changed. The cache
trusts file metadata: an edit that restores both goes unseen -- by its own
operator, who is then judged against the pinned copy like anyone else.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gonka_p2p.inference.engine import EngineError
from gonka_p2p.inference.models import cache_root, resolve_model, served_name

DOMAIN = b"gonka-p2p/model-digest/v1\x00"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_TABLE_SUFFIXES = (".json", ".tiktoken", ".jinja")
_TOKENIZER_FILES = ("tokenizer.model", "merges.txt")
_CHUNK = 1 << 20


class ModelMismatch(EngineError):
    """The local files of a model differ from the ones the genesis pins."""

    def __init__(self, model: str, path: Path, pinned: str, local: str) -> None:
        super().__init__(
            f"model {model!r}: the local files in {path} are not the ones the genesis pins "
            f"(pinned digest {pinned}, local digest {local}); refusing to serve or validate it, "
            "since executors and validators must run the same copy. Replace them with the pinned "
            "files, or leave the model out of this node's --model list")
        self.model = model


def is_model_file(name: str) -> bool:
    """Whether a file of this name takes part in a model's digest (see the module doc)."""
    if name.startswith("."):
        return False
    return name.endswith(WEIGHT_SUFFIXES + _TABLE_SUFFIXES) or name in _TOKENIZER_FILES


def model_files(directory: Path) -> list[Path]:
    """The files of ``directory`` that its digest covers, in canonical (byte) order of name."""
    files = [p for p in directory.iterdir() if is_model_file(p.name) and p.is_file()]
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise EngineError(f"{directory} holds no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return sorted(files, key=lambda p: p.name.encode())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_digest(directory: Path) -> str:
    """The hex SHA-256 identity of the model in ``directory`` (cached per file, see the module doc)."""
    directory = Path(directory).resolve()
    cache_path = _cache_path(directory)
    cached = _read_cache(cache_path)
    entries: dict[str, list[int | str]] = {}
    h = hashlib.sha256(DOMAIN)
    for path in model_files(directory):
        st = path.stat()
        sha = _cached_sha(cached.get(path.name), st) or file_sha256(path)
        entries[path.name] = [st.st_size, st.st_mtime_ns, sha]
        name = path.name.encode()
        h.update(len(name).to_bytes(2, "big") + name + st.st_size.to_bytes(8, "big") + bytes.fromhex(sha))
    if entries != cached:
        _write_cache(cache_path, directory, entries)
    return h.hexdigest()


def pinned_name(source: str, pins: Mapping[str, str]) -> str:
    """The name the network serves ``source`` (a known name or a directory) under, checked
    against ``pins`` (model name -> pinned digest): its own name when that is pinned and the
    files match (:class:`ModelMismatch` when they do not); a pinned name whose digest the files
    have; else its own name, unpinned, as before pins existed."""
    own = served_name(source)
    if not pins:
        return own
    path = resolve_model(source)
    local = model_digest(path)
    if own in pins:
        if pins[own] != local:
            raise ModelMismatch(own, path, pins[own], local)
        return own
    return next((name for name, digest in sorted(pins.items()) if digest == local), own)


def _cache_path(directory: Path) -> Path:
    key = hashlib.sha256(str(directory).encode()).hexdigest()[:32]
    return cache_root() / ".digests" / f"{key}.json"


def _cached_sha(entry: object, st: os.stat_result) -> str | None:
    """The cached SHA-256 of a file whose size and mtime are still ``st``'s, else None."""
    if (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]
            and isinstance(entry[2], str) and len(entry[2]) == 64
            and all(c in "0123456789abcdef" for c in entry[2])):
        return entry[2]
    return None


def _read_cache(path: Path) -> dict[str, list[int | str]]:
    """The cached entries, or none for a missing or unreadable cache (it is only a cache)."""
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, directory: Path, entries: dict[str, list[int | str]]) -> None:
    """Replace the cache atomically; a cache that cannot be written costs a re-hash, nothing more."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"directory": str(directory), "files": entries}, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
