"""Paired loop differences pooled over the seeds of several runs of one scenario.

`python -m bench.pool_seeds loop_retrieval loop_retrieval_seeds5-9` reads those results' per-seed
late-window CTRs and writes bench/results/loop_retrieval_pooled.json (and prints a table): each paired
comparison's mean, 95 % Student-t interval over all seeds, seeds > 0, and Holm-adjusted p over the
comparisons. Runs of one scenario on disjoint seeds are independent repetitions, so their seeds pool;
the pooling itself was decided after the first run, and the report says so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from bench.bench_loop import ARMS
from bench.common import RESULTS_DIR, write_result
from bench.loop_stats import add_holm, t_interval

COMPARISONS = ("explore_minus_continual", "explore_minus_exploit_lift", "exploit_lift_minus_continual")


def pool(names: list[str]) -> dict[str, Any]:
    runs = [json.loads((RESULTS_DIR / f"{n}.json").read_text()) for n in names]
    scenarios = {r["config"].get("scenario", "") for r in runs}
    if len(scenarios) != 1:
        raise typer.BadParameter(f"the runs are of different scenarios: {sorted(scenarios)}")
    per_seed = [row for r in runs for row in r["per_seed"]]
    seeds = [row["seed"] for row in per_seed]
    if len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"the runs share seeds: {seeds}")
    diffs: dict[str, dict[str, Any]] = {}
    for name in COMPARISONS:
        hi, lo = name.split("_minus_")
        d = [row[f"ctr_{hi}"] - row[f"ctr_{lo}"] for row in per_seed]
        diffs[name] = {**t_interval(d), "seeds_positive": int(sum(x > 0 for x in d))}
    add_holm(diffs, per_seed)
    return {
        "runs": names,
        "scenario": scenarios.pop(),
        "seeds": seeds,
        "ctr": {a: t_interval([row[f"ctr_{a}"] for row in per_seed]) for a in ARMS},
        "paired_differences": diffs,
        "note": "late-window CTR; seeds pooled after the first run (not pre-registered); Holm over these comparisons",
    }


def main(
    names: Annotated[list[str], typer.Argument(help="Result stems under bench/results, first one names the output")],
) -> None:
    result = pool(names)
    write_result(f"{names[0]}_pooled", result)
    print(f"{result['scenario']}\nseeds {result['seeds']}")
    for name, d in result["paired_differences"].items():
        print(
            f"{name.replace('_minus_', ' - '):32s} {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
            f"{d['seeds_positive']}/{d['n']}  p {d['p']:.3f}  Holm {d['p_holm']:.3f}"
        )


if __name__ == "__main__":
    typer.run(main)
