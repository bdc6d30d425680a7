"""Exploration policies by name: the short specs operators write in EXPLORATION_POLICY.

Apart from the policies themselves so that every policy module stays a leaf (the Thompson layer
builds on the list policies; this module knows them all).
"""

from __future__ import annotations

from recstream.explore.policies import EpsilonGreedy, Greedy, PlackettLuce, RankingPolicy
from recstream.explore.thompson import LiftThompson


def make_policy(spec: str) -> RankingPolicy:
    """Policy from a short spec: 'greedy', 'pl:0.5' or 'pl:0.5:2' (temperature, greedy head slots),
    'eps:0.1:3' (epsilon, exploring slots), 'ts:5[:HALF_LIFE[:GROUP_PRIOR]]' (Thompson sampling of
    per-item click lifts, recstream.explore.thompson.LiftThompson; learns from `observe`),
    'lift:5[:HALF_LIFE[:GROUP_PRIOR]]' (the same layer ranking by the posterior mean lift: learns,
    never explores on purpose)."""
    kind, *args = spec.split(":")
    if kind in ("ts", "lift"):
        return LiftThompson(
            float(args[0]) if args else 5.0,
            float(args[1]) if len(args) > 1 else 20000.0,
            group_prior=float(args[2]) if len(args) > 2 else 0.0,
            sample=kind == "ts",
        )
    if kind == "greedy":
        return Greedy()
    if kind == "pl":
        return PlackettLuce(float(args[0]) if args else 1.0, int(args[1]) if len(args) > 1 else 0)
    if kind == "eps":
        return EpsilonGreedy(float(args[0]) if args else 0.1, int(args[1]) if len(args) > 1 else 3)
    raise ValueError(f"unknown policy spec {spec!r}; use greedy | pl:T | eps:E:SLOTS | ts:PRIOR | lift:PRIOR")
