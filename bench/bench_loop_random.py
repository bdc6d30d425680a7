"""The closed loop with the simulator's free random candidates: `make bench-loop_random`.

This was bench_loop's default until the confirmatory run (bench/results/loop_random.* are the
results it published as loop.*, seeds 0-4, with its OPE checks and click-to-live). Each request's 60
candidates are the 30 nearest to the user's fixed context plus 30 uniformly random items: free,
uniform exploration that every arm gets, greedy included, which the stream worker does not have
(bench_loop_retrieval.py and bench_loop_sessions.py say why that mattered). Kept so that the figures
published before stay reproducible.
"""

from __future__ import annotations

import typer

from bench.bench_loop import scenario_cli

SCENARIO = (
    "30 nearest + 30 uniformly random candidates per request, fixed user contexts, seeds 0-4: bench_loop's "
    "default before the confirmatory run."
)


run = scenario_cli(
    "loop_random", SCENARIO, random_candidates=30, live_sessions=False, seeds=[0, 1, 2, 3, 4], checks=True
)

if __name__ == "__main__":
    typer.run(run)
