"""Offline quality benchmark: every registered model, several seeds, one split, full ranking.

Run ``python -m bench.bench_quality`` (or ``make bench-quality``; options after ``ARGS=``)::

    --dataset ml-100k        built-in name or a generic-form directory (env DATASET)
    --seeds 0,1,2            training seeds per learned model (env SEEDS)
    --models a,b             subset of the registered rows (env MODELS; EXTRA_MODELS adds rows)
    --splits main,cold       which tables to run (cold: items held out of training entirely)
    --cold-seeds 0,1,2       which items are held out, one draw per training seed (default: the
                             training seeds; one value: the same draw for every seed)
    --no-cache               retrain every run instead of reusing cached ones

Every learned model trains under one budget rule (epochs until validation NDCG@10 stops rising,
recstream.eval.baselines.EarlyStopConfig; never wall-clock), and rows are chosen and compared on
validation only: the best baseline and our best model are the rows with the highest mean
*validation* NDCG@10, and their *test* difference is then reported paired over users with a 95 %
interval (recstream.eval.stats). Deterministic rows (popularity, item-knn, zero-shot) run once.

A finished (model, seed, split) run is cached under artifacts/quality_runs/, keyed by the data, the
row's factory and seed, the code the row runs (its factory's module and every module of the package
that imports, recstream.models.code_hash) and this bench's fit-and-rank step, so a rerun only
trains what changed: a change to the ranker reruns the served rows, not the baselines. Writes
``bench/results/quality.json`` (rows with ``ci95`` and ``seeds``, ``cold_start_rows``,
``paired_vs_best_baseline``) and the per-user ranks behind every figure in
``bench/results/quality_ranks.json`` (test cases by user id, per model and seed), so any two rows
can be compared paired later.

Adding a row is one line in ``MODELS``: ``ModelSpec(name, factory, kind=..., seeded=...)``; a seeded
factory takes ``seed=`` and returns an unfitted ``recstream.eval.baselines.Recommender``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bench.common import (
    RESULTS_DIR,
    cold_draws,
    load_dataset_arg,
    measure,
    paired_over_splits,
    print_table,
    write_result,
)
from recstream.data import cold_start_split, data_hash, leave_last_out
from recstream.data.split import Split
from recstream.eval.baselines import BPRMF, ItemKNN, Popularity, Recommender, SASRecID, SASRecText, ZeroShotText
from recstream.eval.metrics import metrics_from_ranks, rank_cases
from recstream.eval.stats import mean_ci95
from recstream.models.code_hash import code_version, function_version
from recstream.models.training import ARTIFACTS_DIR, split_fingerprint

METRICS = ("HR@10", "NDCG@10", "MRR", "Recall@50", "HR@50", "NDCG@50")
TABLE_COLUMNS = ["model", "kind", "seeds", "NDCG@10", "ci95", "HR@10", "MRR", "valid_NDCG@10", "train_s", "peak_rss_mb"]
CACHE_DIR = ARTIFACTS_DIR / "quality_runs"
PROTOCOL = (
    "leave-last-out per user in time order (ties by original row order; users with <3 interactions "
    "train only); one target per case; FULL ranking over all catalogue items with the user's other "
    "history items excluded; ties ranked pessimistically. Learned models: up to 40 epochs, early "
    "stopping on validation NDCG@10 (patience 5) for baselines; the served two-tower keeps its own "
    "rule (20 epochs, patience 3), never more than the baselines get; the served rows score as the "
    "stream worker serves (an item without training data by the vector the exported item encoder "
    "gives it, its text plus a residual borrowed from its text neighbours; the offline cold-item rule "
    "is not served, so not used). How much it borrows (the cold rule) is chosen per seed on the "
    "cold-start split's cold_valid cases among a fixed grid, as make train does; the main table's "
    "served rows use their seed's choice, so their training time includes the cold-start split's "
    "bundle. The served row also holds the ID sequence model (the sasrec-id baseline's SASRec, same "
    "budget rule): its best unseen items join each list and its z-scored score is added to the "
    "ranker's, both amounts chosen per seed on validation (recstream.training.sequence). "
    "Selection of the compared rows "
    "by mean validation NDCG@10 only. Cold start: {frac:.0%} of interacted items removed from "
    "training and histories entirely, a separate random draw of items per training seed (draws "
    "{cold_seeds}, paired with seeds {seeds}; a deterministic row runs once per draw); rows evaluate "
    "only test cases whose target is such an item, pooled over the draws; validation cases with a "
    "cold target form cold_valid (the only place a cold rule may be tuned). Paired intervals are over "
    "(draw, case): per draw the seeds on that draw are averaged, then every case of every draw counts once."
)

Kind = Literal["baseline", "ours"]


#: The code every row's cases are built and ranked by (part of each row's cache key).
RANKING_CODE = ("recstream.eval.metrics", "recstream.data.split")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark row: a name, how to build an unfitted model, and whether a seed changes it."""

    name: str
    factory: Callable[..., Recommender] | str
    kind: Kind = "baseline"
    seeded: bool = True
    optional: bool = False
    default: bool = True  # False: only when asked for by name (too slow for the default run)

    def target(self) -> str:
        f = self.factory
        return f if isinstance(f, str) else f"{f.__module__}:{f.__qualname__}"

    def code_version(self) -> str:
        """Hash of the code that decides this row's ranks: its factory's module with every training
        module it imports, and the code that builds and ranks the cases."""
        return code_version(self.target().partition(":")[0], *RANKING_CODE)

    def build(self, seed: int) -> Recommender:
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory(seed=seed) if self.seeded else factory()


