"""Every baseline beats random on the tiny synthetic set; popularity ranks the most popular first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recstream.data import Split, leave_last_out, tiny_synthetic
from recstream.eval.baselines import (
    BPRMF,
    BPRConfig,
    ItemKNN,
    Popularity,
    RandomScorer,
    Recommender,
    SASRecConfig,
    SASRecID,
    SASRecText,
    ZeroShotText,
)
from recstream.eval.metrics import evaluate


class CategoryEncoder:
    """Stand-in text encoder: one-hot of the category word after '|', plus a little noise."""

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        cats = sorted({t.split("|")[-1].strip() for t in texts})
        rng = np.random.default_rng(0)
        out = np.zeros((len(texts), len(cats) + 4), dtype=np.float32)
        for r, t in enumerate(texts):
            out[r, cats.index(t.split("|")[-1].strip())] = 1.0
        out += 0.05 * rng.standard_normal(out.shape).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def split() -> Split:
    torch.set_num_threads(1)
    return leave_last_out(tiny_synthetic(n_users=80, n_items=40, seed=0))


def _mrr(model: Recommender, split: Split) -> float:
    return evaluate(model.fit(split), split.cases("test"))["MRR"]


@pytest.fixture(scope="module")
def random_mrr(split: Split) -> float:
    return float(np.mean([_mrr(RandomScorer(seed=s), split) for s in range(5)]))


@pytest.mark.parametrize(
    "factory",
    [
        Popularity,
        ItemKNN,
        lambda: BPRMF(BPRConfig(max_epochs=15, batch_size=128, lr=1e-2, patience=3)),
        lambda: SASRecID(SASRecConfig(max_epochs=20, eval_every=5, max_len=20, dropout=0.1, lr=5e-3)),
        lambda: SASRecText(
            SASRecConfig(max_epochs=20, eval_every=5, max_len=20, dropout=0.1, lr=5e-3), encoder=CategoryEncoder()
        ),
        lambda: ZeroShotText(encoder=CategoryEncoder()),
    ],
    ids=["popularity", "item-knn", "bpr-mf", "sasrec-id", "sasrec-text", "zero-shot"],
)
def test_beats_random(factory, split: Split, random_mrr: float) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    assert isinstance(model, Recommender)
    mrr = _mrr(model, split)
    assert mrr > 1.3 * random_mrr, f"MRR {mrr:.3f} vs random {random_mrr:.3f}"


def test_popularity_ranks_most_popular_first(split: Split) -> None:
    model = Popularity().fit(split)
    counts = np.bincount(split.train["item_idx"], minlength=split.n_items)
    scores = model.score(np.array([0, 1]), [np.array([], dtype=np.int64)] * 2)
    assert scores.shape == (2, split.n_items)
    assert np.argmax(scores[0]) == np.argmax(counts)
    assert np.array_equal(np.argsort(-scores[1], kind="stable"), np.argsort(-counts, kind="stable"))


def test_scores_shape_and_empty_history(split: Split) -> None:
    for model in (ItemKNN(), SASRecID(SASRecConfig(max_epochs=1)), ZeroShotText(encoder=CategoryEncoder())):
        model.fit(split)
        s = model.score(np.array([0, 1]), [np.array([], dtype=np.int64), split.train_seqs[1]])
        assert s.shape == (2, split.n_items) and np.isfinite(s).all()


def test_bpr_records_early_stopping(split: Split) -> None:
    model = BPRMF(BPRConfig(max_epochs=4, batch_size=128)).fit(split)
    assert 1 <= model.info["best_epoch"] <= model.info["epochs_run"] <= 4


def test_seed_changes_a_learned_baseline(split: Split) -> None:
    """The bench's seeds must reach the model: two seeds, two different fits; one seed, one fit."""
    cfg = SASRecConfig(max_epochs=2, max_len=20)
    scores = [SASRecID(cfg, seed=s).fit(split).score(np.array([0]), [split.train_seqs[0]])[0] for s in (0, 1, 0)]
    assert not np.allclose(scores[0], scores[1])
    np.testing.assert_allclose(scores[0], scores[2], rtol=1e-5)


def test_sasrec_text_scores_untrained_items_by_text(split: Split) -> None:
    """An item without training data gets no random ID vector: its score is its text part alone."""
    model = SASRecText(SASRecConfig(max_epochs=1, max_len=20), encoder=CategoryEncoder()).fit(split)
    seen = np.zeros(split.n_items + 1, dtype=bool)
    seen[split.train["item_idx"].to_numpy() + 1] = True
    assert np.all(model.net.item.weight.detach().numpy()[~seen] == 0.0)


