"""Attack class: hostile bytes on the wire. Decoders are total (only typed WireErrors
come out), bounded (no decode allocates more than a small multiple of its input, and
every list item has a bound of its own), and accept exactly one encoding of a signed
message, so nobody but its signer can mint a second identity for it."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz import mutate

from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import ENVELOPE_VERSION, open_envelope, seal
from gonka_p2p.wire.messages import Announcement, ChatTurn, InferenceRequest, TokenBatch
from gonka_p2p.wire.schema import Malformed, Oversize, WireError, unpack

KEY = Keypair.from_seed(b"adversarial-decoders")
REQUEST = InferenceRequest(
    chain_id="c", model="m", messages=[ChatTurn(role="user", content="hi")], max_tokens=8, temperature=0.7,
    top_p=0.9, top_k=0, logprobs_k=5, timestamp_ms=1, nonce=b"\x01" * 16)


def _peak_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        fn()
    except WireError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("empty", [b"\x90", b"\x80"], ids=["arrays", "maps"])
def test_nested_empty_containers_cannot_amplify_memory(empty: bytes) -> None:
    """One byte per empty array/map is ~64 bytes in Python: 1 MiB of them was ~64 MiB."""
    rows = 60_000  # within msgpack's per-array length limit; 15 empty containers each
    hostile = b"\xdc" + rows.to_bytes(2, "big") + (b"\x9f" + empty * 15) * rows
    with pytest.raises(Oversize):
        unpack(hostile)
    assert _peak_bytes(lambda: unpack(hostile)) < 16 * len(hostile)


def test_honest_token_batch_fits_the_container_budget() -> None:
    k, n = 20, 4096  # the widest batch the schema admits, with the smallest numbers
    batch = TokenBatch(inference_id=b"\x00" * 32, start=0, token_ids=[0] * n, logprobs=[0.0] * n,
                       top_ids=[[0] * k] * n, top_logprobs=[[0.0] * k] * n, text="")
    assert open_envelope(seal(batch, KEY), TokenBatch).message == batch


def test_list_items_are_bounded_each() -> None:
    """An announcement of 8 addresses was allowed 8 x 64 KiB: now an address is <= 256 chars."""
    body = Announcement(addrs=["/ip4/127.0.0.1/tcp/1"], models=["m"], capacity=1, seq=0).to_obj()
    body["addrs"] = ["a" * 60_000]
    with pytest.raises(Oversize):
        Announcement.from_obj(body)
    batch = TokenBatch(inference_id=b"\x00" * 32, start=0, token_ids=[1], logprobs=[0.0],
                       top_ids=[[1] * 21], top_logprobs=[[0.0] * 5], text="").to_obj()
    with pytest.raises(Oversize):
        TokenBatch.from_obj(batch)
    batch["top_ids"] = [[-1] * 5]
    with pytest.raises(Malformed):
        TokenBatch.from_obj(batch)


def _reencodings(raw: bytes) -> list[bytes]:
    """Other msgpack encodings of the same envelope value: what a third party could relay."""
    _, kind, version, body, pubkey, sig = msgpack.unpackb(raw, raw=False)
    fields = msgpack.unpackb(body, raw=False)
    reordered = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    r_len = sig[3]
    padded_sig = bytes([0x30, sig[1] + 1, 0x02, r_len + 1, 0x00]) + sig[4:]
    pack = lambda *items: msgpack.packb(list(items), use_bin_type=True)  # noqa: E731
    return [
        b"\x96\xcd\x00\x01" + raw[2:],  # the envelope version as a uint16
        pack(ENVELOPE_VERSION, kind, version, reordered, pubkey, sig),  # body map reordered
        pack(ENVELOPE_VERSION, kind, version, body, pubkey, padded_sig),  # non-minimal DER
        msgpack.packb([ENVELOPE_VERSION, kind, version, body, pubkey, sig], use_bin_type=False),
    ]


def test_only_the_canonical_encoding_of_a_signed_message_is_accepted() -> None:
    raw = seal(REQUEST, KEY)
    assert open_envelope(raw, InferenceRequest).message == REQUEST
    variants = _reencodings(raw)
    assert len({raw, *variants}) == len(variants) + 1
    for variant in variants:
        with pytest.raises(WireError):
            open_envelope(variant, InferenceRequest)


@settings(deadline=None)
@given(st.data())
def test_mutated_envelopes_raise_only_wire_errors(data: st.DataObject) -> None:
    try:
        opened = open_envelope(mutate(data, seal(REQUEST, KEY)), InferenceRequest)
    except WireError:
        return
    assert opened.message == REQUEST  # only an unchanged envelope opens