MODELS: list[ModelSpec] = [
    ModelSpec("popularity", Popularity, seeded=False),
    ModelSpec("item-knn", ItemKNN, seeded=False),
    ModelSpec("bpr-mf", BPRMF),
    ModelSpec("sasrec-id", SASRecID),
    ModelSpec("sasrec-text", SASRecText, optional=True),  # needs the MiniLM package
    ModelSpec("zero-shot-minilm", ZeroShotText, seeded=False, optional=True),
    # ours: exactly what `make train` fits and exports (same code, config and checkpoints layout)
    ModelSpec("served-retrieval", "recstream.training.bundle:served_retrieval", kind="ours", optional=True),
    ModelSpec("served", "recstream.training.bundle:served_model", kind="ours", optional=True),
    # fine-tuned text towers: to convergence they take hours per seed on 2 CPU cores (run on a GPU)
    ModelSpec("two-tower-lora", "recstream.training.two_tower:two_tower_lora", "ours", optional=True, default=False),
    ModelSpec("two-tower-full", "recstream.training.two_tower:two_tower_full", "ours", optional=True, default=False),
]


@dataclass(frozen=True)
class PlannedRun:
    """One (seed, split) of a table. On the cold-start table every seed has its own draw of held-out
    items, so that the rows' intervals cover which items happen to be new, not only training noise."""

    seed: int
    split: Split
    draw: int | None = None  # the cold-start draw (which items are held out); None on the main split


def register(name: str, factory: Callable[..., Recommender] | str, kind: Kind = "ours", seeded: bool = True) -> None:
    """Add (or replace) a row at run time, for scripts that import this module."""
    MODELS[:] = [m for m in MODELS if m.name != name]
    MODELS.append(ModelSpec(name, factory, kind, seeded, optional=True))


