"""Envelopes and schemas: round trips hold, and no input makes a decoder raise anything but WireError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gonka_p2p.identity import Keypair, peer_id_from_pubkey
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import (
    MAX_CHAIN_ID,
    Announcement,
    ChatTurn,
    InferenceFinished,
    InferenceRequest,
    TokenBatch,
)
from gonka_p2p.wire.schema import (
    BadSignature,
    Malformed,
    Oversize,
    UnknownKind,
    UnsupportedVersion,
    WireError,
)

KEY = Keypair.from_seed(b"wire-test")
OTHER = Keypair.from_seed(b"someone-else")

text = st.text(max_size=200)
requests = st.builds(
    InferenceRequest,
    chain_id=st.text(max_size=MAX_CHAIN_ID),  # left to inference, hypothesis once drew 65 characters
    model=st.text(min_size=1, max_size=128),
    messages=st.lists(st.builds(ChatTurn, role=st.sampled_from(["user", "system", "assistant"]),
                                content=text), max_size=5),
    max_tokens=st.integers(1, 32768),
    temperature=st.floats(0.0, 10.0),
    top_p=st.floats(0.0, 1.0),
    top_k=st.integers(0, 1000),
    logprobs_k=st.integers(5, 20),
    timestamp_ms=st.integers(0, 2**62),
    nonce=st.binary(min_size=16, max_size=16),
)
batches = st.integers(0, 8).flatmap(lambda n: st.builds(
    TokenBatch,
    inference_id=st.binary(min_size=32, max_size=32),
    start=st.integers(0, 10_000),
    token_ids=st.lists(st.integers(0, 2**31), min_size=n, max_size=n),
    logprobs=st.lists(st.floats(-100, 0), min_size=n, max_size=n),
    top_ids=st.lists(st.lists(st.integers(0, 2**31), min_size=5, max_size=5), min_size=n, max_size=n),
    top_logprobs=st.lists(st.lists(st.floats(-100, 0), min_size=5, max_size=5), min_size=n, max_size=n),
    text=text,
))


@given(requests)
@settings(max_examples=100, deadline=None)
def test_request_round_trips_and_names_its_signer(req: InferenceRequest) -> None:
    signed = open_envelope(seal(req, KEY), InferenceRequest)
    assert signed.message == req
    assert signed.signer_id == KEY.peer_id


@given(batches)
@settings(max_examples=50, deadline=None)
def test_token_batch_round_trips(batch: TokenBatch) -> None:
    assert open_envelope(seal(batch, KEY), TokenBatch).message == batch


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_garbage_bytes_raise_only_wire_errors(data: bytes) -> None:
    with pytest.raises(WireError):
        open_envelope(data, InferenceRequest)


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
))
@settings(max_examples=300, deadline=None)
def test_wellformed_msgpack_of_any_shape_raises_only_wire_errors(obj: object) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(WireError):
        open_envelope(data, InferenceRequest)
    with pytest.raises(WireError):
        InferenceRequest.decode(data)


@given(requests, st.data())
@settings(max_examples=100, deadline=None)
def test_any_flipped_byte_is_rejected(req: InferenceRequest, data: st.DataObject) -> None:
    raw = bytearray(seal(req, KEY))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        signed = open_envelope(bytes(raw), InferenceRequest)
    except WireError:
        return
    # Only a flip that leaves the same message under the same key may pass (e.g. a
    # msgpack re-encoding of an equal value is impossible here, so this means DER slack).
    assert signed.message == req and signed.signer == KEY.public_key


def _envelope(kind: object, version: object, body: object, pubkey: object, sig: object) -> bytes:
    return msgpack.packb([1, kind, version, body, pubkey, sig], use_bin_type=True)


def test_each_failure_has_its_own_typed_error() -> None:
    req = InferenceRequest(chain_id="c", model="m", messages=[ChatTurn("user", "hi")], max_tokens=4,
                           temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5, timestamp_ms=1,
                           nonce=b"n" * 16)
    good = msgpack.unpackb(seal(req, KEY))
    _, kind, version, body, pubkey, sig = good
    with pytest.raises(BadSignature):
        open_envelope(_envelope(kind, version, body, OTHER.public_key, sig), InferenceRequest)
    with pytest.raises(UnsupportedVersion):
        open_envelope(_envelope(kind, 99, body, pubkey, sig), InferenceRequest)
    with pytest.raises(UnknownKind):
        open_envelope(_envelope("no_such_kind", version, body, pubkey, sig), InferenceRequest)
    with pytest.raises(UnknownKind):
        open_envelope(seal(req, KEY), Announcement)
    with pytest.raises(Oversize):
        open_envelope(b"\x00" * (9 * 1024 * 1024), InferenceRequest)
    with pytest.raises(Malformed):
        open_envelope(msgpack.packb([1, kind]), InferenceRequest)


def test_bounds_are_enforced_on_decode() -> None:
    body = {"inference_id": b"x" * 33, "finish_reason": "stop", "prompt_tokens": 1,
            "completion_tokens": 1, "response_hash": b"h" * 32, "prompt_ids": [1]}
    with pytest.raises(Oversize):
        InferenceFinished.decode(msgpack.packb(body, use_bin_type=True))
    body["inference_id"] = b"x" * 32
    body["prompt_tokens"] = -1
    with pytest.raises(Malformed):
        InferenceFinished.decode(msgpack.packb(body, use_bin_type=True))
    body["prompt_tokens"] = 1
    body["prompt_ids"] = [1] * 32_769
    with pytest.raises(Oversize):
        InferenceFinished.decode(msgpack.packb(body, use_bin_type=True))


def test_signature_of_one_kind_cannot_be_replayed_as_another() -> None:
    ann = Announcement(addrs=[], models=[], capacity=0, seq=1)
    _, _, version, body, pubkey, sig = msgpack.unpackb(seal(ann, KEY))
    with pytest.raises(WireError):
        open_envelope(_envelope("inference_request", version, body, pubkey, sig))


def test_peer_id_matches_libp2p_derivation() -> None:
    from libp2p.crypto.secp256k1 import Secp256k1PublicKey
    from libp2p.peer.id import ID

    assert ID.from_pubkey(Secp256k1PublicKey.from_bytes(KEY.public_key)).to_base58() == KEY.peer_id
    assert peer_id_from_pubkey(KEY.public_key) == KEY.peer_id


def test_key_file_is_private_and_round_trips(tmp_path) -> None:
    path = tmp_path / "k.key"
    KEY.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Keypair.load(path) == KEY
    with pytest.raises(FileExistsError):
        KEY.save(path)
