"""Attack class: hostile evidence. An executor serves artifact bytes to validators; whatever
it serves decodes to a consistent artifact or raises ArtifactError -- never another
exception that would escape a validator's check (one crafted artifact used to crash every
validator that checked it, again after each restart)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import mutate

from gonka_p2p.inference.artifacts import ArtifactError, InferenceArtifact
from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.inference.sampler import SamplingParams

K = 5
ARTIFACT = InferenceArtifact(
    model="m", prompt_ids=(1, 2, 3), params=SamplingParams(max_tokens=4, logprobs_k=K),
    seed=b"\x07" * 32,
    steps=tuple(TokenStep(7, -0.5, (7, 8, 9, 10, 11), (-0.5, -1.0, -2.0, -3.0, -4.0)) for _ in range(3)))


def _with_header(**changes: object) -> bytes:
    fields = ["version", "model", "prompt", "max_tokens", "temp", "top_p", "top_k", "k", "seed", "n"]
    raw = ARTIFACT.encode()
    (hlen,) = struct.unpack_from("<I", raw)
    header = dict(zip(fields, msgpack.unpackb(raw[4:4 + hlen], raw=False)))
    header.update(changes)
    packed = msgpack.packb(list(header.values()), use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + raw[4 + hlen:]


def test_the_honest_artifact_round_trips() -> None:
    assert InferenceArtifact.decode(ARTIFACT.encode()) == ARTIFACT


@pytest.mark.parametrize("changes", [
    {"prompt": [1, "two", 3]},  # a non-integer prompt id raised ValueError out of the validator
    {"prompt": [1, -2, 3]},
    {"prompt": [1, 2**40]},
    {"prompt": "123"},
    {"model": 5},
    {"k": "5"},
    {"k": 4},
    {"k": 10**9},  # a row dtype of a billion columns
    {"n": 2},
    {"n": 10**12},
    {"temp": float("nan")},
    {"temp": True},
    {"top_p": 0.0},
    {"seed": "seed"},
    {"version": 2},
], ids=repr)
def test_a_crafted_header_is_an_artifact_error(changes: dict[str, object]) -> None:
    with pytest.raises(ArtifactError):
        InferenceArtifact.decode(_with_header(**changes))


def test_nan_or_positive_logprobs_are_refused() -> None:
    for bad in (float("nan"), 0.5):
        step = TokenStep(7, bad, (7, 8, 9, 10, 11), (-0.5, -1.0, -2.0, -3.0, -4.0))
        raw = InferenceArtifact(ARTIFACT.model, ARTIFACT.prompt_ids, ARTIFACT.params, ARTIFACT.seed,
                                (step,)).encode()
        with pytest.raises(ArtifactError):
            InferenceArtifact.decode(raw)


@settings(deadline=None)
@given(st.data())
def test_mutated_artifacts_raise_only_artifact_errors(data: st.DataObject) -> None:
    try:
        InferenceArtifact.decode(mutate(data, ARTIFACT.encode()))
    except ArtifactError:
        pass


@settings(deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_artifact_errors(raw: bytes) -> None:
    try:
        InferenceArtifact.decode(raw)
    except ArtifactError:
        pass
