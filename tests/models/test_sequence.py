"""The sequence model as a candidate source (recstream.models.sequence and sequence_fusion): what it
saves loads back and scores alike, items it has no training data for have no score, its candidates
exclude what the list holds, and the fused order is the ranker's when its weight is 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recstream.models.sequence import SASRecNet, SequenceNetConfig, SequenceScorer
from recstream.models.sequence_fusion import (
    SequenceFusion,
    fused_scores,
    left_pad,
    sequence_candidates,
    standardised,
)
from recstream.models.training import CheckpointMeta

N_ITEMS = 40


def _scorer(trained: np.ndarray | None = None) -> SequenceScorer:
    torch.manual_seed(0)
    net = SASRecNet(N_ITEMS, SequenceNetConfig(dim=16, layers=1, heads=2, max_len=8))
    flags = np.ones(N_ITEMS, bool) if trained is None else trained
    return SequenceScorer(net, [f"i{n}" for n in range(N_ITEMS)], flags, SequenceFusion(candidates=5, weight=1.0))


def test_a_saved_scorer_loads_back_and_scores_alike(tmp_path: Path) -> None:
    trained = np.ones(N_ITEMS, bool)
    trained[[3, 7]] = False
    scorer = _scorer(trained)
    histories = [np.array([1, 2, 5]), np.array([9]), np.arange(20)]  # the last is cut to max_len
    before = scorer.score_index(histories)
    scorer.save(tmp_path / "v", CheckpointMeta(kind="sequence", config={}, data_hash="h"))
    loaded = SequenceScorer.load(tmp_path / "v")
    np.testing.assert_allclose(loaded.score_index(histories), before, atol=1e-6)
    assert loaded.fusion == scorer.fusion and loaded.item_ids == scorer.item_ids
    # items without training data have no score, the others do
    assert np.isnan(before[:, [3, 7]]).all() and np.isfinite(np.delete(before, [3, 7], axis=1)).all()
    # the newest max_len items decide: older ones change nothing
    np.testing.assert_allclose(scorer.score_index([np.arange(20)[-8:]])[0], before[2], atol=1e-6)
    # the order of the history matters (a sequence model, not a bag)
    assert not np.allclose(scorer.score_index([np.array([5, 2, 1])])[0], before[0], atol=1e-4, equal_nan=True)


def test_an_empty_history_has_no_scores() -> None:
    out = _scorer().score_padded(left_pad([np.array([], dtype=np.int64), np.array([4])], 8))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_candidates_are_the_best_outside_the_list_and_never_unscored() -> None:
    scores = np.arange(10, dtype=np.float32)
    scores[8] = np.nan
    got = sequence_candidates(scores, np.array([9, 6]), 3)
    assert got.tolist() == [7, 5, 4]
    assert sequence_candidates(scores, np.array([], dtype=np.int64), 0).size == 0
    # fewer scored items than asked: all of them, none twice
    assert sorted(sequence_candidates(scores, np.arange(7), 5).tolist()) == [7, 9]


finite = arrays(np.float64, st.integers(2, 30), elements=st.floats(-50, 50))


@settings(max_examples=60, deadline=None)
@given(finite, st.floats(0.1, 10), st.floats(-5, 5))
def test_the_fused_order_ignores_the_scales(ranker: np.ndarray, scale: float, shift: float) -> None:
    rng = np.random.default_rng(len(ranker))
    seq = rng.normal(size=len(ranker))
    a = fused_scores(ranker, seq, 1.5)
    b = fused_scores(ranker * scale + shift, seq * scale - shift, 1.5)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # weight 0 is the ranker's own order, and an item without a score counts as average
    np.testing.assert_array_equal(fused_scores(ranker, seq, 0.0), ranker)
    seq[0] = np.nan
    assert standardised(seq)[0] == 0.0


def test_the_sequence_model_is_served_only_for_a_gain_beyond_the_noise() -> None:
    """`make train` keeps the ranker alone unless the best fusion beats it on validation by more than
    one standard error of the paired per-case difference (the model costs a call per request)."""
    from recstream.training.sequence import worth_serving

    alone = np.random.default_rng(0).random(900)
    serve, gain, se = worth_serving(alone + 0.05, alone)
    assert serve and gain == pytest.approx(0.05) and se == pytest.approx(0.0, abs=1e-12)
    swings = np.where(np.arange(900) % 2 == 0, 0.3, -0.3)  # a mean gain of 0.001, SE 0.01
    serve, gain, se = worth_serving(alone + swings + 0.001, alone)
    assert not serve and gain == pytest.approx(0.001) and se == pytest.approx(0.01, rel=0.01)
    assert worth_serving(alone + swings + 0.02, alone)[0]  # two standard errors
    assert worth_serving(alone + swings + 0.001, alone, min_se=0.05)[0]  # a looser rule would serve it
    assert not worth_serving(alone, alone)[0] and not worth_serving(alone - 0.01, alone)[0]
