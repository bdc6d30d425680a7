"""Offline quality benchmark: every registered model on one split, full ranking, one table.

Run ``python -m bench.bench_quality`` (or ``make bench-quality``). Environment:

* ``DATASET``: a built-in name (default ``ml-100k``) or a directory in the generic form
* ``MODELS``: comma-separated subset of model names to run (default: all registered)
* ``EXTRA_MODELS``: more rows without editing code, ``name=module:attr,...``
* ``SEED`` (default 0), ``COLD_FRAC`` (default 0.1), ``SKIP_COLD=1`` to skip the cold-start rows,
  ``TORCH_THREADS`` (default 1: on a shared 2-core box more threads oversubscribe and run slower)

Writes ``bench/results/quality.json``.

Adding a model row is one line in ``MODELS`` below: ``ModelSpec("name", factory)`` where factory is
a zero-argument callable or a ``"module:attr"`` string (imported lazily; with ``optional=True`` any
error while importing, fitting or scoring turns the row into a skipped one, with the reason, instead
of failing the run). The model must follow
``recstream.eval.baselines.Recommender``: ``fit(split) -> self`` and
``score(users, histories) -> np.ndarray [batch, n_items]``.
"""

from __future__ import annotations

import gc
import importlib
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.common import measure, print_table, write_result
from recstream.data import cold_start_split, data_hash, leave_last_out, load_dataset
from recstream.data.split import Split
from recstream.eval.baselines import BPRMF, ItemKNN, Popularity, Recommender, SASRecID, ZeroShotText
from recstream.eval.metrics import evaluate

TABLE_COLUMNS = ["model", "HR@10", "NDCG@10", "MRR", "Recall@50"]
PROTOCOL = (
    "leave-last-out per user in time order (ties by original row order; users with <3 interactions "
    "train only); one target per case; FULL ranking over all catalogue items with the user's other "
    "history items excluded; ties ranked pessimistically. Cold start: {frac:.0%} of interacted items "
    "(seed {seed}) removed from training and histories entirely; rows evaluate only test cases whose "
    "target is such an item."
)


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark row: a name and how to build an unfitted model."""

    name: str
    factory: Callable[[], Recommender] | str
    optional: bool = False

    def build(self) -> Recommender:
        factory = self.factory
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        return factory()


MODELS: list[ModelSpec] = [
    ModelSpec("popularity", Popularity),
    ModelSpec("item-knn", ItemKNN),
    ModelSpec("bpr-mf", BPRMF),
    ModelSpec("sasrec-id", SASRecID),
    ModelSpec("zero-shot-minilm", ZeroShotText, optional=True),  # needs recstream.models.encoder
    # Project models register here, one line each, e.g.:
    # ModelSpec("two-tower", "recstream.models.two_tower:TwoTowerRecommender", optional=True),
    ModelSpec("two-tower-lora", "recstream.models.two_tower:two_tower_lora", optional=True),
    ModelSpec("two-tower-full", "recstream.models.two_tower:two_tower_full", optional=True),
    ModelSpec("two-tower-frozen", "recstream.models.two_tower:two_tower_frozen", optional=True),
    ModelSpec("two-tower+ranker", "recstream.models.ranker:two_tower_ranker", optional=True),
]


def register(name: str, factory: Callable[[], Recommender] | str, optional: bool = True) -> None:
    """Add (or replace) a row at run time, for scripts that import this module."""
    MODELS[:] = [m for m in MODELS if m.name != name]
    MODELS.append(ModelSpec(name, factory, optional))


def _selected() -> list[ModelSpec]:
    for entry in filter(None, (e.strip() for e in os.environ.get("EXTRA_MODELS", "").split(","))):
        name, _, target = entry.partition("=")
        register(name.strip(), target.strip(), optional=True)
    wanted = [m.strip() for m in os.environ.get("MODELS", "").split(",") if m.strip()]
    if not wanted:
        return list(MODELS)
    known = {m.name: m for m in MODELS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {sorted(known)}")
    return [known[w] for w in wanted]


def run_model(spec: ModelSpec, split: Split, seed: int) -> dict[str, Any]:
    """Fit and evaluate one model on `split`; the row also carries time, memory and training info."""
    row: dict[str, Any] = {"model": spec.name}
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = spec.build()
    with measure() as fit_m:
        model.fit(split)
    with measure() as eval_m:
        metrics = evaluate(model, split.cases("test"), ks=(10, 50))
    row.update({k: metrics[k] for k in ("HR@10", "NDCG@10", "MRR", "Recall@50")})
    row.update(
        {
            "HR@50": metrics["HR@50"],
            "NDCG@50": metrics["NDCG@50"],
            "n_cases": metrics["n_cases"],
            "train_s": round(fit_m.seconds, 2),
            "eval_s": round(eval_m.seconds, 2),
            "peak_rss_mb": round(max(fit_m.peak_rss_mb, eval_m.peak_rss_mb), 1),
            "rss_growth_mb": round(fit_m.rss_growth_mb + eval_m.rss_growth_mb, 1),
        }
    )
    info = getattr(model, "info", None)
    if info:
        row["train_info"] = info
    del model
    gc.collect()
    return row


def _run_all(specs: list[ModelSpec], split: Split, seed: int, label: str) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        print(f"[{label}] {spec.name} ...", flush=True)
        try:
            row = run_model(spec, split, seed)
        except Exception as exc:
            if not spec.optional:
                raise
            print(f"  {spec.name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            row = {"model": spec.name, "skipped": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc(limit=3)
        else:
            print(f"  {spec.name}: NDCG@10={row['NDCG@10']:.4f} train {row['train_s']}s", flush=True)
        rows.append(row)
    return rows


def main() -> dict[str, Any]:
    seed = int(os.environ.get("SEED", "0"))
    frac = float(os.environ.get("COLD_FRAC", "0.1"))
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
    dataset = os.environ.get("DATASET", "ml-100k")
    t0 = time.perf_counter()
    data = load_dataset(dataset)
    specs = _selected()
    split = leave_last_out(data)
    print(f"{data}: {len(split.test)} test cases, {split.n_items} items ranked per case", flush=True)
    rows = _run_all(specs, split, seed, "leave-last-out")
    cold_rows: list[dict[str, Any]] = []
    cold_info: dict[str, Any] = {}
    if os.environ.get("SKIP_COLD", "") not in ("1", "true", "yes"):
        cold = cold_start_split(data, frac=frac, seed=seed)
        cold_info = {
            "cold_items": len(cold.cold_items),
            "cold_test_cases": len(cold.test),
            "all_test_cases": cold.n_test_all,
        }
        print(f"cold start: {cold_info}", flush=True)
        cold_rows = _run_all(specs, cold, seed, "cold-start")
    result = {
        "dataset": data.name,
        "protocol": PROTOCOL.format(frac=frac, seed=seed),
        "rows": rows,
        "cold_start_rows": cold_rows,
        "data_hash": data_hash(data),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": len(data.interactions),
        "cold_start": cold_info,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "total_s": round(time.perf_counter() - t0, 1),
    }
    path = write_result("quality", result)
    timing_cols = [*TABLE_COLUMNS, "train_s", "peak_rss_mb"]
    print_table(f"{data.name}: leave-last-out, full ranking over {data.n_items} items", rows, timing_cols)
    if cold_rows:
        print_table(
            f"{data.name}: cold-start items ({cold_info['cold_test_cases']} test cases with a cold target)",
            cold_rows,
            timing_cols,
        )
    print(f"\nwrote {path} in {result['total_s']}s", flush=True)
    return result


if __name__ == "__main__":
    main()
