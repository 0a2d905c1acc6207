"""Attack: a participant runs another copy of a pinned model under its name.

An operator handed a doctored directory (quantized, fine-tuned, a different tokenizer) named
like the pinned model would judge honest executors against it -- and be judged against the
real one. The pin is the defence: whatever the name, other bytes are refused, and the
canonical form leaves no room to move bytes between files or names unnoticed. A hostile
genesis peer cannot slip in a second encoding of the same pins either.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import msgpack
import pytest
from helpers import MODEL

from gonka_p2p.identity import Keypair
from gonka_p2p.inference.model_identity import ModelMismatch, model_digest, pinned_name
from gonka_p2p.inference.models import resolve_model
from gonka_p2p.ledger.devnet import devnet_genesis
from gonka_p2p.ledger.genesis_wire import genesis_bytes, genesis_from_bytes
from gonka_p2p.ledger.model_pins import ModelPin
from gonka_p2p.wire.schema import Malformed

TINY = resolve_model(MODEL)


@pytest.fixture
def squatter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory named exactly like the pinned model, holding a copy of it to doctor."""
    monkeypatch.setenv("GONKA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / MODEL
    shutil.copytree(TINY, out)
    return out


def test_a_doctored_copy_under_the_pinned_name_is_refused(squatter: Path) -> None:
    pins = {MODEL: model_digest(TINY)}
    assert pinned_name(str(squatter), pins) == MODEL
    weights = squatter / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x80  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelMismatch, match=MODEL):
        pinned_name(str(squatter), pins)


def test_moving_bytes_between_files_changes_the_digest(squatter: Path) -> None:
    """Sizes are hashed: the last byte of one file moved to the front of the next is another model."""
    pinned = model_digest(squatter)
    first, second = squatter / "chat_template.jinja", squatter / "config.json"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(a[:-1])
    second.write_bytes(a[-1:] + b)
    assert model_digest(squatter) != pinned


def test_a_different_tokenizer_template_under_the_same_weights_is_another_model(squatter: Path) -> None:
    pinned = model_digest(squatter)
    (squatter / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert model_digest(squatter) != pinned


def test_a_genesis_with_an_empty_models_table_is_not_the_canonical_encoding() -> None:
    """A record without pins has no ``models`` key: an explicit empty table would be a second
    encoding of the same genesis (and another hash), so a joining node refuses it."""
    genesis = devnet_genesis([Keypair.from_seed(b"substitution").public_key], [], models=(MODEL,))
    obj = genesis.to_obj()
    obj["models"] = {}
    with pytest.raises(Malformed, match="canonical"):
        genesis_from_bytes(msgpack.packb(obj, use_bin_type=True))
    pinned = dataclasses.replace(genesis, models={MODEL: ModelPin("b" * 64, "float32")})
    assert genesis_from_bytes(genesis_bytes(pinned)).models == pinned.models
