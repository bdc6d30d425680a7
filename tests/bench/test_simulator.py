"""The user simulator: click probabilities from real data, position bias, and drift."""

from __future__ import annotations

import numpy as np
import pytest

from bench.simulator import SimConfig, Simulator
from recstream.data.datasets import tiny_synthetic
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES


@pytest.fixture(scope="module")
def sim() -> Simulator:
    data = tiny_synthetic(n_users=80, n_items=60, n_cats=4, seed=0)
    return Simulator(data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=10))


def test_request_shapes_and_probabilities(sim: Simulator) -> None:
    req = sim.request(0, np.random.default_rng(0))
    n = len(req.candidates)
    assert n == 30 and len(set(req.candidates.tolist())) == n
    assert req.context.shape == (CONTEXT_DIM,)
    assert req.cand_vectors.shape == (n, ITEM_DIM) and req.cand_features.shape == (n, N_CAND_FEATURES)
    assert not set(req.candidates.tolist()) & set(sim.history[0].tolist())  # seen items are not recommended
    p = sim.click_probability(0, req.candidates, np.zeros(n))
    assert np.all((p > 0) & (p < 1))


def test_retrieval_only_candidates_are_the_nearest_unseen_items() -> None:
    """n_random_candidates=0 (the stream worker's candidate generation): the candidates are the
    unseen released items nearest to the user's context, the same whatever the random generator."""
    data = tiny_synthetic(n_users=80, n_items=60, n_cats=4, seed=0)
    sim = Simulator(data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=0))
    a = sim.request(5, np.random.default_rng(1)).candidates
    b = sim.request(5, np.random.default_rng(2)).candidates
    assert sorted(a.tolist()) == sorted(b.tolist())
    sims = sim.item_vectors @ sim.user_context[5]
    eligible = np.setdiff1d(np.flatnonzero(sim.hot == 0), sim.history[5])
    nearest = eligible[np.argsort(-sims[eligible])[:30]]
    assert sorted(a.tolist()) == sorted(nearest.tolist())


def test_live_sessions_move_the_context_towards_clicks_and_hide_them() -> None:
    """A system's users' contexts follow what they clicked in its answers; clicked items are not
    recommended again, and without live sessions nothing changes."""
    from bench.simulator import LiveSessions

    data = tiny_synthetic(n_users=80, n_items=60, n_cats=4, seed=0)
    sim = Simulator(data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=0))
    before = sim.request(7, np.random.default_rng(0))
    far = before.candidates[np.argsort(before.cand_vectors @ sim.user_context[7])[:3]]  # the least similar
    sessions, off = LiveSessions(True), LiveSessions(False)
    for s in (sessions, off):
        s.add(7, far, np.array([1.0, 1.0, 0.0]))
    assert sessions.items(7).tolist() == far[:2].tolist() and off.items(7) is None and sessions.items(8) is None
    after = sim.request(7, np.random.default_rng(0), sessions.items(7))
    centre = sim.item_vectors[far[:2]].mean(0)
    assert float(after.context[:384] @ centre) > float(before.context[:384] @ centre)
    assert not set(far[:2].tolist()) & set(after.candidates.tolist())
    np.testing.assert_array_equal(sim.request(7, np.random.default_rng(0), off.items(7)).candidates, before.candidates)


def test_position_bias_lowers_clicks(sim: Simulator) -> None:
    items = np.arange(10)
    top = sim.click_probability(3, items, np.zeros(10))
    low = sim.click_probability(3, items, np.full(10, 5))
    np.testing.assert_allclose(low, top / 6.0)


def test_users_prefer_their_real_categories(sim: Simulator) -> None:
    """Relevance ranks a user's own most-watched category above the others on average."""
    wins = 0
    for u in range(sim.n_users):
        cats = sim.categories[sim.history[u]]
        fav = max(set(cats), key=list(cats).count)
        rel = sim.relevance(u, np.arange(sim.n_items))
        wins += rel[sim.categories == fav].mean() > rel[sim.categories != fav].mean()
    assert wins > 0.7 * sim.n_users


def test_drift_changes_preferences() -> None:
    data = tiny_synthetic(n_users=80, n_items=60, n_cats=4, seed=0)
    sim = Simulator(data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=10))
    before = np.stack([sim.relevance(u, np.arange(sim.n_items)) for u in range(sim.n_users)])
    sim.drift()
    after = np.stack([sim.relevance(u, np.arange(sim.n_items)) for u in range(sim.n_users)])
    # Per user, the item ordering by relevance changes a lot: low rank correlation on average.
    ranks = [(np.argsort(np.argsort(b)), np.argsort(np.argsort(a))) for b, a in zip(before, after, strict=True)]
    corr = [np.corrcoef(rb, ra)[0, 1] for rb, ra in ranks]
    assert np.mean(corr) < 0.5
    assert sim.drifted


def test_clicks_follow_probabilities(sim: Simulator) -> None:
    items = np.repeat(np.arange(5), 4000)
    pos = np.zeros(len(items))
    c = sim.clicks(1, items, pos).reshape(5, 4000).mean(1)
    np.testing.assert_allclose(c, sim.click_probability(1, np.arange(5), np.zeros(5)), atol=0.03)


def test_live_popularity_counts_clicks_per_system() -> None:
    """Clicks raise the clicked item's popularity feature in that system's view only; a fixed
    simulator leaves the catalogue's feature untouched."""
    from bench.simulator import LivePopularity

    data = tiny_synthetic(n_users=80, n_items=60, n_cats=4, seed=0)
    sim = Simulator(data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=10))
    req = sim.request(0, np.random.default_rng(0))
    shown, other = LivePopularity(sim), LivePopularity(sim)
    np.testing.assert_allclose(shown.view(req).cand_features, req.cand_features, atol=1e-6)
    low = int(np.argmin(req.cand_features[:, 1]))
    item = req.candidates[low]
    shown.add(np.array([item, item]), np.array([1.0, 1.0]))
    shown.add(np.array([item]), np.array([0.0]))  # an impression without a click does not count
    assert shown.counts[item] == sim.feature_counts[item] + 2
    after = shown.view(req).cand_features
    assert after[low, 1] > req.cand_features[low, 1]
    np.testing.assert_allclose(np.delete(after, 1, axis=1), np.delete(req.cand_features, 1, axis=1))
    np.testing.assert_allclose(other.view(req).cand_features, req.cand_features, atol=1e-6)

    fixed = Simulator(
        data.interactions, data.items, SimConfig(n_candidates=30, n_random_candidates=10, live_popularity=False)
    )
    frozen = LivePopularity(fixed)
    frozen.add(np.array([item]), np.array([1.0]))
    assert frozen.view(req) is req and frozen.counts[item] == fixed.feature_counts[item]
