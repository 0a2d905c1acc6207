"""A cheater that clusters its cheats on the duty ring (gonka_p2p/ledger/duties.py).

One validator's duties are the inferences on one arc of the ring, so inferences with
nearby points are checked by the same validators. An executor that could compute its
inferences' points while generating would cheat only on those in one short window: every
arc then covers all of them or none, and c cheats escape together about as often as one
(1 - p) instead of (1 - p)^c. The ledger hashes each point from the block that settles the
inference, which does not exist while the executor generates: the best it can compute is
the point under the last block it knows, and the cheats it clusters by that guess land
spread around the ring.
"""

from __future__ import annotations

import random

from gonka_p2p.ledger import duties, rules

VALIDATORS = 20  # of equal weight
P_PPM = 100_000  # p = 10 %: each cheat alone escapes 90 % of the time
INFERENCES, BLOCKS, CHEATS, TRIALS = 2_000, 20, 20, 400


def tightest_window(guesses: dict[bytes, int], size: int) -> list[bytes]:
    """The ``size`` ids whose guessed points span the shortest stretch of the ring."""
    ranked = sorted(guesses, key=guesses.__getitem__)
    start = min(range(len(ranked) - size + 1),
                key=lambda i: guesses[ranked[i + size - 1]] - guesses[ranked[i]])
    return ranked[start:start + size]


def test_cheats_clustered_by_what_the_executor_can_compute_escape_as_independent_ones() -> None:
    seed = 20_261_203
    print(f"duty ring clustering seed={seed}")
    rng = random.Random(seed)
    ids = [rng.randbytes(32) for _ in range(INFERENCES)]
    known = rng.randbytes(32)  # the last block the executor has seen while it generates
    settling = {iid: rng.randbytes(32) for iid in ids}  # the blocks that will settle them, later
    cheats = tightest_window({iid: duties.duty_point(known, iid) for iid in ids}, CHEATS)
    points = [duties.duty_point(settling[iid], iid) for iid in cheats]
    length = rules.duty_threshold(P_PPM, 1, VALIDATORS)
    escaped = 0
    for _ in range(TRIALS):  # each trial: one epoch's secret seeds
        starts = [duties.arc_start(rng.randbytes(32)) for _ in range(VALIDATORS)]
        escaped += not any(duties.on_arc(s, x, length) for s in starts for x in points)
    independent = (1 - P_PPM / rules.PPM) ** CHEATS  # 0.12; clustered on the ring: about 0.85
    assert escaped / TRIALS < 2 * independent, (escaped, TRIALS)
