"""Which executor serves an inference: a pure, verifiable, weighted draw.

The draw is seeded by the inference id (the digest of the client's signed
request) and the attempt number, so anyone holding the request, the weights
and the list of live candidates can recompute the TA's choice: a TA that
routes to itself or to a partner instead of the drawn executor is provably
greedy. Weight, not identity count, decides the odds: a thousand Sybil
identities with no weight are never drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


class NoEligibleExecutor(Exception):
    """No candidate with positive weight remains."""


def choose_executor(
    weights: Mapping[str, int], exclude: frozenset[str], inference_id: bytes, attempt: int
) -> str:
    """Draw one peer from ``weights`` (peer id -> integer weight) minus ``exclude``.

    Candidates are ordered by peer id so the draw does not depend on dict
    order; the point in [0, total) comes from SHA-256 of (inference id,
    attempt), reduced without modulo bias worth caring about (256-bit draw).
    """
    candidates = sorted((p, w) for p, w in weights.items() if w > 0 and p not in exclude)
    total = sum(w for _, w in candidates)
    if total == 0:
        raise NoEligibleExecutor("no live executor with positive weight serves this model")
    draw = hashlib.sha256(b"gonka-executor-choice" + inference_id + attempt.to_bytes(4, "big"))
    point = int.from_bytes(draw.digest(), "big") % total
    for peer, weight in candidates:
        if point < weight:
            return peer
        point -= weight
    raise AssertionError("unreachable: point < total")
