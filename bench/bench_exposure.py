"""New-item exposure: what NEW_ITEM_SLOT_FACTOR buys new items and costs everyone else.

Run ``python -m bench.bench_exposure`` (or ``make bench-exposure``; ``ARGS="--seeds 0,1,2"``).

The served pair (`make train`'s models, the quality bench's cached bundles for each seed) orders
every list as the worker does: the ranker orders the known candidates, and a candidate nobody has
interacted with goes to its retrieval slot times the factor (`recstream.recommend.rerank.
new_item_order`, the function the worker calls). One ranker pass per case, then every factor.

- cold-start split (10 % of the items held out of training, one draw of items per seed as in the
  quality bench's cold table; they are new to the models): the
  cost on all its validation cases (``valid``: what a factor would be chosen on), the gain on its
  cold validation cases (``cold_valid``) and on its cold test cases (``cold_test``, the quality
  bench's cold table), paired against zero-shot MiniLM on the same test cases (pooled over draws);
- the main split (leave-last-out, where few items are new): ``valid`` and ``test``, to show what
  the factor does where new items are rare.

Writes ``bench/results/exposure.json``: per factor and stage the mean NDCG@10 over seeds with its
95 % interval, the factor validation chooses per seed (the cold-start split's ``valid``), and the
share of shown slots that go to new items.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

FACTORS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.0)
K = 10


def _ranks(slates: list[Any], targets: np.ndarray, factor: float) -> np.ndarray:
    """0-based rank of each target in its ordered slate (the slate's length where it is absent)."""
    out = np.empty(len(slates), dtype=np.int64)
    for r, (slate, t) in enumerate(zip(slates, targets, strict=True)):
        order = slate.order(factor)
        hit = np.flatnonzero(order == t)
        out[r] = hit[0] if len(hit) else len(order)
    return out


def stage_ranks(rec: Any, split: Any, stage: str) -> dict[float, Any]:
    """Per factor: (ranks, share of new items shown) for one split's stage, one ranker pass."""
    from recstream.training.bundle import AsServed
    from recstream.training.new_items import new_item_share
    from recstream.training.ranker import ranked_slates, request_times

    cases = split.cases(stage)
    retrieval = AsServed(rec.bundle.retrieval, rec.cold_rule)
    times = request_times(split, cases.users, cases.histories)
    bundle = rec.bundle
    _, slates = ranked_slates(bundle.ranker, retrieval, rec.ctx, cases.histories, rec.depth, times, bundle.sequence)
    return {f: (_ranks(slates, cases.targets, f), new_item_share(slates, f)) for f in FACTORS}


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.common import cold_draws, load_dataset_arg, paired_over_splits, print_table, write_result
    from recstream.data import cold_start_split, leave_last_out
    from recstream.eval.baselines import ZeroShotText
    from recstream.eval.metrics import rank_cases
    from recstream.eval.stats import mean_ci95, ndcg_gains
    from recstream.training.bundle import served_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (the quality bench's cached bundles)")
    ap.add_argument(
        "--cold-seeds",
        default="",
        help="held-out item draw per training seed (default: the seeds, as bench-quality; one value: every seed)",
    )
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    draws = cold_draws(args.cold_seeds, seeds)
    t0 = time.perf_counter()

    data = load_dataset_arg(args.dataset)
    main_split = leave_last_out(data)
    colds = {d: cold_start_split(data, seed=d) for d in dict.fromkeys(draws)}
    stages = {"cold": ("valid", "cold_valid", "test"), "main": ("valid", "test")}
    label = {("cold", "valid"): "cold_valid_all", ("cold", "cold_valid"): "cold_valid", ("cold", "test"): "cold_test"}
    # per (split, stage, factor): one rank array per seed
    ranks: dict[str, dict[float, list[np.ndarray]]] = {}
    shares: dict[str, dict[float, list[float]]] = {}
    for seed, draw in zip(seeds, draws, strict=True):
        for name, split in (("cold", colds[draw]), ("main", main_split)):
            rec = served_model(seed).fit(split)
            for stage in stages[name]:
                key = label.get((name, stage), f"{name}_{stage}")
                for f, (r, share) in stage_ranks(rec, split, stage).items():
                    ranks.setdefault(key, {}).setdefault(f, []).append(r)
                    shares.setdefault(key, {}).setdefault(f, []).append(share)
            print(f"seed {seed} {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    zero_shot = {}
    for draw, cold in colds.items():
        test = cold.cases("test")
        zero_shot[draw] = rank_cases(ZeroShotText().fit(cold).score, test.users, test.histories, test.targets)

    table: dict[str, dict[str, Any]] = {}
    for key, by_factor in ranks.items():
        table[key] = {}
        for f, per_seed in by_factor.items():
            values = [float(ndcg_gains(r, K).mean()) for r in per_seed]
            mean, lo, hi = mean_ci95(values)
            table[key][str(f)] = {
                "NDCG@10": mean,
                "ci95": [lo, hi],
                "per_seed": values,
                "new_item_share_top10": float(np.mean(shares[key][f])),
            }
    # the factor a validation choice makes: best NDCG@10 on the cold-start split's validation cases
    # (all of them: a factor moves new items ahead of known ones, so the known ones' cost counts)
    chosen = [
        max(FACTORS, key=lambda f, i=i: (float(ndcg_gains(ranks["cold_valid_all"][f][i], K).mean()), f))
        for i in range(len(seeds))
    ]
    seeds_on = {d: [i for i, di in enumerate(draws) if di == d] for d in colds}
    vs_zero_shot = {
        str(f): paired_over_splits([([ranks["cold_test"][f][i] for i in seeds_on[d]], [zero_shot[d]]) for d in colds])
        for f in FACTORS
    }
    result = {
        "dataset": args.dataset,
        "seeds": seeds,
        "cold_seeds": draws,
        "factors": list(FACTORS),
        "served_default": 1.0,
        "chosen_on_validation": chosen,
        "ndcg10": table,
        "zero_shot_cold_test_ndcg10": float(np.mean([ndcg_gains(zero_shot[d], K).mean() for d in draws])),
        "cold_test_vs_zero_shot": vs_zero_shot,
        "stages": {
            "cold_valid_all": "cold-start split, every validation case (what a factor is chosen on)",
            "cold_valid": "cold-start split, validation cases whose target is a new item",
            "cold_test": "cold-start split, test cases whose target is a new item (the quality bench's cold table)",
            "main_valid": "leave-last-out split, validation",
            "main_test": "leave-last-out split, test",
        },
        "protocol": "the served pair of each seed (make train's code, the quality bench's cached bundles), scored "
        "as served (AsServed vectors, ranker over the top 50, new items placed by new_item_order); full ranking, "
        "seen items excluded, a target outside the 50 candidates is a miss",
        "total_s": round(time.perf_counter() - t0, 1),
    }
    rows = []
    for f in FACTORS:
        row: dict[str, Any] = {"factor": f}
        for key in ("cold_valid_all", "cold_valid", "cold_test", "main_valid", "main_test"):
            row[key] = table[key][str(f)]["NDCG@10"]
        row["new share (cold)"] = table["cold_valid_all"][str(f)]["new_item_share_top10"]
        row["cold_test - zero-shot"] = vs_zero_shot[str(f)]["diff"]
        rows.append(row)
    print_table(
        f"new-item exposure, seeds {seeds}: NDCG@10 by NEW_ITEM_SLOT_FACTOR (bench/results/exposure.json)",
        rows,
        list(rows[0]),
    )
    print("chosen on the cold-start split's validation, per seed:", chosen)
    write_result("exposure", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
