"""Which validator must check which inference: the duty ring, and the indexes that enumerate it.

The rule
--------
Every settled inference i sits at a point ``x_i`` of a ring of 2^64 points
(:func:`duty_point`): the hash of its id and of the block that settled it.
Every validator v holds, for an epoch, an arc of the ring starting at
``s_v`` = the hash of its secret epoch seed (:func:`arc_start`). Inference i
is v's duty iff its point lies on v's arc (:func:`is_validation_duty`)::

    (x_i - s_v) mod 2^64  <  T(p_i, w_v, W_i)        T = rules.duty_threshold

with ``W_i`` the weight of i's eligible validators (committed for the epoch,
not its executor, not its TA) and ``T = 2^64 * (1 - (1 - p)^(w_v / W_i))``.

What it keeps of the rule before it (``H(seed_v || i) < T``, one hash per
validator and inference):

* **The probability of each duty.** ``s_v`` is uniform and unknown to anyone
  but v until it reveals, so ``x_i - s_v`` is uniform: v has the duty with
  probability exactly ``T / 2^64``.
* **Independence across validators.** Seeds are independent, hence arcs
  are: P(nobody checks i) = prod_v (1 - q_v) = 1 - p, as before, and a
  validator's share of the checks follows its weight.
* **Unpredictability.** The arcs are secret until the reveal (the seed is
  committed in the epoch before, when no inference of the epoch existed):
  nobody can aim work away from a validator, nor know who checks what.
* **The proof of a failing check.** The accuser's seed opens its commitment
  and puts the inference on its arc: one hash and one comparison
  (``tx_rules._duty_proven``, through ``LedgerState.is_validation_duty``).

What changes: one validator's duties are no longer independent of each
other -- they are the inferences whose points fall on one arc, so two
inferences close on the ring are checked by the same validators. A cheater
that knew its inferences' points when it decides to cheat could cheat only
on those in one short window W of the ring: each validator then covers all
of them or none, and they escape together with probability about
``(1 - p) * exp(-V * |W|)`` (V validators) instead of ``(1 - p)^c`` for c
independent ones -- the escape of a single cheat, whenever the executor does
more than V / p inferences per epoch. This is why the point hashes the
*settling block*, not the inference id alone: when the executor decides to
cheat (it is generating) that block does not exist, so its inferences' points
are uniform and independent of its choice, and the arcs covering its cheats
are as independent as before (the test: tests/adversarial/test_duty_ring.py).
Ids are no defence by themselves -- the id hashes the client's nonce, which a
self-dealing client grinds, and an executor chooses *which* requests it
cheats. What remains: an executor that proposes the settling block can grind
its hash (as it can a dispute committee's, rules.weighted_pick); clustering c
cheats of one block within a window of width d costs about d^-(c-1) tries, so
it buys at most a pair's correlation, in the blocks it proposes.

What it buys: one validator's duties are a range query, not a scan. Each
epoch keeps its settled inferences sorted by point (:class:`DutyRing`, a
derived index of the state, rebuilt on load); a validator's duties are the
entries on its arc up to the largest threshold any of them can have, then
filtered by their own: O(log I + candidates), where the rule before hashed
all I inferences of the epoch for each validator. The inverse -- who holds
one inference -- is the same query over the validators' sorted arc starts
(:class:`ArcIndex`), for the simulator, which knows every seed.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from heapq import nlargest
from types import MappingProxyType
from typing import NamedTuple

from gonka_p2p.ledger.rules import DUTY_SCALE, duty_threshold

_POINT_DOMAIN = b"gonka-p2p/duty-point/v1\x00"
_ARC_DOMAIN = b"gonka-p2p/duty-arc/v1\x00"


def duty_point(block_hash: bytes, inference_id: bytes) -> int:
    """The inference's point on the duty ring, fixed when it settles: unknown to its executor
    while it generates (see the module docstring)."""
    return int.from_bytes(hashlib.sha256(_POINT_DOMAIN + block_hash + inference_id).digest()[:8], "big")


def arc_start(seed: bytes) -> int:
    """Where a validator's duty arc starts for the epoch of its secret ``seed``."""
    return int.from_bytes(hashlib.sha256(_ARC_DOMAIN + seed).digest()[:8], "big")


def on_arc(start: int, point: int, length: int) -> bool:
    """Is ``point`` on the arc of ``length`` points that starts at ``start`` (wrapping at 2^64)?"""
    return (point - start) % DUTY_SCALE < length


