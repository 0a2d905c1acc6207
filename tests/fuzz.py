"""What the decoder fuzz tests share: the corruption a hostile or faulty peer applies to a
valid encoding. Every decoder must answer it with its own typed error, never another
exception (and never by accepting different bytes as the same message)."""

from __future__ import annotations

from hypothesis import strategies as st


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    """``raw`` after one to four byte flips, insertions or deletions drawn by hypothesis: what a
    corrupting or hostile peer sends in place of a valid encoding."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[at] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at]
    return bytes(out)
