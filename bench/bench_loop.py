"""Closed-loop bench: frozen vs continual vs continual+exploration in the MovieLens simulator with drift.

`make bench-loop` (= `python -m bench.bench_loop`) writes bench/results/loop.{md,png,json}.

The default run is a confirmatory test, pre-registered: this text and the defaults of LoopConfig
(now in bench/loop_sim.py, unchanged) were committed before it ran, and its report is kept whatever
it says.
- Question: the issue's "with exploration, the long-run click-through rate is higher than pure
  exploitation". Seeds 0-9 were spent exploring it in three scenarios (bench_loop_random,
  bench_loop_retrieval, bench_loop_sessions and their replications); their pooled figures were
  chosen after the fact, so they suggest but cannot confirm.
- Scenario: the one that matches the stream worker (bench_loop_sessions): each request's 60
  candidates are the nearest to the user's context, none random, and contexts follow the user's
  clicks in each arm's answers. Arms, policy settings, learner, gate and late window (rounds 24-35,
  drift at 12) unchanged. Seeds 10-29: twenty fresh ones. Run: `make bench-loop` (jobs only change
  the wall time; each seed's figures do not depend on them).
- Primary test, the only one that decides: late-window CTR of explore (the continual system plus
  the Thompson layer) minus continual (the same learner, greedy: pure exploitation of the ranker),
  paired over seeds. The must-show holds if the two-sided 95 % Student-t interval lies above 0.
  Power: seeds 0-9 of this scenario gave +0.0052 with a per-seed SD of 0.0051; at the replication's
  +0.0035 twenty seeds give about 80 %.
- Reported, not deciding: explore - exploit_lift (the same layer ranked by its posterior mean: does
  the exploring pay, or the learning between LoRA rounds), the other differences, NDCG@10, the OPE
  checks and click-to-live (on seed 10).

Protocol (one seed, common random users across arms):
1. Warm-up: a uniformly random logging policy shows lists to simulated users before the drift; a
   RankerNet is trained on those logs (full training, IPW) -> v1, the starting point of every arm.
2. Rounds: each round `users_per_round` requests; each arm scores the candidates with its live
   model, its policy orders them, the simulator clicks. After `drift_round` the users' tastes rotate.
   - frozen: v1 forever, greedy;
   - continual: greedy; after every round a LoRA round on the replay buffer, gated on the newest
     held-back window, promotes a not-worse candidate;
   - explore: as continual, plus a Thompson-sampling layer of per-item click lifts over the ranker's
     scores that learns after every request (Monte-Carlo propensities are logged);
   - exploit_lift: as explore, but the layer ranks by the posterior mean lift (the ablation that
     tells exploring apart from learning per-item corrections between LoRA rounds).
   CTR = clicks per shown slot. NDCG@10 = the live model's greedy top-10 graded by true relevance
   (model quality, independent of the exploration a list carries).
3. OPE check: on fresh requests, log the explore arm's PL policy and estimate the CTR of its greedy
   policy (IPS / SNIPS / DR with CIs); the "simulated online value" is that greedy policy's exact
   expected CTR on the same requests under the simulator.
4. click_to_live_s: a burst of clicks -> LoRA round -> gate -> atomic version write -> Triton
   load_model -> the new version answers unversioned requests, through a real tritonserver on a
   temporary copy of the repository.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Annotated, Any

import numpy as np
import torch
import typer

from bench.common import RESULTS_DIR, peak_rss_mb, write_result
from bench.loop_checks import click_to_live, ope_check, production_ope_check
from bench.loop_report import markdown, plot, verdict
from bench.loop_sim import Arm, LoopConfig, SimFeatures, pretrain, run_loop
from bench.loop_stats import add_holm, phase_means, t_interval
from bench.simulator import SimConfig, load_simulator
from recstream.continual import (
    Example,
)
from recstream.explore import PlackettLuce

log = logging.getLogger("bench.loop")

ARMS = ("frozen", "continual", "explore", "exploit_lift")


def run_seed(cfg: LoopConfig) -> dict[str, Any]:
    """One independent repetition: its own simulator (tastes, drift, hits), warm-up logs, v1 and loop."""
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    sim = load_simulator(
        SimConfig(seed=cfg.seed, live_popularity=cfg.live_popularity, n_random_candidates=cfg.random_candidates)
    )
    features = SimFeatures(sim)
    base, _, popularity = pretrain(sim, cfg, features)
    out = run_loop(sim, cfg, base, features, popularity)
    out.update(sim=sim, features=features, base=base, wall_s=time.monotonic() - t0)
    return out


def run_seed_summary(cfg: LoopConfig) -> dict[str, Any]:
    """run_seed in a worker process: only what the report needs crosses back (curves, arm counters)."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run_seed(cfg)
    return {"curves": out["curves"], "arms": out["arms"], "wall_s": out["wall_s"]}


