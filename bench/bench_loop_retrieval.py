"""The closed loop of bench_loop with retrieval-only candidates: `make bench-loop_retrieval`.

Why: the simulator's default candidate list is 30 items nearest to the user's context plus 30
uniformly random ones. The random half is free, uniform exploration that every arm gets, greedy
included; the stream worker has no such thing (its candidates are the vector store's nearest
neighbours of the session or query vector, nothing random). bench_loop found no long-run value in
deliberate exploration on top of that free exploration. This run asks the same question of the
worker's candidate generation: 60 nearest candidates, no random ones.

Pre-registered (this file and its settings were committed before the first run, and the report is
kept whatever it says): the same seeds, arms, policy settings, learner, gate and late window as
bench_loop; only `random_candidates` changes (30 -> 0). The OPE checks and click-to-live are
bench_loop's and are not repeated. Known limit of the scenario: the simulated user's context stays
fixed (the worker's session vector would follow the user's clicks), so after the drift every arm's
candidates stay near the user's old tastes; the scenario isolates what the ranking layer can
discover inside a fixed candidate set.

Replication (also committed before it ran): the same scenario on five fresh seeds,
`make bench-loop_retrieval ARGS="--seeds 5 --seeds 6 --seeds 7 --seeds 8 --seeds 9 --name loop_retrieval_seeds5-9"`.
"""

from __future__ import annotations

import typer

from bench.bench_loop import scenario_cli

SCENARIO = (
    "retrieval-only candidates (60 nearest to the user's context, none random), as the stream worker "
    "retrieves; everything else as bench_loop (pre-registered: only this setting changed)."
)


run = scenario_cli("loop_retrieval", SCENARIO, random_candidates=0, live_sessions=False, seeds=[0, 1, 2, 3, 4])

if __name__ == "__main__":
    typer.run(run)
