"""Adversary tooling: how a cheating executor behaves, kept apart from the honest engines.

``cheats`` holds the strategies (cheaper models, cheaper tokens with real
evidence, tampered artifacts) and their names; ``engine`` puts one behind the
``Engine`` interface. Nothing in ``inference/`` or ``actors/`` imports this
package: a node serves a cheat only because its engine loader was wrapped
(:func:`gonka_p2p.adversary.engine.cheating_loader`, what ``--cheater`` does),
and the benchmarks, the simulator and the tests reach for it directly.
"""
