"""How a new item is served is chosen on cold-start validation cases only, and what is chosen is
what the served rows score with and what the export ships (recstream.training.cold_rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recstream.contracts.models import ITEM_ENCODER
from recstream.data.datasets import tiny_synthetic
from recstream.data.split import cold_start_split, leave_last_out
from recstream.eval.metrics import evaluate
from recstream.models.served import ColdItemRule, ItemEncoder
from recstream.training.bundle import (
    BundleRecommender,
    bundle_work_dir,
    choose_own_cold_rule,
    cold_rule_for,
    export_bundle,
    placement_for,
    train_bundle_on,
)
from recstream.training.cold_rule import COLD_RULE_GRID

DATA = tiny_synthetic(n_users=50, n_items=30)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cold_rule")


@pytest.fixture(scope="module")
def cold_row(work: Path) -> BundleRecommender:
    return BundleRecommender(work_root=work).fit(cold_start_split(DATA))


def test_the_rule_is_the_best_candidate_on_cold_validation(cold_row: BundleRecommender) -> None:
    choice = cold_row.bundle.cold_rule_choice
    cases = cold_row.split.cases("cold_valid")
    assert len(cases.targets) > 0 and choice.cold_valid_cases == len(cases.targets)
    assert [c.rule for c in choice.candidates] == list(COLD_RULE_GRID)
    values = [c.cold_valid_ndcg10 for c in choice.candidates]
    assert choice.rule == COLD_RULE_GRID[int(np.argmax(values))]  # argmax: the earliest of equals
    # the served row scores with the chosen rule: its cold-valid figure is the chosen candidate's
    assert cold_row.cold_rule == choice.rule
    assert evaluate(cold_row, cases)["NDCG@10"] == pytest.approx(max(values))


def test_the_rule_changes_what_a_new_item_is_served_as(cold_row: BundleRecommender) -> None:
    """Not a no-op: the bare text vector and a borrowed residual put a cold item in different places."""
    model = cold_row.bundle.retrieval
    cold_ids = [model.item_ids[i] for i in cold_row.split.cold_items]
    text = model.text_vectors.numpy()[cold_row.split.cold_items]
    borrowed = ItemEncoder.from_two_tower(model, ColdItemRule()).combine(text, cold_ids)
    bare = ItemEncoder.from_two_tower(model, ColdItemRule(neighbours=0)).combine(text, cold_ids)
    assert not np.allclose(borrowed, bare, atol=1e-3)


def test_the_export_ships_the_chosen_rule(cold_row: BundleRecommender, tmp_path: Path) -> None:
    written = export_bundle(cold_row.bundle, tmp_path)
    assert ItemEncoder.load(written[ITEM_ENCODER]).cold_rule == cold_row.bundle.cold_rule_choice.rule
    meta = json.loads((written[ITEM_ENCODER] / "meta.json").read_text())
    assert meta["extra"]["cold_rule_choice"]["reason"] == "best served NDCG@10 on cold_valid"
    assert len(meta["extra"]["cold_rule_choice"]["candidates"]) == len(COLD_RULE_GRID)


def test_models_trained_on_all_items_take_the_rule_of_the_same_datas_cold_split(
    cold_row: BundleRecommender, work: Path
) -> None:
    """`make train`'s path: the leave-last-out bundle has no cold validation cases of its own."""
    main = leave_last_out(DATA)
    own = choose_own_cold_rule(train_bundle_on(main, 0, bundle_work_dir(main, 0, work)))
    assert own.rule == COLD_RULE_GRID[0] and own.candidates == [] and "no cold-start validation" in own.reason
    # the cold split's bundle is the one already trained (same folder), so the choice is the same
    assert cold_rule_for(DATA, 0, work) == cold_row.bundle.cold_rule_choice
    row = BundleRecommender(work_root=work).fit(main)
    assert row.cold_rule == cold_row.bundle.cold_rule_choice.rule


def test_a_cold_start_split_places_new_items_as_its_data_sets_served_model(
    cold_row: BundleRecommender, work: Path
) -> None:
    """The cold table scores new items as the data set's served lists would place them: the choice
    made on the leave-last-out split's validation (recstream.training.new_items), not on the cold
    split's own validation, whose targets are all known items."""
    main = train_bundle_on(leave_last_out(DATA), 0, bundle_work_dir(leave_last_out(DATA), 0, work))
    assert cold_row.bundle.places_new_items is main.places_new_items is placement_for(DATA, 0, work)
    assert "placement_cost" in main.stats and "placement_cost" not in cold_row.bundle.stats