def run_seeds(cfg: LoopConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every seed's loop (in cfg.seeds order) and the first seed's full output, which the checks need.

    This process runs the first seed, then takes seeds from the back of the queue that `jobs - 1`
    spawned processes work through from the front. Each seed owns its random streams and runs
    single-threaded, so the figures do not depend on `jobs`."""
    first_cfg, rest = cfg.model_copy(update={"seed": cfg.seeds[0]}), cfg.seeds[1:]
    if cfg.jobs == 1 or not rest:
        outs = [run_seed(first_cfg), *(run_seed(cfg.model_copy(update={"seed": sd})) for sd in rest)]
        return outs, outs[0]
    ctx = multiprocessing.get_context("spawn")  # no forked torch / tqdm state in the workers
    with ProcessPoolExecutor(max_workers=min(cfg.jobs - 1, len(rest)), mp_context=ctx) as pool:
        futures = {sd: pool.submit(run_seed_summary, cfg.model_copy(update={"seed": sd})) for sd in rest}
        first = run_seed(first_cfg)
        here = {}
        for sd in reversed(rest):
            if futures[sd].cancel():  # not started by a worker yet: run it here
                out = run_seed(cfg.model_copy(update={"seed": sd}))
                here[sd] = {"curves": out["curves"], "arms": out["arms"], "wall_s": out["wall_s"]}
        outs = [first, *(here[sd] if sd in here else futures[sd].result() for sd in rest)]
    return outs, first


def run_checks(first: dict[str, Any], cfg: LoopConfig) -> dict[str, Any]:
    """OPE checks and click-to-live on the first seed's simulator (drifted) and explore arm."""
    sim, features, base = first["sim"], first["features"], first["base"]
    ope = ope_check(sim, cfg, first["live"]["explore"], "pl")
    ope_ts = ope_check(sim, cfg, first["live"]["explore"], "ts")
    # Other model versions judged from the explore arm's logs: the frozen arm's v1 (stale since the
    # drift) and the continual arm's live model.
    others = {"frozen_v1": first["live"]["frozen"].live, "continual_live": first["live"]["continual"].live}
    ope_production = production_ope_check(sim, cfg, first["live"]["explore"])
    ope_models = production_ope_check(sim, cfg, first["live"]["explore"], others, spec=cfg.model_ope_logging)
    burst_user_rng = np.random.default_rng(cfg.seed + 5)
    # The burst only carries the measurement; it is logged by the same Plackett-Luce policy as in
    # earlier runs (a fresh Thompson layer knows nothing yet and would make a noisier burst).
    burst_arm = Arm(
        "burst",
        base,
        PlackettLuce(0.5, greedy_slots=2),
        learn=False,
        cfg=cfg,
        popularity=first["live"]["explore"].popularity,
    )
    click_rng = np.random.default_rng(3)

    def next_burst() -> list[Example]:
        """300 more requests served and clicked: the examples they added."""
        seen = burst_arm.buffer.seen
        reqs = [sim.request(int(u), burst_user_rng) for u in burst_user_rng.integers(0, sim.n_users, 300)]
        burst_arm.serve(sim, reqs, click_rng)
        return burst_arm.buffer.latest(burst_arm.buffer.seen - seen)

    c2l: dict[str, Any]
    if cfg.triton:
        try:
            c2l = click_to_live(sim, cfg, base, next_burst, features)
        except Exception as exc:  # the bench still reports the simulation when Triton is unavailable
            log.exception("click-to-live measurement failed")
            c2l = {"click_to_live_s": None, "reason": f"tritonserver unavailable: {exc}"}
    else:
        c2l = {"click_to_live_s": None, "reason": "disabled"}

    return {
        "ope": ope,
        "ope_thompson_logs": ope_ts,
        "ope_production_logs": ope_production,
        "ope_model_versions": ope_models,
        "click_to_live": c2l,
    }


def main(cfg: LoopConfig | None = None) -> dict[str, Any]:
    cfg = cfg or LoopConfig()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny matrices: one thread is ~10x faster than two on a shared 2-core box
    t_all = time.monotonic()
    seeds = list(dict.fromkeys([*([] if cfg.seed is None else [cfg.seed]), *cfg.seeds]))  # the checks' seed first
    cfg = cfg.model_copy(update={"seeds": seeds, "seed": seeds[0]})
    late = (cfg.drift_round + (cfg.rounds - cfg.drift_round) // 2, cfg.rounds)  # long run after the drift
    phases = {
        "pre-drift": (0, cfg.drift_round),
        "just after drift": (cfg.drift_round, cfg.drift_round + 4),
        "late (2nd half post-drift)": late,
    }
    per_seed: list[dict[str, Any]] = []
    seed_curves: dict[str, list[list[dict[str, float]]]] = {a: [] for a in ARMS}
    arm_stats: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    outs, first = run_seeds(cfg)
    for seed, out in zip(seeds, outs, strict=True):
        row: dict[str, Any] = {"seed": seed, "wall_s": out["wall_s"]}
        for a in ARMS:
            row[f"ctr_{a}"] = phase_means(out["curves"][a], *late, "ctr")
            row[f"ndcg10_{a}"] = phase_means(out["curves"][a], *late, "ndcg10")
            row[f"hot_share_{a}"] = phase_means(out["curves"][a], *late, "hot_share")
            seed_curves[a].append(out["curves"][a])
            arm_stats[a].append(out["arms"][a])
        row["ctr_explore_minus_continual"] = row["ctr_explore"] - row["ctr_continual"]
        row["ctr_all_rounds_explore_minus_continual"] = phase_means(
            out["curves"]["explore"], 0, cfg.rounds, "ctr"
        ) - phase_means(out["curves"]["continual"], 0, cfg.rounds, "ctr")
        per_seed.append(row)
        log.info("seed %d: %s", seed, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})

    checks = run_checks(first, cfg) if cfg.checks else {}

    # Mean curves over seeds (per round), phase table over seeds.
    curves: dict[str, list[dict[str, float]]] = {}
    for a in ARMS:
        curves[a] = []
        for t in range(cfg.rounds):
            pts = [sc[t] for sc in seed_curves[a]]
            curves[a].append(
                {
                    "round": t,
                    "ctr": float(np.mean([p["ctr"] for p in pts])),
                    "ctr_sd": float(np.std([p["ctr"] for p in pts], ddof=1)) if len(pts) > 1 else 0.0,
                    "ndcg10": float(np.mean([p["ndcg10"] for p in pts])),
                    "ndcg10_sd": float(np.std([p["ndcg10"] for p in pts], ddof=1)) if len(pts) > 1 else 0.0,
                    "hot_share": float(np.mean([p["hot_share"] for p in pts])),
                }
            )
    rows = []
    for a in ARMS:
        row = {"arm": a}
        for ph, (lo, hi) in phases.items():
            row[f"CTR {ph}"] = phase_means(curves[a], lo, hi, "ctr")
            row[f"NDCG@10 {ph}"] = phase_means(curves[a], lo, hi, "ndcg10")
        row["promotions"] = float(np.mean([s["promotions"] for s in arm_stats[a]]))
        row["refusals"] = float(np.mean([s["refusals"] for s in arm_stats[a]]))
        rows.append(row)

    ci = {
        f"{m}_{a}": t_interval([r[f"{m}_{a}"] for r in per_seed]) for m in ("ctr", "ndcg10", "hot_share") for a in ARMS
    }
    diffs = {
        "explore_minus_continual": t_interval([r["ctr_explore"] - r["ctr_continual"] for r in per_seed]),
        "explore_minus_frozen": t_interval([r["ctr_explore"] - r["ctr_frozen"] for r in per_seed]),
        "explore_minus_exploit_lift": t_interval([r["ctr_explore"] - r["ctr_exploit_lift"] for r in per_seed]),
        "exploit_lift_minus_continual": t_interval([r["ctr_exploit_lift"] - r["ctr_continual"] for r in per_seed]),
        "continual_minus_frozen": t_interval([r["ctr_continual"] - r["ctr_frozen"] for r in per_seed]),
    }
    add_holm(diffs, per_seed)
    # Model quality of each arm's live ranker (greedy top-10, independent of the exploration layer).
    ndcg_diffs = {}
    for name in diffs:
        hi, lo = name.split("_minus_")
        d = [r[f"ndcg10_{hi}"] - r[f"ndcg10_{lo}"] for r in per_seed]
        ndcg_diffs[name] = {**t_interval(d), "seeds_positive": int(sum(x > 0 for x in d))}
    all_rounds = t_interval([r["ctr_all_rounds_explore_minus_continual"] for r in per_seed])
    all_rounds["seeds_positive"] = int(sum(r["ctr_all_rounds_explore_minus_continual"] > 0 for r in per_seed))
    for name, d in diffs.items():
        hi, lo = name.split("_minus_")
        d["seeds_positive"] = int(sum(r[f"ctr_{hi}"] > r[f"ctr_{lo}"] for r in per_seed))
    result = {
        "ctr_frozen": ci["ctr_frozen"]["mean"],
        "ctr_continual": ci["ctr_continual"]["mean"],
        "ctr_explore": ci["ctr_explore"]["mean"],
        "ndcg10_frozen": ci["ndcg10_frozen"]["mean"],
        "ndcg10_continual": ci["ndcg10_continual"]["mean"],
        "ndcg10_explore": ci["ndcg10_explore"]["mean"],
        **(
            {
                "ope_estimate": checks["ope"]["estimates"][checks["ope"]["primary"]]["value"],
                "ope_ci": checks["ope"]["estimates"][checks["ope"]["primary"]]["ci"],
                "simulated_online_value": checks["ope"]["simulated_online_value"],
                "click_to_live_s": checks["click_to_live"].get("click_to_live_s"),
            }
            if checks
            else {}
        ),
        "ctr_explore_minus_continual": diffs["explore_minus_continual"]["mean"],
        "ctr_explore_minus_continual_ci": diffs["explore_minus_continual"]["ci"],
        "seeds": seeds,
        "metric_window": f"rounds {late[0]}..{late[1] - 1} (drift at round {cfg.drift_round}); "
        f"means over {len(seeds)} seeds, 95% Student-t CIs over seeds",
        "ci": ci,
        "paired_differences": diffs,
        "paired_ndcg10_differences": ndcg_diffs,
        "paired_difference_all_rounds_explore_minus_continual": all_rounds,
        "explore_verdict": verdict(diffs["explore_minus_continual"]),
        "explore_vs_exploit_lift_verdict": verdict(diffs["explore_minus_exploit_lift"], "the mean-lift exploitation"),
        "per_seed": per_seed,
        "phases": rows,
        "curves": curves,
        "curves_per_seed": {
            a: {str(sd): [round(p["ctr"], 5) for p in sc] for sd, sc in zip(seeds, seed_curves[a], strict=True)}
            for a in ARMS
        },
        **checks,
        "config": cfg.model_dump(),
        "wall_s": time.monotonic() - t_all,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result(cfg.name, result)
    plot(curves, len(cfg.seeds), cfg.drift_round, RESULTS_DIR / f"{cfg.name}.png")
    report = RESULTS_DIR / f"{cfg.name}.md"
    report.write_text(markdown(result, phases))
    print(report.read_text())
    return result


def scenario_cli(default_name: str, scenario: str, **settings: Any) -> Callable[..., dict[str, Any]]:
    """The command of a loop run: `settings` over LoopConfig's (a variant, bench_loop_*.py, passes its
    own, checks off: the OPE checks and click-to-live are bench_loop's), its own result files, and
    optionally other seeds (`--seeds`, the first leads, as in main) under another name (`--name`)."""

    def run(
        seeds: Annotated[list[int] | None, typer.Option(help="Loop seeds (default: the run's own)")] = None,
        name: Annotated[str, typer.Option(help="Result file stem under bench/results")] = default_name,
        jobs: Annotated[int, typer.Option(min=1, help="Seeds run at once, one process each")] = 2,
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"seeds": seeds, "seed": None} if seeds else {}
        run_settings = {"checks": False, **settings, "name": name, "scenario": scenario, "jobs": jobs, **extra}
        return main(LoopConfig(**run_settings))

    return run


SCENARIO = (
    "the confirmatory run: retrieval-only candidates (60 nearest to the user's context, none random) from live "
    "sessions (the context follows the user's clicks in the arm's answers), as the stream worker retrieves; "
    "20 fresh seeds (pre-registered, see the module doc)."
)

if __name__ == "__main__":
    typer.run(scenario_cli("loop", SCENARIO, checks=True))
