"""Exploration policies: propensities are exact probabilities (closed form and by Monte Carlo)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from recstream.explore import (
    EpsilonGreedy,
    Greedy,
    LiftThompson,
    PlackettLuce,
    ThompsonArms,
    greedy_order,
    make_policy,
)

IDS = [f"i{n}" for n in range(6)]
SCORES = np.array([2.0, 1.5, 0.3, -0.2, 0.9, 0.0])


def test_greedy_is_top_k_with_propensity_one() -> None:
    shown = Greedy().rank(IDS, SCORES, 3, np.random.default_rng(0))
    assert [s.item_id for s in shown] == ["i0", "i1", "i4"]
    assert [s.position for s in shown] == [0, 1, 2]
    assert all(s.propensity == 1.0 for s in shown)


def test_pl_slot0_probabilities_sum_to_one_and_match_monte_carlo() -> None:
    pol = PlackettLuce(temperature=0.7)
    p0 = pol.slot0_probabilities(SCORES)
    assert p0.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    n = 20000
    counts = Counter()
    reported: dict[str, float] = {}
    for _ in range(n):
        first = pol.rank(IDS, SCORES, 3, rng)[0]
        counts[first.item_id] += 1
        reported[first.item_id] = first.propensity
    for idx, item in enumerate(IDS):
        assert counts[item] / n == pytest.approx(p0[idx], abs=4 * np.sqrt(p0[idx] * (1 - p0[idx]) / n) + 1e-3)
        if item in reported:
            assert reported[item] == pytest.approx(p0[idx])


def test_pl_conditional_propensity_of_slot1_matches_monte_carlo() -> None:
    pol = PlackettLuce(temperature=1.0)
    rng = np.random.default_rng(2)
    n = 20000
    given_first = [s for s in (pol.rank(IDS, SCORES, 2, rng) for _ in range(n)) if s[0].item_id == "i0"]
    counts = Counter(s[1].item_id for s in given_first)
    w = np.exp(SCORES)
    w[0] = 0
    cond = w / w.sum()
    for idx, item in enumerate(IDS[1:], start=1):
        freq = counts[item] / len(given_first)
        assert freq == pytest.approx(cond[idx], abs=4 * np.sqrt(cond[idx] / len(given_first)) + 1e-3)
    props = {s[1].item_id: s[1].propensity for s in given_first}
    for item, p in props.items():
        assert p == pytest.approx(cond[IDS.index(item)])


def test_pl_marginals_rows_and_columns() -> None:
    pol = PlackettLuce(0.5)
    m = pol.marginals(SCORES, 3, np.random.default_rng(3), n_samples=20000)
    np.testing.assert_allclose(m.sum(axis=0), 1.0, atol=1e-9)  # every slot holds exactly one item
    assert np.all(m.sum(axis=1) <= 1.0 + 1e-9)  # an item is shown at most once
    np.testing.assert_allclose(m[:, 0], pol.slot0_probabilities(SCORES))


def test_gumbel_sampler_has_the_same_law_as_rank() -> None:
    pol = PlackettLuce(0.8)
    orders = pol.sample_orders(SCORES, 2, 40000, np.random.default_rng(4))
    freq = np.bincount(orders[:, 0], minlength=len(SCORES)) / len(orders)
    np.testing.assert_allclose(freq, pol.slot0_probabilities(SCORES), atol=0.01)


def test_epsilon_greedy_propensities_are_exact_marginals() -> None:
    pol = EpsilonGreedy(epsilon=0.3, explore_slots=2)
    m = pol.marginals(SCORES, 3)
    np.testing.assert_allclose(m.sum(axis=0), 1.0)
    rng = np.random.default_rng(5)
    n = 30000
    freq = np.zeros_like(m)
    for _ in range(n):
        for s in pol.rank(IDS, SCORES, 3, rng):
            idx = IDS.index(s.item_id)
            freq[idx, s.position] += 1
            assert s.propensity == pytest.approx(m[idx, s.position])
    np.testing.assert_allclose(freq / n, m, atol=0.012)


def test_make_policy_specs_and_names() -> None:
    assert make_policy("greedy").name == "greedy"
    assert make_policy("pl:0.5").name == "pl_t0.5"
    assert make_policy("pl:0.5:2").name == "pl_t0.5_g2"
    assert make_policy("eps:0.1:2").name == "eps0.1_s2"
    with pytest.raises(ValueError):
        make_policy("nope")
    with pytest.raises(ValueError):
        Greedy().rank(IDS, SCORES[:3], 2, np.random.default_rng(0))


def test_thompson_moves_traffic_to_the_better_arm() -> None:
    arms = ThompsonArms([Greedy(), PlackettLuce(1.0)])
    rng = np.random.default_rng(6)
    ctr = {"greedy": 0.05, "pl_t1": 0.15}
    picks = Counter()
    for t in range(3000):
        arm = arms.choose(rng)
        picks[arm.name] += 1 if t > 1500 else 0
        arms.update(arm.name, float(rng.random() < ctr[arm.name]), 1.0)
    assert picks["pl_t1"] > 0.8 * sum(picks.values())


def test_pl_with_greedy_head_keeps_top_slots_and_samples_the_rest_exactly() -> None:
    pol = PlackettLuce(temperature=1.0, greedy_slots=2)
    assert pol.name == "pl_t1_g2"
    rng = np.random.default_rng(7)
    n = 20000
    counts = Counter()
    for _ in range(n):
        shown = pol.rank(IDS, SCORES, 4, rng)
        assert [s.item_id for s in shown[:2]] == ["i0", "i1"] and shown[0].propensity == 1.0
        counts[shown[2].item_id] += 1
        p2 = pol.first_sampled_slot_probabilities(SCORES)
        assert shown[2].propensity == pytest.approx(p2[IDS.index(shown[2].item_id)])
    p2 = pol.first_sampled_slot_probabilities(SCORES)
    assert p2[:2].sum() == 0 and p2.sum() == pytest.approx(1.0)
    for idx, item in enumerate(IDS[2:], start=2):
        assert counts[item] / n == pytest.approx(p2[idx], abs=0.012)
    m = pol.marginals(SCORES, 4, np.random.default_rng(8), n_samples=5000)
    np.testing.assert_allclose(m.sum(axis=0), 1.0)
    np.testing.assert_allclose(m[:, 2], p2)


def test_lift_thompson_propensities_are_the_marginals_of_its_rankings() -> None:
    pol = LiftThompson(prior=2.0, mc_samples=2000)
    rng = np.random.default_rng(9)
    for _ in range(300):  # some evidence, so posteriors differ per item
        for j, item in enumerate(IDS[:4]):
            pol.observe(item, j, SCORES[IDS.index(item)], float(rng.random() < 0.3), group="g")
    m = pol.marginals(SCORES, 3, np.random.default_rng(10), n_samples=20000, item_ids=IDS)
    np.testing.assert_allclose(m.sum(axis=0), 1.0)
    assert np.all(m.sum(axis=1) <= 1.0 + 1e-9)
    n = 4000
    freq = np.zeros_like(m)
    for _ in range(n):
        for s in pol.rank(IDS, SCORES, 3, rng):
            idx = IDS.index(s.item_id)
            freq[idx, s.position] += 1
            # the logged propensity is a Monte-Carlo estimate (2000 draws) of the same marginal
            p = m[idx, s.position]
            assert s.propensity == pytest.approx(max(p, 1 / 2000), abs=5.5 * np.sqrt(p * (1 - p) / 2000) + 1e-3)
    np.testing.assert_allclose(freq / n, m, atol=0.025)


def test_lift_thompson_learns_an_item_the_ranker_underrates() -> None:
    """The ranker overrates everything 2x, except i5 (low score) which users click ~2x more than
    predicted: the policy learns both lifts and moves i5 to the top."""
    pol = make_policy("ts:2:5000")
    assert isinstance(pol, LiftThompson) and pol.name == "ts_lift_p2_h5000"
    rng = np.random.default_rng(11)
    base = 1 / (1 + np.exp(-SCORES))
    true_rel = np.where(np.arange(6) == 5, 0.95, 0.5 * base)
    top_before = pol.marginals(SCORES, 1, rng, item_ids=IDS)[5, 0]
    shown_top = 0
    for t in range(3000):
        shown = pol.rank(IDS, SCORES, 3, rng)
        for s in shown:
            i = IDS.index(s.item_id)
            click = rng.random() < true_rel[i] / (1 + s.position)
            pol.observe(s.item_id, s.position, SCORES[i], float(click))
        shown_top += t >= 2000 and shown[0].item_id == "i5"
    assert pol.lift_mean(["i5"])[0] > 1.5
    assert pol.lift_mean(["i0"])[0] == pytest.approx(0.5, abs=0.15)
    top_after = pol.marginals(SCORES, 1, rng, item_ids=IDS)[5, 0]
    assert top_after > 0.8 > top_before and shown_top > 800


def test_lift_thompson_evidence_decays_and_groups_set_the_prior() -> None:
    pol = LiftThompson(prior=1.0, half_life=100.0, group_prior=1.0)
    for _ in range(50):
        pol.observe("a", 0, 0.0, 1.0, group="hot")  # expected 0.5 per impression, clicked every time
    a0, b0 = pol.posterior(["a"], ["hot"])
    own0 = a0[0] - pol.prior * pol.group_lift_mean(["hot"])[0]  # item a's own (decayed) clicks
    for _ in range(100):
        pol.observe("b", 0, 0.0, 0.0, group="cold")
    a1, b1 = pol.posterior(["a"], ["hot"])
    # one half-life later item a's own evidence counts half (the group's, its prior mean, decays too)
    assert a1[0] - pol.prior * pol.group_lift_mean(["hot"])[0] == pytest.approx(0.5 * own0, rel=1e-6)
    assert b1[0] - pol.prior == pytest.approx(0.5 * (b0[0] - pol.prior), rel=1e-6)
    # an unseen item borrows its group's lift as prior mean
    assert pol.lift_mean(["new"], ["hot"])[0] > 1.5 > 1.0 > pol.lift_mean(["new2"], ["cold"])[0]
    assert pol.lift_mean(["new3"])[0] == 1.0


def test_lift_thompson_as_the_recommender_calls_it() -> None:
    """A fresh worker's policy (no groups, no feedback yet) over a diversified pool: k distinct
    items, each with a propensity in (0, 1]."""
    pol = make_policy("ts:5:20000:20")
    assert pol.name == "ts_lift_p5_h20000"
    ids = [f"m{n}" for n in range(20)]
    shown = pol.rank(ids, -np.arange(20, dtype=np.float64), 10, np.random.default_rng(12))
    assert [s.position for s in shown] == list(range(10)) and len({s.item_id for s in shown}) == 10
    assert all(0 < s.propensity <= 1 for s in shown)


def test_lift_posterior_mean_ablation_is_deterministic_with_propensity_one() -> None:
    pol = LiftThompson(prior=2.0, sample=False)
    assert pol.name == "mean_lift_p2_h20000"
    pol.observe("i4", 0, SCORES[4], 1.0)  # i4 earned a click at the top: its mean lift rises above 1
    first = pol.rank(IDS, SCORES, 3, np.random.default_rng(13))
    assert all(s.propensity == 1.0 for s in first)
    assert [s.item_id for s in pol.rank(IDS, SCORES, 3, np.random.default_rng(14))] == [s.item_id for s in first]
    m = pol.marginals(SCORES, 3, item_ids=IDS)
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() == 3


# --- the feedback loop of an online-learning policy in a stream worker ----------------------------


def test_policy_feedback_hands_closed_windows_back_to_the_policy() -> None:
    """What the recommender (rank) and the feedback joiner (observe) do: users click i4 (third by
    score) whenever it is shown and never the two above it; the mean-lift policy moves it first."""
    from recstream.explore.feedback import PolicyFeedback

    fb = PolicyFeedback(make_policy("lift:1"))
    rng = np.random.default_rng(21)
    before = [s.item_id for s in fb.rank("r0", IDS, SCORES, 3, rng)]
    assert before == ["i0", "i1", "i4"] and len(fb) == 3  # mean lift 1 everywhere: the ranker's order
    assert fb.observe("r0", "i0", 0, 0.0) and not fb.observe("r0", "i0", 0, 0.0)  # each slot once
    assert not fb.observe("never-shown", "i1", 0, 1.0)
    top: list[str] = []
    for t in range(30):
        shown = fb.rank(f"q{t}", IDS, SCORES, 3, rng)
        top.append(shown[0].item_id)
        for s in shown:
            fb.observe(f"q{t}", s.item_id, s.position, float(s.item_id == "i4"))
    assert top[0] != "i4" and top[-5:] == ["i4"] * 5, top
    assert fb.policy.lift_mean(["i4"])[0] > 1.0 > fb.policy.lift_mean(["i0"])[0]
    assert len(fb) == 2  # all reported back but the two r0 slots never observed


def test_policy_feedback_memory_is_bounded_and_refuses_fixed_policies() -> None:
    from recstream.explore.feedback import PolicyFeedback

    fb = PolicyFeedback(make_policy("ts:2"), capacity=4)
    rng = np.random.default_rng(22)
    fb.rank("a", IDS, SCORES, 3, rng)
    fb.rank("b", IDS, SCORES, 3, rng)
    assert len(fb) == 4  # the oldest request's slots went first
    assert sum(fb.observe("a", i, 0, 0.0) for i in IDS) == 1
    with pytest.raises(TypeError, match="does not learn"):
        PolicyFeedback(make_policy("pl:0.5"))


def test_policy_feedback_forgets_slots_no_window_can_close_for() -> None:
    """Slots older than max_age_s (answers whose impressions never came) are dropped when the next
    answer is ranked and counted as expired; younger ones are still observed."""
    from prometheus_client import REGISTRY

    from recstream.explore.feedback import PolicyFeedback

    def expired() -> float:
        return REGISTRY.get_sample_value("recstream_policy_feedback_total", {"outcome": "expired"}) or 0.0

    now = [1000.0]
    fb = PolicyFeedback(make_policy("lift:1"), capacity=100, max_age_s=90.0, clock=lambda: now[0])
    rng = np.random.default_rng(23)
    fb.rank("old", IDS, SCORES, 3, rng)
    now[0] += 60.0
    fb.rank("young", IDS, SCORES, 3, rng)
    before = expired()
    now[0] += 31.0  # "old" is 91 s old, "young" 31 s
    fb.rank("new", IDS, SCORES, 3, rng)
    assert expired() - before == 3 and len(fb) == 6
    assert not fb.observe("old", "i0", 0, 1.0)
    assert fb.observe("young", "i0", 0, 1.0)
    with pytest.raises(ValueError, match="max_age_s"):
        PolicyFeedback(make_policy("lift:1"), max_age_s=0)


def test_policy_specs_are_checked_when_settings_load() -> None:
    from pydantic import ValidationError

    from recstream.config import Settings

    assert Settings(exploration_policy="lift:2:5000:10").exploration_policy == "lift:2:5000:10"
    assert make_policy("lift:2").name == "mean_lift_p2_h20000"
    with pytest.raises(ValidationError, match="unknown policy spec"):
        Settings(exploration_policy="thompson")


def test_policy_evidence_survives_a_restart_and_a_switch_between_ts_and_lift(tmp_path) -> None:
    from recstream.explore.feedback import PolicyFeedback

    fb = PolicyFeedback(make_policy("ts:2:5000:10"))
    rng = np.random.default_rng(23)
    for t in range(40):
        for s in fb.rank(f"r{t}", IDS, SCORES, 3, rng, groups=["a", "a", "b", "b", "c", "c"]):
            fb.observe(f"r{t}", s.item_id, s.position, float(s.item_id == "i4"))
    assert fb.unsaved == 120
    path = tmp_path / "policy" / "worker.npz"
    fb.save(path)
    assert fb.unsaved == 0 and list(path.parent.iterdir()) == [path]  # no temporary file left behind

    same = PolicyFeedback(make_policy("ts:2:5000:10"))
    assert same.load(path)
    groups = ["a", "a", "b", "b", "c", "c"]
    np.testing.assert_allclose(same.policy.posterior(IDS, groups), fb.policy.posterior(IDS, groups))
    assert same.policy.t == fb.policy.t == 120
    # the same evidence under the posterior-mean variant (no group pooling): i4 first, as learned
    switched = PolicyFeedback(make_policy("lift:2:5000"))
    assert switched.load(path)
    assert switched.rank("next", IDS, SCORES, 3, rng)[0].item_id == "i4"


def test_a_missing_or_damaged_policy_file_starts_fresh(tmp_path) -> None:
    from recstream.explore.feedback import PolicyFeedback

    fb = PolicyFeedback(make_policy("lift:1"))
    assert not fb.load(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a numpy archive")
    assert not fb.load(bad)
    np.savez(
        tmp_path / "short.npz",
        items=np.array(["a", "b"]),
        clicks=np.zeros(1),
        expected=np.zeros(2),
        t_last=np.zeros(2),
        t=np.zeros(1),
    )
    assert not fb.load(tmp_path / "short.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    assert not fb.load(tmp_path / "empty.npz")
    good = tmp_path / "good.npz"
    PolicyFeedback(make_policy("lift:1")).save(good)
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:40])
    assert not fb.load(tmp_path / "truncated.npz")
    np.savez(
        tmp_path / "no_clock.npz",
        items=np.array(["a"]),
        clicks=np.ones(1),
        expected=np.ones(1),
        t_last=np.ones(1),
        t=np.zeros(0),
    )
    assert not fb.load(tmp_path / "no_clock.npz")
    assert fb.policy.lift_mean(["a"])[0] == 1.0  # nothing half-loaded


def test_the_shown_slot_memory_is_sized_by_settings() -> None:
    from pydantic import ValidationError

    from recstream.config import Settings

    assert Settings().policy_feedback_slots == 200_000
    assert Settings(policy_feedback_slots=5_000).policy_feedback_slots == 5_000
    with pytest.raises(ValidationError):
        Settings(policy_feedback_slots=10)  # would evict answers before anyone could click them


@pytest.mark.parametrize("temperature,head", [(1.0, 0), (0.3, 1), (2.0, 2)])
def test_plackett_luce_exact_marginals_match_enumeration(temperature: float, head: int) -> None:
    """exact_marginals against the law itself: every ordered prefix enumerated with its probability,
    including weights 1e-6 of the largest (tiny cells must come out right, not floored)."""
    import itertools

    scores = np.array([0.0, -0.5, -1.0, -2.0, -4.0, -14.0 * temperature])
    k = 4
    policy = PlackettLuce(temperature, greedy_slots=head)
    order = greedy_order(scores)
    want = np.zeros((len(scores), k))
    for j in range(head):
        want[order[j], j] = 1.0
    rest = list(order[head:])
    w = np.exp(scores / temperature)
    for prefix in itertools.permutations(rest, k - head):
        p, left = 1.0, w[rest].sum()
        for i in prefix:
            p *= w[i] / left
            left -= w[i]
        for j, i in enumerate(prefix):
            want[i, head + j] += p
    got = policy.exact_marginals(scores, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-14)


def test_epsilon_greedy_with_fewer_pool_items_than_exploring_slots() -> None:
    """7 candidates, k=6, 3 exploring slots: only one item lies below the top-6, so only slot 0 may
    explore. rank never fails and its empirical marginals are the closed-form ones."""
    policy = EpsilonGreedy(0.5, 3)
    ids = [str(i) for i in range(7)]
    scores = -np.arange(7, dtype=np.float64)
    rng = np.random.default_rng(0)
    n = 4000
    counts = np.zeros((7, 6))
    for _ in range(n):
        for s in policy.rank(ids, scores, 6, rng):
            counts[int(s.item_id), s.position] += 1
            assert s.propensity == pytest.approx(policy.marginals(scores, 6)[int(s.item_id), s.position])
    np.testing.assert_allclose(counts / n, policy.marginals(scores, 6), atol=0.03)


def test_ranking_log_setting_accepts_its_boolean_form(monkeypatch) -> None:
    from pydantic import ValidationError

    from recstream.config import Settings, settings_env

    assert Settings().ranking_log == "all"
    for raw, mode in (("true", "exploring"), ("False", "off"), ("exploring", "exploring"), ("ALL", "all")):
        monkeypatch.setenv("RANKING_LOG", raw)
        assert Settings().ranking_log == mode
    assert settings_env(Settings(ranking_log="off"))["RANKING_LOG"] == "off"
    with pytest.raises(ValidationError):
        Settings(ranking_log="sometimes")


def test_a_re_answered_request_does_not_hold_up_the_expiry_of_older_slots() -> None:
    """Slots expire oldest first; a request answered again (a replay) got a new time but kept its
    old place, so expiry stopped at it and older slots behind it stayed until the capacity evicted them."""
    from recstream.explore.feedback import PolicyFeedback
    from recstream.explore.specs import make_policy

    now = [0.0]
    fb = PolicyFeedback(make_policy("lift:1"), max_age_s=10, clock=lambda: now[0])
    rng = np.random.default_rng(0)
    fb.rank("r1", ["a"], np.zeros(1), 1, rng)
    fb.rank("r2", ["b"], np.zeros(1), 1, rng)
    now[0] = 5.0
    fb.rank("r1", ["a"], np.zeros(1), 1, rng)  # r1 again: now the newest
    now[0] = 12.0
    fb.rank("r3", ["c"], np.zeros(1), 1, rng)  # r2 (t=0) is past 10 s; r1 (t=5) is not
    assert len(fb) == 2  # r1 and r3


def test_items_whose_evidence_has_faded_are_forgotten() -> None:
    """With catalogue churn every item ever shown kept its row (memory and the saved state grew for
    good). Items whose decayed evidence no longer moves their posterior are dropped; recent ones
    keep exactly the posterior they had."""
    from recstream.explore import thompson

    policy = thompson.LiftThompson(prior=2.0, half_life=50.0)
    for n in range(3 * thompson.FORGET_CHECK_ITEMS):
        policy.observe(f"i{n}", position=0, score=0.0, clicked=float(n % 7 == 0))
    recent = [f"i{n}" for n in range(3 * thompson.FORGET_CHECK_ITEMS - 20, 3 * thompson.FORGET_CHECK_ITEMS)]
    before = policy.posterior(recent)
    policy._forget_faded()
    held = len(policy.evidence()["items"])
    assert held < thompson.FORGET_CHECK_ITEMS, held  # was every item ever observed
    after = policy.posterior(recent)
    np.testing.assert_allclose(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1])
    a, b = policy.posterior(["i0"])  # long faded: as an unseen item
    assert (a[0], b[0]) == (policy.prior, policy.prior)


def test_plackett_luce_at_a_low_temperature_keeps_its_law_past_the_first_slots() -> None:
    """Two pairs 0.001 apart, the pairs 5 apart, at temperature 0.001: logits 0, -1, -5000, -5001.
    After the first pair is shown every remaining weight underflows against the global maximum;
    the law still says the second pair is drawn 73/27 (sigmoid(1)), not uniformly, and the exact
    marginals (what off-policy evaluation divides by) must not give it probability 0."""
    scores = np.array([10.0, 10.0 - 0.001, 5.0, 5.0 - 0.001])
    hi = 1.0 / (1.0 + np.exp(-1.0))
    want = np.array([[hi, 1 - hi, 0, 0], [1 - hi, hi, 0, 0], [0, 0, hi, 1 - hi], [0, 0, 1 - hi, hi]])
    policy = PlackettLuce(0.001)
    np.testing.assert_allclose(policy.exact_marginals(scores, 4), want, atol=1e-9)
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c", "d"]
    draws = 4000
    third = Counter(policy.rank(ids, scores, 4, rng)[2].item_id for _ in range(draws))
    assert abs(third["c"] / draws - hi) < 0.03  # uniform fallback gave 0.5
    shown = policy.rank(ids, scores, 3, rng)
    assert shown[2].propensity == pytest.approx(hi if shown[2].item_id == "c" else 1 - hi)
    first_sampled = PlackettLuce(0.001, greedy_slots=2).first_sampled_slot_probabilities(scores)
    np.testing.assert_allclose(first_sampled, [0, 0, hi, 1 - hi])  # NaN before: 0 / 0