def selected(names: str) -> list[ModelSpec]:
    for entry in filter(None, (e.strip() for e in os.environ.get("EXTRA_MODELS", "").split(","))):
        name, _, target = entry.partition("=")
        register(name.strip(), target.strip())
    wanted = [m.strip() for m in names.split(",") if m.strip()]
    if not wanted:
        return [m for m in MODELS if m.default]
    known = {m.name: m for m in MODELS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {sorted(known)}")
    return [known[w] for w in wanted]


# --- one run: fit one model with one seed, rank every case ----------------------------------------


_DATA_HASHES: dict[int, tuple[object, str]] = {}  # id -> (the data, kept alive so the id stays its own; hash)


def _data_key(split: Split) -> str:
    """The split's training data and the whole data set it was cut from (cases, texts, categories)."""
    data = split.data
    if id(data) not in _DATA_HASHES:
        _DATA_HASHES[id(data)] = (data, data_hash(data))
    return f"{split_fingerprint(split)}:{_DATA_HASHES[id(data)][1]}"


def _run_key(spec: ModelSpec, split: Split, seed: int, code: str) -> str:
    harness = function_version(fit_and_rank, _stages)
    blob = json.dumps([spec.name, spec.target(), spec.seeded, seed, _data_key(split), code, harness])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stages(split: Split) -> list[str]:
    return ["valid", "test", *(["cold_valid"] if hasattr(split, "cold_valid") else [])]


def fit_and_rank(spec: ModelSpec, split: Split, seed: int) -> dict[str, Any]:
    """Fit one model with one seed; the ranks of every stage's cases plus time, memory, training info."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = spec.build(seed)
    with measure() as fit_m:
        model.fit(split)
    run: dict[str, Any] = {"ranks": {}}
    with measure() as eval_m:
        for stage in _stages(split):
            cases = split.cases(stage)
            run["ranks"][stage] = rank_cases(model.score, cases.users, cases.histories, cases.targets).tolist()
    run.update(
        train_s=round(fit_m.seconds, 2),
        eval_s=round(eval_m.seconds, 2),
        peak_rss_mb=round(max(fit_m.peak_rss_mb, eval_m.peak_rss_mb), 1),
        train_info=_plain(getattr(model, "info", None) or {}),
    )
    del model
    gc.collect()
    return run


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe training info, without absolute machine paths."""
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, str | Path) and os.path.isabs(str(v)):
            v = os.path.relpath(str(v), ARTIFACTS_DIR.parent)
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def cached_run(spec: ModelSpec, split: Split, seed: int, label: str, use_cache: bool, code: str) -> dict[str, Any]:
    key = _run_key(spec, split, seed, code)
    path = CACHE_DIR / split_fingerprint(split)[:16] / f"{spec.name}-seed{seed}.json"
    if use_cache and path.exists():
        run = json.loads(path.read_text())
        if run.get("key") == key:
            run["cached"] = True
            return run
    print(f"[{label}] {spec.name} seed {seed} ...", flush=True)
    run = {"key": key, "seed": seed, **fit_and_rank(spec, split, seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    run["cached"] = False
    return run


# --- rows: runs of one model summarised over seeds ---------------------------------------------


def summarise(spec: ModelSpec, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over runs (seeds, and on the cold-start table their draws) of every metric, a 95 % interval
    over runs, and the per-run values. A deterministic row on one split has no interval."""
    per_seed = [metrics_from_ranks(np.asarray(r["ranks"]["test"]), ks=(10, 50)) for r in runs]
    valid = [metrics_from_ranks(np.asarray(r["ranks"]["valid"]), ks=(10,))["NDCG@10"] for r in runs]
    row: dict[str, Any] = {"model": spec.name, "kind": spec.kind, "seeds": [r["seed"] for r in runs]}
    row["deterministic"] = not spec.seeded
    if runs[0].get("draw") is not None:
        row["cold_seeds"] = [r["draw"] for r in runs]
    ci: dict[str, list[float]] = {}
    for m in METRICS:
        mean, lo, hi = mean_ci95([p[m] for p in per_seed])
        row[m] = mean
        ci[m] = [mean, mean] if len(runs) == 1 and not spec.seeded else [lo, hi]
    row["ci95"] = ci
    row["per_seed"] = {"NDCG@10": [p["NDCG@10"] for p in per_seed], "valid_NDCG@10": valid}
    row["valid_NDCG@10"] = float(np.mean(valid))
    if "cold_valid" in runs[0]["ranks"]:
        cv = [metrics_from_ranks(np.asarray(r["ranks"]["cold_valid"]), ks=(10,))["NDCG@10"] for r in runs]
        row["cold_valid_NDCG@10"] = float(np.mean(cv))
    rules = [r["train_info"].get("cold_rule") for r in runs]
    if any(rules):
        row["per_seed"]["cold_rule"] = rules
    row["n_cases"] = sum(len(group[0]["ranks"]["test"]) for group in _by_split(runs).values())
    row["train_s"] = float(np.mean([_train_seconds(r) for r in runs]))
    row["eval_s"] = float(np.mean([r["eval_s"] for r in runs]))
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["cached_runs"] = sum(bool(r.get("cached")) for r in runs)
    row["train_info"] = runs[0]["train_info"]
    return row


#: training-time parts a model reports itself (a row that reuses another row's training run)
_TRAIN_PARTS = ("retrieval_train_seconds", "fold_train_seconds", "ranker_train_seconds", "sequence_train_seconds")


def _train_seconds(run: dict[str, Any]) -> float:
    """What training cost: the fit's wall time, or, when the fit reused checkpoints trained for
    another row of the same seed (served and served-retrieval share one bundle), the parts' own
    recorded times."""
    info = run.get("train_info", {})
    parts = sum(float(info[k]) for k in _TRAIN_PARTS if k in info)
    return max(float(run["train_s"]), parts)


def _planned_for(spec: ModelSpec, plan: list[PlannedRun]) -> list[PlannedRun]:
    """Every planned run for a seeded row; one per distinct split (its first seed) for a deterministic one."""
    if spec.seeded:
        return plan
    first: dict[str, PlannedRun] = {}
    for p in plan:
        first.setdefault(split_fingerprint(p.split), p)
    return list(first.values())


def _run(spec: ModelSpec, p: PlannedRun, label: str, use_cache: bool, code: str) -> dict[str, Any]:
    run = cached_run(spec, p.split, p.seed, label, use_cache, code)
    return {**run, "split": split_fingerprint(p.split)[:16], "draw": p.draw}


def run_table(
    specs: list[ModelSpec], plan: list[PlannedRun], label: str, use_cache: bool
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    rows, runs_by_model = [], {}
    for spec in specs:
        try:
            code = spec.code_version()
            runs = [_run(spec, p, label, use_cache, code) for p in _planned_for(spec, plan)]
        except Exception as exc:
            if not spec.optional:
                raise
            print(f"  {spec.name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            traceback.print_exc(limit=3)
            rows.append({"model": spec.name, "kind": spec.kind, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        row = summarise(spec, runs)
        print(f"  {spec.name}: NDCG@10 {row['NDCG@10']:.4f} (valid {row['valid_NDCG@10']:.4f}) seeds {row['seeds']}")
        rows.append(row)
        runs_by_model[spec.name] = runs
    return rows, runs_by_model


def best_by_validation(rows: list[dict[str, Any]], kind: Kind) -> dict[str, Any] | None:
    candidates = [r for r in rows if r.get("kind") == kind and "skipped" not in r]
    return max(candidates, key=lambda r: r["valid_NDCG@10"], default=None)


def _by_split(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r.get("split", ""), []).append(r)
    return groups


def paired_block(
    rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], model: str, baseline: str
) -> dict[str, Any]:
    """`model` minus `baseline` NDCG@10 paired over cases; with several splits (cold-start draws) each
    split's cases are paired on that split and the interval covers every (split, case)."""
    ours_by, base_by = _by_split(runs[model]), _by_split(runs[baseline])
    groups = [
        ([np.asarray(r["ranks"]["test"]) for r in ours], [np.asarray(r["ranks"]["test"]) for r in base_by[key]])
        for key, ours in ours_by.items()
    ]
    block = {"model": model, "baseline": baseline, "metric": "NDCG@10", **paired_over_splits(groups)}
    if "per_split" in block:
        block["per_draw"] = [
            {"draw": ours[0]["draw"], **p} for ours, p in zip(ours_by.values(), block.pop("per_split"), strict=True)
        ]
    return block


def _runs_on(runs: dict[str, list[dict[str, Any]]], split: Split) -> dict[str, list[dict[str, Any]]]:
    key = split_fingerprint(split)[:16]
    return {name: [r for r in rs if r["split"] == key] for name, rs in runs.items()}


def _rank_dump(split: Split, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cases = split.cases("test")
    return {
        "users": [split.user_ids[u] for u in cases.users.tolist()],
        "targets": [split.item_ids[i] for i in cases.targets.tolist()],
        "ranks": {name: {str(r["seed"]): r["ranks"]["test"] for r in rs} for name, rs in runs.items()},
    }


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    lo, hi = row.get("ci95", {}).get("NDCG@10", [None, None])
    out["ci95"] = "-" if lo is None or lo != lo else f"[{lo:.4f}, {hi:.4f}]"
    out["seeds"] = len(row.get("seeds", [])) if not row.get("deterministic") else "det."
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=os.environ.get("DATASET", "ml-100k"))
    p.add_argument("--seeds", default=os.environ.get("SEEDS", "0,1,2"), help="comma-separated training seeds")
    p.add_argument("--models", default=os.environ.get("MODELS", ""), help="comma-separated rows (default: all)")
    p.add_argument("--splits", default="main,cold", help="main, cold or both")
    p.add_argument("--cold-frac", type=float, default=float(os.environ.get("COLD_FRAC", "0.1")))
    p.add_argument(
        "--cold-seeds",
        default=os.environ.get("COLD_SEEDS", ""),
        help="which items are held out, one draw per training seed (default: the training seeds; one value: one draw)",
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "1")))
    p.add_argument("--out", default="quality", help="result name under bench/results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit("--seeds needs at least one seed")
    splits = {s.strip() for s in args.splits.split(",") if s.strip()}
    if not splits <= {"main", "cold"}:
        raise SystemExit(f"--splits takes main and/or cold, got {args.splits!r}")
    draws = cold_draws(args.cold_seeds, seeds)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_dataset_arg(args.dataset)
    specs = selected(args.models)
    use_cache = not args.no_cache
    result: dict[str, Any] = {
        "dataset": data.name,
        "protocol": PROTOCOL.format(frac=args.cold_frac, cold_seeds=draws, seeds=seeds),
    }
    ranks: dict[str, Any] = {"dataset": data.name}
    rows: list[dict[str, Any]] = []
    cold_rows: list[dict[str, Any]] = []
    if "main" in splits:
        split = leave_last_out(data)
        print(f"{data}: {len(split.test)} test cases, {split.n_items} items ranked per case", flush=True)
        rows, runs = run_table(specs, [PlannedRun(s, split) for s in seeds], "leave-last-out", use_cache)
        ranks["leave_last_out"] = _rank_dump(split, runs)
        ours, base = best_by_validation(rows, "ours"), best_by_validation(rows, "baseline")
        if ours and base:
            result["paired_vs_best_baseline"] = paired_block(rows, runs, ours["model"], base["model"])
    if "cold" in splits:
        colds = {d: cold_start_split(data, frac=args.cold_frac, seed=d) for d in dict.fromkeys(draws)}
        per_draw = [
            {
                "draw": d,
                "cold_items": len(c.cold_items),
                "cold_test_cases": len(c.test),
                "cold_valid_cases": len(c.cold_valid),
            }
            for d, c in colds.items()
        ]
        result["cold_start"] = {
            "draws": list(colds),
            "cold_items": per_draw[0]["cold_items"],
            "cold_test_cases": sum(p["cold_test_cases"] for p in per_draw),
            "cold_valid_cases": sum(p["cold_valid_cases"] for p in per_draw),
            "all_test_cases": next(iter(colds.values())).n_test_all,
            "per_draw": per_draw,
        }
        print(f"cold start: {result['cold_start']}", flush=True)
        plan = [PlannedRun(s, colds[d], d) for s, d in zip(seeds, draws, strict=True)]
        cold_rows, cold_runs = run_table(specs, plan, "cold-start", use_cache)
        ranks["cold_start"] = {
            "draws": {str(d): _rank_dump(c, _runs_on(cold_runs, c)) for d, c in colds.items()},
        }
        ours = best_by_validation(rows or cold_rows, "ours")
        if ours and ours["model"] in cold_runs and "zero-shot-minilm" in cold_runs:
            result["cold_start_vs_zero_shot"] = paired_block(cold_rows, cold_runs, ours["model"], "zero-shot-minilm")
    result.update(
        rows=rows,
        cold_start_rows=cold_rows,
        seeds=seeds,
        selection="best baseline and our best model by mean validation NDCG@10; test figures compared paired",
        data_hash=data_hash(data),
        code_version=code_version(),
        n_users=data.n_users,
        n_items=data.n_items,
        n_interactions=len(data.interactions),
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        total_s=round(time.perf_counter() - t0, 1),
    )
    path = write_result(args.out, result)
    (RESULTS_DIR / f"{args.out}_ranks.json").write_text(json.dumps(ranks, separators=(",", ":")) + "\n")
    if rows:
        print_table(
            f"{data.name}: leave-last-out, full ranking over {data.n_items} items",
            [_fmt(r) for r in rows],
            TABLE_COLUMNS,
        )
    if cold_rows:
        cols = [*TABLE_COLUMNS[:-2], "cold_valid_NDCG@10"]
        title = (
            f"{data.name}: cold-start items ({result['cold_start']['cold_test_cases']} test cases with a cold "
            f"target, over draws {result['cold_start']['draws']})"
        )
        print_table(title, [_fmt(r) for r in cold_rows], cols)
    for block in ("paired_vs_best_baseline", "cold_start_vs_zero_shot"):
        if block in result:
            b = result[block]
            print(
                f"\n{block}: {b['model']} - {b['baseline']} NDCG@10 {b['diff']:+.4f} "
                f"[{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}], seeds won {b['seeds_won']}/{b['seeds_compared']}"
            )
    print(f"\nwrote {path} in {result['total_s']}s", flush=True)
    return result


if __name__ == "__main__":
    main()
