"""A Merkle tree over an ordered list of byte strings, with inclusion proofs (RFC 6962's shape).

Proof of compute commits to thousands of results with one 32-byte root and a
count, and later opens a few of them: the ledger checks each opening with
:func:`verify_inclusion` (pure, bounded work: one hash per tree level), the
participant builds the root and the proofs with :func:`merkle_root` and
:func:`inclusion_proof`. Leaves and inner nodes hash under different prefixes
(0x00, 0x01), so no inner node can be passed off as a leaf; the tree splits
at the largest power of two below the count, so every count has exactly one
tree and a proof names its leaf's index unambiguously. The root commits to
the count too (H(0x02, count, tree root)): an opening verifies under the
count it was made for and no other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_BYTES = 32
MAX_PROOF_HASHES = 64  # a tree of 2**64 leaves; anything longer is not a proof


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(count: int) -> int:
    """The largest power of two strictly below ``count`` (count >= 2)."""
    return 1 << ((count - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_root_of_hashes(hashes[:k]), _root_of_hashes(hashes[k:]))


def _bound(count: int, tree_root: bytes) -> bytes:
    return hashlib.sha256(b"\x02" + count.to_bytes(8, "big") + tree_root).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The root over ``leaves`` (at least one), in order, bound to their count."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    return _bound(len(leaves), _root_of_hashes([leaf_hash(leaf) for leaf in leaves]))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to the root, lowest first."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of {len(leaves)}")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    path: list[bytes] = []
    while len(hashes) > 1:
        k = _split(len(hashes))
        if index < k:
            path.append(_root_of_hashes(hashes[k:]))
            hashes = hashes[:k]
        else:
            path.append(_root_of_hashes(hashes[:k]))
            hashes, index = hashes[k:], index - k
    return path[::-1]


def verify_inclusion(root: bytes, count: int, index: int, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """Whether ``leaf`` is leaf ``index`` of the ``count``-leaf tree with ``root``. Total: any
    malformed input is False, never an exception."""
    if not 0 <= index < count < 2**64 or len(proof) > MAX_PROOF_HASHES:
        return False
    leaves = count
    if any(not isinstance(h, bytes) or len(h) != HASH_BYTES for h in proof):
        return False
    sides: list[bool] = []  # from the root down: True where the leaf lies in the right subtree
    while count > 1:
        k = _split(count)
        sides.append(index >= k)
        if index >= k:
            index, count = index - k, count - k
        else:
            count = k
    if len(sides) != len(proof):
        return False
    node = leaf_hash(leaf)
    for right, sibling in zip(reversed(sides), proof, strict=True):
        node = node_hash(sibling, node) if right else node_hash(node, sibling)
    return _bound(leaves, node) == root
