"""Off-policy evaluation from the worker's logs (RankingLog + TrainingExample), against a known truth.

The logs are built the way the worker and the feedback joiner write them: the logging policy ranks
each pool by its order (logits = -rank) and each shown slot's example carries the policy's logged
propensity (conditional for Plackett-Luce), so the tests also check that the evaluator recomputes
the marginals IPS needs instead of trusting the conditional ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from recstream.contracts.events import PoolCandidate, RankingLog, TrainingExample
from recstream.explore import make_policy
from recstream.ope_logs import evaluate, evaluate_logs, join

N_ITEMS = 300
POOL = 12
K = 6
EXAM = 1.0 / (1.0 + np.arange(K)) ** 0.7  # not the evaluator's DR examination model, on purpose


def _logs(
    n_req: int, logging_spec: str, seed: int, greedy_outside: bool = False
) -> tuple[list[RankingLog], list[TrainingExample], np.ndarray]:
    """Logs of `logging_spec` over random pools whose order is a noisy view of attractiveness."""
    rng = np.random.default_rng(seed)
    attract = rng.beta(1.2, 4.0, N_ITEMS)
    policy = make_policy(logging_spec)
    logs, examples = [], []
    for r in range(n_req):
        items = rng.choice(N_ITEMS, POOL, replace=False)
        noisy = attract[items] + rng.normal(0, 0.1, POOL)
        items = items[np.argsort(-noisy)]  # the pool in the order the worker ranks by
        ids = [str(i) for i in items]
        greedy = ids[:K]
        if greedy_outside:  # the worker's greedy answer (tighter category cap) reached past the pool
            greedy = [*ids[: K - 1], str(next(i for i in range(N_ITEMS) if str(i) not in ids))]
        rl = RankingLog(
            request_id=f"r{r}",
            user_id=f"u{r % 50}",
            model_version="1",
            policy_spec=logging_spec,
            k=K,
            pool=[
                PoolCandidate(item_id=i, score=float(s)) for i, s in zip(ids, noisy[np.argsort(-noisy)], strict=True)
            ],
            greedy=greedy,
        )
        logs.append(rl)
        for s in policy.rank(ids, -np.arange(POOL, dtype=np.float64), K, rng):
            clicked = bool(rng.random() < attract[int(s.item_id)] * EXAM[s.position])
            examples.append(
                TrainingExample(
                    request_id=rl.request_id,
                    user_id=rl.user_id,
                    item_id=s.item_id,
                    position=s.position,
                    propensity=s.propensity,
                    clicked=clicked,
                    label=float(clicked),
                )
            )
    return logs, examples, attract


def _truth(logs: list[RankingLog], attract: np.ndarray, target: str) -> float:
    """The target's exact CTR on these requests under the click model."""
    total = 0.0
    for rl in logs:
        ids = [int(c.item_id) for c in rl.pool]
        if target == "greedy":
            total += sum(attract[int(i)] * EXAM[j] for j, i in enumerate(rl.greedy))
        else:
            m = make_policy(target).marginals(-np.arange(POOL, dtype=np.float64), K, np.random.default_rng(1))
            total += float((m * (attract[ids][:, None] * EXAM[None, :])).sum())
    return total / (len(logs) * K)


@pytest.mark.parametrize("target", ["greedy", "eps:0.2:3", "pl:1"])
def test_estimates_from_plackett_luce_logs_cover_the_truth(target: str) -> None:
    logs, examples, attract = _logs(3000, "pl:2", seed=0)
    report = evaluate_logs(logs, examples, target)
    truth = _truth(logs, attract, target)
    assert report.requests == 3000 and report.impressions == 3000 * K and report.requests_incomplete == 0
    assert report.logging_policies == {"pl:2": 3000}
    assert report.target_mass_unsupported == pytest.approx(0.0)
    for e in report.estimates:
        assert e.low <= truth <= e.high, (e, truth)
        assert e.high - e.low < 0.03
    if target == "greedy":  # the greedy answer earns more than the exploring logger: OPE must see it
        assert report.estimates[1].low > report.logged_ctr


def test_conditional_propensities_would_be_wrong() -> None:
    """Plackett-Luce logs conditional propensities; weighting by them instead of the marginals
    misses the truth, so the recomputation above is what makes the estimate right."""
    logs, examples, attract = _logs(3000, "pl:2", seed=0)
    truth = _truth(logs, attract, "greedy")
    naive = [ex.label / ex.propensity for ex in examples if ex.item_id in set(logs[int(ex.request_id[1:])].greedy)]
    naive_ctr = sum(naive) / (len(logs) * K)
    assert abs(naive_ctr - truth) > 0.02


def test_eps_logs_cannot_support_a_plackett_luce_target() -> None:
    """eps:0.3:2 only explores the first two slots: pl:1 puts mass elsewhere, which is reported."""
    logs, examples, _ = _logs(800, "eps:0.3:2", seed=1)
    report = evaluate_logs(logs, examples, "pl:1")
    assert report.target_mass_unsupported is not None and report.target_mass_unsupported > 0.3
    assert any("never shows" in w for w in report.warnings)
    supported = evaluate_logs(logs, examples, "eps:0.1:2")
    assert supported.target_mass_unsupported == pytest.approx(0.0)
    assert not any("never shows" in w for w in supported.warnings)


def test_greedy_answer_outside_the_pool_counts_as_unsupported() -> None:
    logs, examples, _ = _logs(200, "pl:0.5", seed=2, greedy_outside=True)
    report = evaluate_logs(logs, examples, "greedy")
    assert report.target_mass_unsupported == pytest.approx(1 / K)


def test_incomplete_and_duplicated_requests() -> None:
    logs, examples, _ = _logs(50, "pl:0.5", seed=3)
    dropped = {"r0", "r1"}
    kept = [ex for ex in examples if not (ex.request_id in dropped and ex.position == 2)]
    kept += [ex for ex in examples if ex.request_id == "r5"]  # redelivered (at-least-once)
    kept = [ex for ex in kept if ex.request_id != "r9"]  # never displayed: no examples at all
    requests, incomplete = join(logs + logs[:3], kept)
    assert incomplete == 2
    assert len(requests) == 47 and all(len(r.slots) == K for r in requests)
    report = evaluate_logs(logs, kept, "greedy")
    assert report.requests == 47 and report.requests_incomplete == 2 and report.ranking_logs == 50


def test_learning_logger_uses_logged_marginals_and_learning_target_is_refused() -> None:
    logs, examples, _ = _logs(100, "pl:0.5", seed=4)
    as_ts = [rl.model_copy(update={"policy_spec": "ts:5"}) for rl in logs]
    report = evaluate_logs(as_ts, examples, "greedy")
    assert report.target_mass_unsupported is None  # ts logs only the shown slots' marginals
    assert report.logging_policies == {"ts:5": 100}
    with pytest.raises(ValueError, match="learns online"):
        evaluate_logs(logs, examples, "lift:1")
    with pytest.raises(ValueError, match="unknown policy"):
        evaluate_logs(logs, examples, "softmax")
    with pytest.raises(ValueError, match="no complete logged requests"):
        evaluate([], "greedy")


def test_shown_item_missing_from_pool_is_an_error() -> None:
    logs, examples, _ = _logs(5, "pl:0.5", seed=5)
    bad = [ex.model_copy(update={"item_id": "not-in-pool"}) if ex.request_id == "r2" else ex for ex in examples]
    with pytest.raises(ValueError, match="not in its logged pool"):
        evaluate_logs(logs, bad, "greedy")
