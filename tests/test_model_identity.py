"""Model identity (issue 13): genesis pins each model's files and dtype; a node with another copy refuses.

The digest is the one ``inference/model_identity.py`` defines; the tiny model stands in for any
Hugging Face checkpoint directory (copied, so tampering never touches the shared cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MODEL

from gonka_p2p.actors.node import StartupError, model_specs
from gonka_p2p.cli import build_parser
from gonka_p2p.config import ConfigError, load_config, overrides_from_args
from gonka_p2p.identity import Keypair
from gonka_p2p.inference import model_identity
from gonka_p2p.inference.engine import EngineError
from gonka_p2p.inference.factory import load_engine
from gonka_p2p.inference.model_identity import DOMAIN, ModelMismatch, model_digest, model_files, pinned_name
from gonka_p2p.inference.models import ModelSpec, load_local_model, resolve_model
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.ledger.devnet import devnet_genesis, init_local_network
from gonka_p2p.ledger.genesis import GenesisError, genesis_from_obj, load_genesis
from gonka_p2p.ledger.genesis_wire import genesis_bytes, genesis_from_bytes
from gonka_p2p.ledger.model_pins import ModelPin

TINY = resolve_model(MODEL)  # resolved before any test moves the cache
KEY = Keypair.from_seed(b"model-identity")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private model cache, so digest caches of throw-away copies stay out of the shared one."""
    monkeypatch.setenv("GONKA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def copy(tmp_path: Path, cache: Path) -> Path:
    """A copy of the tiny model under a directory name of its own."""
    out = tmp_path / "tiny-copy"
    shutil.copytree(TINY, out)
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_digest_is_the_documented_hash_of_the_documented_files(copy: Path) -> None:
    """SHA-256 over the domain, then per file in name order: name length, name, size, SHA-256."""
    (copy / "README.md").write_text("not part of the model")
    names = [p.name for p in model_files(copy)]
    assert names == sorted(["chat_template.jinja", "config.json", "generation_config.json",
                            "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    h = hashlib.sha256(DOMAIN)
    for name in names:
        data = (copy / name).read_bytes()
        h.update(len(name).to_bytes(2, "big") + name.encode() + len(data).to_bytes(8, "big")
                 + hashlib.sha256(data).digest())
    assert model_digest(copy) == h.hexdigest() == model_digest(TINY)  # a copy is the same model


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"])
def test_one_byte_of_a_weight_tokenizer_or_config_file_changes_the_digest(copy: Path, name: str) -> None:
    before = model_digest(copy)
    flip_byte(copy / name, (copy / name).stat().st_size // 2)
    assert model_digest(copy) != before


def test_files_that_change_no_logit_do_not_count(copy: Path) -> None:
    before = model_digest(copy)
    (copy / "TRAINING.txt").write_text("other notes")
    (copy / "README.md").write_text("a readme")
    (copy / "sub").mkdir()
    (copy / "sub" / "extra.safetensors").write_bytes(b"x")
    assert model_digest(copy) == before


def test_a_directory_without_weights_has_no_identity(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="holds no weights"):
        model_digest(copy)


def test_a_restart_rehashes_only_the_files_whose_size_or_mtime_changed(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_digest(copy)
    hashed: list[str] = []
    real = model_identity.file_sha256
    monkeypatch.setattr(model_identity, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    first = model_digest(copy)
    assert hashed == []
    flip_byte(copy / "config.json", 3)
    os.utime(copy / "config.json", ns=(0, 10**9))
    assert model_digest(copy) != first
    assert hashed == ["config.json"]


def test_no_pins_means_the_directory_name_and_no_hashing(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_identity, "model_digest", lambda path: pytest.fail("hashed without pins"))
    assert pinned_name(str(copy), {}) == "tiny-copy"
    assert pinned_name("SmolLM2-135M-Instruct", {}) == "smollm2-135m"  # a known model's alias


def test_a_pinned_model_with_other_files_is_refused_naming_the_model_and_both_digests(copy: Path) -> None:
    pinned = model_digest(copy)
    assert pinned_name(str(copy), {"tiny-copy": pinned}) == "tiny-copy"
    flip_byte(copy / "model.safetensors", 1000)
    local = model_digest(copy)
    with pytest.raises(ModelMismatch) as caught:
        pinned_name(str(copy), {"tiny-copy": pinned})
    message = str(caught.value)
    assert "'tiny-copy'" in message and pinned in message and local in message
    assert "refusing to serve or validate" in message


def test_a_directory_with_the_pinned_files_is_served_under_the_pinned_name(copy: Path) -> None:
    assert pinned_name(str(copy), {"tiny-llama": model_digest(TINY)}) == "tiny-llama"
    assert pinned_name(str(copy), {"other": "0" * 64}) == "tiny-copy"  # unpinned: as before pins


def test_init_pins_every_model_to_this_machines_files(tmp_path: Path, copy: Path) -> None:
    net = init_local_network(tmp_path / "net", nodes=1, clients=0, models=(str(copy),), dtype="bfloat16")
    assert dict(net.genesis.models) == {"tiny-copy": ModelPin(model_digest(copy), "bfloat16")}
    assert set(net.genesis.params.price_per_token) == {"tiny-copy"}  # served by its directory's name
    assert load_genesis(net.genesis_path) == net.genesis


def test_a_genesis_pin_changes_its_hash_and_none_keeps_the_old_encoding() -> None:
    bare = devnet_genesis([KEY.public_key], [], models=(MODEL,))
    assert "models" not in bare.to_obj()  # the hash of a record without pins is what it always was
    pinned = dataclasses.replace(bare, models={MODEL: ModelPin("a" * 64, "float32")})
    bf16 = dataclasses.replace(bare, models={MODEL: ModelPin("a" * 64, "bfloat16")})
    assert len({bare.hash(), pinned.hash(), bf16.hash()}) == 3
    assert genesis_from_bytes(genesis_bytes(pinned)) == pinned


@pytest.mark.parametrize("models, problem", [
    ({"unpriced": {"digest": "a" * 64, "dtype": "float32"}}, "has no price"),
    ({MODEL: {"digest": "A" * 64, "dtype": "float32"}}, "lowercase hex"),
    ({MODEL: {"digest": "a" * 63, "dtype": "float32"}}, "64 lowercase hex"),
    ({MODEL: {"digest": "a" * 64, "dtype": "int8"}}, "dtype must be one of"),
    ({MODEL: {"digest": "a" * 64}}, "must hold digest, dtype and optionally distance_test"),
    ({MODEL: {"digest": "a" * 64, "dtype": "float32", "path": "/x"}}, "must hold digest, dtype and optionally distance_test"),
    ({MODEL: "a" * 64}, "must be a table"),
    (["a"], "must be a table"),
])
def test_the_models_table_loader_is_total(models: object, problem: str) -> None:
    obj = devnet_genesis([KEY.public_key], [], models=(MODEL,)).to_obj()
    obj["models"] = models
    with pytest.raises(GenesisError, match=problem):
        genesis_from_obj(obj)


def test_a_node_refuses_a_tampered_copy_before_it_joins(copy: Path) -> None:
    genesis = devnet_genesis([KEY.public_key], [], models=("tiny-copy",))
    genesis = dataclasses.replace(genesis, models={"tiny-copy": ModelPin(model_digest(copy), "bfloat16")})
    config = load_config(None, models=[str(copy)], tensor_parallel_size=2)
    [spec] = model_specs(config, genesis)
    assert (spec.served_as, spec.dtype, spec.tensor_parallel_size) == ("tiny-copy", "bfloat16", 2)
    flip_byte(copy / "tokenizer.json", 10)
    with pytest.raises(StartupError, match="pinned digest"):
        model_specs(config, genesis)


@pytest.mark.slow
def test_the_node_command_exits_with_the_one_message(tmp_path: Path, copy: Path) -> None:
    init_local_network(tmp_path / "net", nodes=1, clients=0, models=(str(copy),))
    flip_byte(copy / "model.safetensors", 4096)
    result = subprocess.run(
        [sys.executable, "-m", "gonka_p2p.cli", "node", "--key", str(tmp_path / "net" / "node0.key"),
         "--genesis", str(tmp_path / "net" / "genesis.toml"), "--model", str(copy), "--engine", "torch",
         "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    err = " ".join(result.stderr.split())  # rich wraps long lines
    assert "'tiny-copy'" in err and "pinned digest" in err and "refusing to serve or validate" in err
    assert "Traceback" not in result.stderr and "READY" not in result.stdout


@pytest.mark.slow
async def test_the_pinned_dtype_reaches_the_torch_engine() -> None:
    genesis = devnet_genesis([KEY.public_key], [], models=(MODEL,))
    genesis = dataclasses.replace(genesis, models={MODEL: ModelPin(model_digest(TINY), "bfloat16")})
    [spec] = model_specs(load_config(None, models=[MODEL]), genesis)
    engine = load_engine("torch", spec)
    try:
        assert engine._model.dtype == torch.bfloat16  # type: ignore[attr-defined]
        steps = [s async for s in engine.generate([1, 2, 3], SamplingParams(max_tokens=3), b"seed")]
        assert len(steps) == 3 and engine.model_name == MODEL
    finally:
        await engine.close()
    assert load_engine("torch", MODEL)._model.dtype == torch.float32  # type: ignore[attr-defined]


def test_engine_options_parse_from_flags_and_toml(tmp_path: Path) -> None:
    args = build_parser().parse_args(["node", "--tensor-parallel-size", "4", "--gpu-memory-utilization", "0.85",
                                      "--max-model-len", "256"])
    config = load_config(None, **overrides_from_args(args))
    assert (config.tensor_parallel_size, config.gpu_memory_utilization, config.max_model_len) == (4, 0.85, 256)
    toml = tmp_path / "node.toml"
    toml.write_text("tensor_parallel_size = 2\ngpu_memory_utilization = 0.5\n")
    assert load_config(toml).gpu_memory_utilization == 0.5
    for bad in ({"tensor_parallel_size": 0}, {"gpu_memory_utilization": 1.5}, {"max_model_len": 0}):
        with pytest.raises(ConfigError):
            load_config(None, **bad)


def test_engine_options_reach_the_vllm_engine_args(caplog: pytest.LogCaptureFixture) -> None:
    vllm_engine = pytest.importorskip("gonka_p2p.inference.vllm_engine")
    spec = ModelSpec(MODEL, dtype="bfloat16", tensor_parallel_size=2, gpu_memory_utilization=0.8,
                     max_model_len=256)
    local = load_local_model(spec)
    assert local.max_context == 256  # every engine refuses a longer request alike
    on_gpu = vllm_engine.vllm_engine_args(local, spec, 1.0, 32, on_cpu=False)
    assert {k: on_gpu[k] for k in ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len")} \
        == {"dtype": "bfloat16", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "max_model_len": 256}
    assert "kv_cache_memory_bytes" not in on_gpu  # the memory share sizes the KV cache
    with caplog.at_level(logging.WARNING):
        on_cpu = vllm_engine.vllm_engine_args(local, spec, 1.0, 32, on_cpu=True)
    assert "tensor_parallel_size" not in on_cpu and "gpu_memory_utilization" not in on_cpu
    assert on_cpu["kv_cache_memory_bytes"] == 2**30 and "ignored on a CPU" in caplog.text
    plain = vllm_engine.vllm_engine_args(load_local_model(MODEL), ModelSpec(MODEL), 1.0, 32, on_cpu=False)
    assert plain["dtype"] == "float32" and "tensor_parallel_size" not in plain
