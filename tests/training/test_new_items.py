"""Whether a data set's lists place the items nobody has interacted with by retrieval: the rule
(recstream.training.new_items), its use in `make train`'s bundle and the quality bench's rows, what
the export ships and what the worker reads back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from recstream.data.datasets import InteractionData, tiny_synthetic
from recstream.data.split import leave_last_out
from recstream.models.ranker import PLACES_NEW_ITEMS, places_new_items
from recstream.models.training import CheckpointMeta
from recstream.training.new_items import MIN_COST_SHARE, new_item_share, placement_decision
from recstream.training.ranker import RankedSlate
from streams.rankers import InProcessRanker
from streams.recommend_ranking import new_item_factor


def _cases(n: int, hit: float, rng: np.random.Generator) -> np.ndarray:
    """Per-case NDCG@10 gains: a hit at rank 0-9 with probability `hit`, else 0."""
    ranks = rng.integers(0, 10, n)
    return np.where(rng.random(n) < hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def test_a_material_cost_turns_the_placement_off() -> None:
    """A sparse catalogue's case: new items push the target down in one list of ten."""
    rng = np.random.default_rng(0)
    ranked = _cases(2000, 0.2, rng)
    placed = ranked.copy()
    pushed = rng.random(len(placed)) < 0.1
    placed[pushed] *= 0.6
    places, figures = placement_decision(placed, ranked)
    assert not places
    assert figures["placement_cost"] >= MIN_COST_SHARE * figures["placed_valid_ndcg10"]
    assert figures["placement_cost"] >= figures["placement_cost_se"]


def test_a_consistent_but_tiny_cost_keeps_the_placement() -> None:
    """ML-100k's case: the few lists a new item reaches lose a little, every time (so the paired
    standard error is tiny too): the placement is what shows new items, and it stays."""
    rng = np.random.default_rng(1)
    ranked = _cases(943, 0.2, rng)
    placed = ranked.copy()
    few = np.flatnonzero(ranked > 0.4)[:3]
    placed[few] -= 0.05
    places, figures = placement_decision(placed, ranked)
    assert places
    assert 0 < figures["placement_cost"] < MIN_COST_SHARE * figures["placed_valid_ndcg10"]


def test_no_difference_keeps_the_placement() -> None:
    gains = _cases(500, 0.3, np.random.default_rng(2))
    assert placement_decision(gains, gains.copy())[0]


def test_a_slate_without_placement_is_the_ranker_order() -> None:
    slate = RankedSlate(
        candidates=np.array([10, 11, 12, 13]),
        ranker_scores=np.array([0.1, 0.9, 0.5, 0.7]),
        is_new=np.array([True, False, False, False]),
    )
    assert slate.order(None).tolist() == [11, 13, 12, 10]
    assert slate.order(1.0).tolist() == [10, 11, 13, 12]  # the new item keeps its retrieval slot 0
    assert new_item_share([slate], 1.0, k=2) == 0.5 and new_item_share([slate], None, k=2) == 0.0


def test_the_worker_takes_the_operators_factor_else_the_versions_choice() -> None:
    class Version:
        places_new_items = False

    assert new_item_factor(0.5, Version()) == 0.5
    assert new_item_factor(None, Version()) is None
    assert new_item_factor(None, InProcessRanker()) == 1.0  # the heuristic ranker: placed


@pytest.mark.parametrize("extra, expected", [({}, True), ({PLACES_NEW_ITEMS: False}, False)])
def test_a_version_without_the_key_places_new_items(extra: dict, expected: bool) -> None:
    meta = CheckpointMeta(kind="ranker", config={}, data_hash="d", extra=extra)
    assert places_new_items(meta) is expected
    assert places_new_items(None)


@pytest.fixture(scope="module")
def long_tail(tmp_path_factory: pytest.TempPathFactory):
    """A catalogue with items nobody has interacted with: twins of the known items' texts, so the
    vector search brings them into the lists."""
    from recstream.training.bundle import train_bundle_on

    data = tiny_synthetic(n_users=40, n_items=30)
    twins = data.items.head(12).assign(item_id=lambda d: "twin-" + d["item_id"])
    data = InteractionData(data.interactions, pd.concat([data.items, twins], ignore_index=True), name="long-tail")
    split = leave_last_out(data)
    return train_bundle_on(split, 0, tmp_path_factory.mktemp("long_tail"))


def test_offline_scoring_places_new_items_as_the_bundle_chose(long_tail) -> None:
    """With the placement the never-interacted twins hold their retrieval slots; without it the
    ranker orders them like the rest, and the quality bench's row scores each bundle its own way."""
    from recstream.models.ranker import RankingContext
    from recstream.training.bundle import AsServed, BundleRecommender, item_categories
    from recstream.training.ranker import listed_scores, ranked_slates, request_times, split_events

    split = long_tail.split
    cases = split.cases("valid")
    ctx = RankingContext(item_categories(split), split.train_seqs, split.n_items, split_events(split))
    times = request_times(split, cases.users, cases.histories)
    depth = int(long_tail.ranker.meta.config["rerank_depth"])
    retrieval = AsServed(long_tail.retrieval)
    scores, slates = ranked_slates(long_tail.ranker, retrieval, ctx, cases.histories, depth, times, long_tail.sequence)
    assert new_item_share(slates) > 0  # the twins reach the lists
    placed, ranked = listed_scores(scores, slates, 1.0), listed_scores(scores, slates, None)
    assert not np.array_equal(placed, ranked)
    for places, expected in ((True, placed), (False, ranked)):
        bundle = dataclasses.replace(long_tail, places_new_items=places)
        got = BundleRecommender().attach(bundle).score(cases.users, cases.histories)
        np.testing.assert_array_equal(got, expected)
    # the share the choice reports is of the ranker's own lists (before the sequence model joins them)
    _, alone = ranked_slates(long_tail.ranker, retrieval, ctx, cases.histories, depth, times)
    assert long_tail.stats["new_item_share_top10"] == pytest.approx(new_item_share(alone), abs=1e-4)
