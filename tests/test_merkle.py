"""wire/merkle.py: every leaf of every tree opens against its root, and nothing else does.

A proof-of-compute commitment is a root and a count; the ledger accepts an
opening when ``verify_inclusion`` says so. So the properties that matter: an
honest proof verifies for every count and index, and changing the leaf, the
index, the count or any hash of the proof makes it fail (no exception: the
inputs come from strangers).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gonka_p2p.wire.merkle import (
    HASH_BYTES,
    MAX_PROOF_HASHES,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)

leaves_st = st.lists(st.binary(max_size=64), min_size=1, max_size=70)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    leaves = draw(leaves_st)
    return leaves, draw(st.integers(0, len(leaves) - 1))


def bound(count: int, tree_root: bytes) -> bytes:
    return hashlib.sha256(b"\x02" + count.to_bytes(8, "big") + tree_root).digest()


def test_small_trees_have_rfc6962_shape_bound_to_their_count() -> None:
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([a]) == bound(1, leaf_hash(a))
    assert merkle_root([a, b]) == bound(2, node_hash(leaf_hash(a), leaf_hash(b)))
    assert merkle_root([a, b, c]) == bound(3, node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c)))
    assert leaf_hash(a) == hashlib.sha256(b"\x00a").digest()


@given(tree_and_index())
def test_every_honest_proof_verifies(case: tuple[list[bytes], int]) -> None:
    leaves, i = case
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, i)
    assert len(proof) <= (len(leaves) - 1).bit_length()
    assert verify_inclusion(root, len(leaves), i, leaves[i], proof)


@given(tree_and_index(), st.binary(max_size=64))
def test_another_leaf_fails(case: tuple[list[bytes], int], other: bytes) -> None:
    leaves, i = case
    if other == leaves[i]:
        return
    assert not verify_inclusion(merkle_root(leaves), len(leaves), i, other, inclusion_proof(leaves, i))


@given(tree_and_index(), st.integers(-3, 200))
def test_another_index_fails(case: tuple[list[bytes], int], j: int) -> None:
    leaves, i = case
    if j == i or (0 <= j < len(leaves) and leaves[j] == leaves[i]):
        return  # the same bytes at another index may share the proof's shape only by collision
    assert not verify_inclusion(merkle_root(leaves), len(leaves), j, leaves[i], inclusion_proof(leaves, i))


@given(tree_and_index(), st.integers(-3, 200))
def test_another_count_fails(case: tuple[list[bytes], int], count: int) -> None:
    """A commitment (root, count) opened under another count does not verify."""
    leaves, i = case
    if count == len(leaves):
        return
    assert not verify_inclusion(merkle_root(leaves), count, i, leaves[i], inclusion_proof(leaves, i))


@given(tree_and_index(), st.data())
def test_tampered_proof_fails(case: tuple[list[bytes], int], data: st.DataObject) -> None:
    leaves, i = case
    root, proof = merkle_root(leaves), inclusion_proof(leaves, i)
    if not proof:
        assert not verify_inclusion(root, len(leaves), i, leaves[i], [bytes(HASH_BYTES)])
        return
    k = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 8 * HASH_BYTES - 1))
    flipped = bytearray(proof[k])
    flipped[bit // 8] ^= 1 << (bit % 8)
    tampered = [*proof[:k], bytes(flipped), *proof[k + 1:]]
    assert not verify_inclusion(root, len(leaves), i, leaves[i], tampered)
    assert not verify_inclusion(root, len(leaves), i, leaves[i], proof[:-1])
    assert not verify_inclusion(root, len(leaves), i, leaves[i], [*proof, proof[-1]])
    assert not verify_inclusion(root, len(leaves), i, leaves[i], proof[::-1]) or proof == proof[::-1]


@given(tree_and_index())
def test_another_root_fails(case: tuple[list[bytes], int]) -> None:
    leaves, i = case
    other = merkle_root([*leaves, b"extra"])
    assert not verify_inclusion(other, len(leaves), i, leaves[i], inclusion_proof(leaves, i))


def test_an_inner_node_is_not_a_leaf() -> None:
    """Domain separation: the two children of the root, concatenated, are no leaf of it."""
    leaves = [b"a", b"b"]
    inner = leaf_hash(b"a") + leaf_hash(b"b")
    assert not verify_inclusion(merkle_root(leaves), 1, 0, inner, [])


def test_malformed_proofs_are_false_not_errors() -> None:
    leaves = [bytes([i]) for i in range(5)]
    root, proof = merkle_root(leaves), inclusion_proof(leaves, 4)
    assert verify_inclusion(root, 5, 4, leaves[4], proof)
    assert not verify_inclusion(root, 5, 4, leaves[4], [p[:-1] for p in proof])
    assert not verify_inclusion(root, 5, 4, leaves[4], [*proof] + [bytes(32)] * MAX_PROOF_HASHES)
    assert not verify_inclusion(root, 5, 4, leaves[4], ["not bytes"] * len(proof))  # type: ignore[list-item]
    assert not verify_inclusion(root, 0, 0, leaves[0], [])
    assert not verify_inclusion(root, 2**70, 2**69, leaves[0], proof)


def test_no_tree_without_leaves() -> None:
    with pytest.raises(ValueError):
        merkle_root([])
    with pytest.raises(IndexError):
        inclusion_proof([b"a"], 1)
