"""The closed loop with the worker's retrieval and sessions that follow clicks: `make bench-loop_sessions`.

Why: bench_loop_retrieval removed the simulator's random candidates (the worker has none) but kept
each user's context fixed, so after the drift every arm retrieved near the user's old tastes. The
worker's session vector follows behaviour events: what a system shows decides what its users click,
which moves their sessions and so its next candidates - the feedback loop in which a greedy
system can narrow what its users see. Here each arm's users' contexts follow the items they clicked
in that arm's answers (`LiveSessions`), clicked items are not recommended again (the worker hides
seen items), and training examples carry the context they were served with (as the trainer uses the
worker's logged inputs).

Pre-registered (this file and the simulator change were committed before the first run, and the
report is kept whatever it says): the same seeds, arms, policy settings, learner, gate and late
window as bench_loop; `random_candidates` 0 and live sessions are the only changes. The OPE checks and
click-to-live are bench_loop's and are not repeated.

Replication (committed after the first run's results and before it ran): the same scenario on five
fresh seeds, `make bench-loop_sessions ARGS="--seeds 5 --seeds 6 --seeds 7 --seeds 8 --seeds 9 --name
loop_sessions_seeds5-9"`.
"""

from __future__ import annotations

import typer

from bench.bench_loop import scenario_cli

SCENARIO = (
    "retrieval-only candidates (60 nearest to the user's context, none random) from live sessions (the "
    "context follows the user's clicks in the arm's answers), as the stream worker retrieves; everything else "
    "as bench_loop (pre-registered: only these settings changed)."
)


run = scenario_cli("loop_sessions", SCENARIO, random_candidates=0, live_sessions=True, seeds=[0, 1, 2, 3, 4])

if __name__ == "__main__":
    typer.run(run)
