"""The duty ring's indexes against the rule they enumerate (gonka_p2p/ledger/duties.py).

``DutyRing.duties`` (one validator's duties by a range query) and ``ArcIndex.holders`` (one
inference's validators by a walk back over arc starts) must give exactly what
``is_validation_duty`` gives when asked of every (validator, inference) pair: arcs that
wrap past 2^64, executors and TAs that are validators or not, mixed weights and rates.
"""

from __future__ import annotations

import random

import pytest

from gonka_p2p.ledger.duties import ArcIndex, DutyRing, Eligible, Entry, is_validation_duty
from gonka_p2p.ledger.rules import DUTY_SCALE


@pytest.mark.parametrize("seed", range(6))
def test_the_indexes_find_exactly_the_pairs_the_rule_gives(seed: int) -> None:
    print(f"duty index seed={seed}")
    rng = random.Random(seed)
    weights = {f"v{i}": rng.randint(1, 20) for i in range(rng.choice([1, 3, 12]))}
    eligible = Eligible.of(weights)
    seeds = {v: rng.randbytes(32) for v in weights}
    parties = [*weights, "outsider-ta", "outsider-ex"]
    ring, entries = DutyRing(), []
    for _ in range(400):
        executor, ta = rng.sample(parties, 2)
        point = rng.choice([rng.getrandbits(64), DUTY_SCALE - 1 - rng.getrandbits(8), rng.getrandbits(8)])
        entry = Entry(point, rng.randbytes(32), rng.choice([1, 10_000, 500_000, 990_000, 1_000_000]), executor, ta)
        ring.add(entry)
        entries.append(entry)

    def rule(v: str, e: Entry) -> bool:
        return v not in (e.executor, e.ta) and is_validation_duty(
            seeds[v], e.point, e.p_ppm, weights[v], eligible.others(e.executor, e.ta))

    for v in weights:
        assert sorted(ring.duties(seeds[v], v, eligible)) == sorted(e.inference_id for e in entries if rule(v, e))
    arcs = ArcIndex(seeds, eligible)
    for e in entries:
        assert sorted(arcs.holders(e.point, e.p_ppm, e.executor, e.ta)) == sorted(v for v in weights if rule(v, e))