def is_validation_duty(seed: bytes, point: int, p_ppm: int, weight: int, total_weight: int) -> bool:
    """Must the validator with this seed and weight check the inference at ``point``?"""
    return on_arc(arc_start(seed), point, duty_threshold(p_ppm, weight, total_weight))


def _ranges(start: int, length: int) -> Iterator[tuple[int, int]]:
    """The arc [start, start + length) as half-open ranges of plain integers (two if it wraps)."""
    end = start + min(length, DUTY_SCALE)
    if end <= DUTY_SCALE:
        yield start, end
    else:
        yield start, DUTY_SCALE
        yield 0, end - DUTY_SCALE


@dataclass(frozen=True, slots=True)
class Eligible:
    """An epoch's eligible validators (in its set, committed to a seed) with the sums every duty
    threshold needs, computed once: the epoch's W, and its smallest value for a validator."""

    weights: Mapping[str, int]
    total: int
    heaviest: tuple[tuple[int, str], ...]  # the three largest (weight, peer)

    @classmethod
    def of(cls, weights: Mapping[str, int]) -> Eligible:
        return cls(MappingProxyType(dict(weights)), sum(weights.values()),
                   tuple(nlargest(3, ((w, p) for p, w in weights.items()))))

    def others(self, executor: str, ta: str) -> int:
        """W of an inference: the eligible weight but its executor's and its TA's."""
        return self.total - self.weights.get(executor, 0) - (self.weights.get(ta, 0) if ta != executor else 0)

    def least_others(self, validator: str) -> int:
        """The smallest W of any inference ``validator`` may check: without the two heaviest
        others (the largest threshold it can meet grows as W shrinks)."""
        two = [w for w, p in self.heaviest if p != validator][:2]
        return max(self.weights[validator], self.total - sum(two))


class Entry(NamedTuple):
    """A settled inference on its epoch's ring: what its duty threshold needs."""

    point: int
    inference_id: bytes
    p_ppm: int
    executor: str
    ta: str


class DutyRing:
    """One epoch's settled inferences sorted by point. Entries arrive as inferences settle (in
    any order of points) and are sorted on the next query -- a merge of the new tail."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._sorted = True
        self._max_p = 0

    def add(self, entry: Entry) -> None:
        if self._entries and entry < self._entries[-1]:
            self._sorted = False
        self._entries.append(entry)
        self._max_p = max(self._max_p, entry.p_ppm)

    def on_arc(self, start: int, length: int) -> list[Entry]:
        """The entries whose points lie on the arc [start, start + length)."""
        if not self._sorted:
            self._entries.sort()
            self._sorted = True
        found = []
        for lo, hi in _ranges(start, length):
            found += self._entries[bisect_left(self._entries, (lo,)):bisect_left(self._entries, (hi,))]
        return found

    def duties(self, seed: bytes, validator: str, eligible: Eligible) -> list[bytes]:
        """The ids on ``validator``'s arc, each under its own threshold, in ring order."""
        weight, start = eligible.weights[validator], arc_start(seed)
        bound = duty_threshold(self._max_p, weight, eligible.least_others(validator))
        return [e.inference_id for e in self.on_arc(start, bound)
                if validator not in (e.executor, e.ta)
                and on_arc(start, e.point, duty_threshold(e.p_ppm, weight, eligible.others(e.executor, e.ta)))]


class ArcIndex:
    """An epoch's validators sorted by arc start, for whoever knows all their seeds: who must
    check the inference at a point (the validators whose arcs cover it)."""

    def __init__(self, seeds: Mapping[str, bytes], eligible: Eligible) -> None:
        self._eligible = eligible
        self._starts = sorted((arc_start(seeds[p]), p) for p in eligible.weights)
        self._points = [start for start, _ in self._starts]
        self._heaviest = max(eligible.weights.values(), default=0)

    def holders(self, point: int, p_ppm: int, executor: str, ta: str) -> list[str]:
        """The validators whose duty the inference at ``point`` is, nearest arc start first."""
        total = self._eligible.others(executor, ta)
        if not self._starts or total <= 0:
            return []
        bound = duty_threshold(p_ppm, min(self._heaviest, total), total)
        found = []
        at = bisect_right(self._points, point)  # the arcs starting at or before the point, walked back
        for step in range(len(self._starts)):
            start, peer = self._starts[(at - 1 - step) % len(self._starts)]
            if (point - start) % DUTY_SCALE >= bound:
                break
            if peer not in (executor, ta) and on_arc(
                    start, point, duty_threshold(p_ppm, self._eligible.weights[peer], total)):
                found.append(peer)
        return found