def test_bench_quality_smoke(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The bench runs end to end on tiny data: seeds, intervals, the paired block chosen by validation,
    per-user ranks, the run cache, extra rows and a skipped broken optional one."""
    import json

    import bench.common
    from bench import bench_quality

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_quality, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_quality, "CACHE_DIR", tmp_path / "runs")
    monkeypatch.setattr(bench_quality, "MODELS", list(bench_quality.MODELS))
    monkeypatch.setenv("EXTRA_MODELS", "broken=recstream.no_such_module:Model")
    bench_quality.register("bpr-small", _small_bpr, kind="ours")
    argv = ["--dataset", "tiny-synthetic", "--models", "popularity,item-knn,bpr-small,broken", "--seeds", "0,1"]
    result = bench_quality.main([*argv, "--cold-frac", "0.2"])
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["dataset"] == result["dataset"] == "tiny-synthetic"
    assert [r["model"] for r in saved["rows"]] == ["popularity", "item-knn", "bpr-small", "broken"]
    pop, _, bpr, broken = saved["rows"]
    assert {"HR@10", "NDCG@10", "MRR", "Recall@50", "train_s", "peak_rss_mb", "ci95", "seeds"} <= set(pop)
    assert "skipped" in broken
    assert pop["seeds"] == [0] and pop["deterministic"] and pop["ci95"]["NDCG@10"] == [pop["NDCG@10"]] * 2
    assert bpr["seeds"] == [0, 1] and bpr["NDCG@10"] == pytest.approx(np.mean(bpr["per_seed"]["NDCG@10"]))
    lo, hi = bpr["ci95"]["NDCG@10"]
    assert lo <= bpr["NDCG@10"] <= hi
    paired = saved["paired_vs_best_baseline"]
    best_base = max(saved["rows"][:2], key=lambda r: r["valid_NDCG@10"])["model"]
    assert paired["model"] == "bpr-small" and paired["baseline"] == best_base
    assert paired["diff"] == pytest.approx(
        bpr["NDCG@10"] - next(r for r in saved["rows"] if r["model"] == best_base)["NDCG@10"]
    )
    assert len(paired["ci95"]) == 2 and 0 <= paired["seeds_won"] <= 2
    assert len(saved["cold_start_rows"]) == 4 and "cold_valid_NDCG@10" in saved["cold_start_rows"][0]
    # the cold-start table draws its held-out items once per training seed: seed s is scored on draw s
    cold = saved["cold_start"]
    assert cold["draws"] == [0, 1] and len(cold["per_draw"]) == 2
    assert cold["cold_test_cases"] == sum(d["cold_test_cases"] for d in cold["per_draw"])
    cold_pop, _, cold_bpr, _ = saved["cold_start_rows"]
    assert cold_pop["cold_seeds"] == [0, 1] and cold_bpr["cold_seeds"] == [0, 1] == cold_bpr["seeds"]
    assert cold_pop["n_cases"] == cold_bpr["n_cases"] == cold["cold_test_cases"]
    cold_ranks = json.loads((tmp_path / "quality_ranks.json").read_text())["cold_start"]["draws"]
    assert set(cold_ranks) == {"0", "1"} and set(cold_ranks["1"]["ranks"]["bpr-small"]) == {"1"}
    ranks = json.loads((tmp_path / "quality_ranks.json").read_text())["leave_last_out"]
    assert set(ranks["ranks"]["bpr-small"]) == {"0", "1"}
    assert len(ranks["ranks"]["bpr-small"]["0"]) == len(ranks["users"]) == bpr["n_cases"]
    assert not any(str(tmp_path) in line for line in (tmp_path / "quality.json").read_text().splitlines())
    again = bench_quality.main([*argv, "--splits", "main"])
    assert [r["cached_runs"] for r in again["rows"][:3]] == [1, 1, 2]
    assert again["rows"][2]["NDCG@10"] == bpr["NDCG@10"]


def _small_bpr(seed: int = 0) -> BPRMF:
    return BPRMF(BPRConfig(max_epochs=3, batch_size=128), seed=seed)


def test_paired_block_pools_cold_start_draws() -> None:
    """Runs on different splits (cold-start draws) are paired within their split, and the interval
    covers every (split, case); one split gives exactly the plain paired difference."""
    from bench.bench_quality import paired_block
    from recstream.eval.stats import ndcg_gains, paired_difference

    def run(seed: int, split: str, ranks: list[int]) -> dict:  # type: ignore[type-arg]
        return {"seed": seed, "split": split, "draw": seed, "ranks": {"test": ranks}}

    ours = [run(0, "a", [0, 3, 20]), run(1, "b", [1, 0])]
    base = [run(0, "a", [2, 3, 0]), run(1, "b", [5, 40])]
    block = paired_block([], {"ours": ours, "base": base}, "ours", "base")
    per_case = np.concatenate(
        [
            ndcg_gains(np.array(o["ranks"]["test"])) - ndcg_gains(np.array(b["ranks"]["test"]))
            for o, b in zip(ours, base, strict=True)
        ]
    )
    assert block["n_cases"] == 5 and block["diff"] == pytest.approx(per_case.mean())
    assert block["seeds_compared"] == 2 and block["seeds_won"] == 1
    assert [d["draw"] for d in block["per_draw"]] == [0, 1]
    lo, hi = block["ci95"]
    assert lo < block["diff"] < hi
    one = paired_block([], {"ours": ours[:1], "base": base[:1]}, "ours", "base")
    plain = paired_difference([np.array(ours[0]["ranks"]["test"])], [np.array(base[0]["ranks"]["test"])])
    assert one["diff"] == pytest.approx(plain["diff"]) and "per_draw" not in one


def test_cold_draws_give_each_training_seed_its_held_out_items() -> None:
    from bench.common import cold_draws

    assert cold_draws("", [0, 1, 2]) == [0, 1, 2]  # seed s on draw s
    assert cold_draws("0", [0, 1, 2]) == [0, 0, 0]  # the one-draw protocol
    assert cold_draws("5,6", [0, 1]) == [5, 6]
    with pytest.raises(SystemExit, match="one per training seed"):
        cold_draws("1,2", [0, 1, 2])
