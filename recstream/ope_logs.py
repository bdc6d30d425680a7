"""Off-policy evaluation from production logs: would another ranking policy earn more clicks?

Why: before an operator switches EXPLORATION_POLICY (or tunes its temperature) the logs of the
policy that is live already say what the candidate would have earned, if the live policy explored.
The worker publishes, for each answer of a stochastic policy, the pool it drew from (`ranking-log`
topic, `RankingLog`); the feedback joiner publishes each shown slot with its outcome
(`training-examples`). Joined by request id they are the logged data of recstream.ope.

What can be evaluated, and against which logs:
* target policies: `greedy` (the answer the worker would give, logged per request), `pl:T[:HEAD]`
  and `eps:E[:SLOTS]` (their propensities are functions of the pool alone). The learning policies
  `ts:`/`lift:` are refused: their propensities depend on evidence the logs do not carry; compare
  them online or in `make bench-loop`.
* logging policies: `pl:` and `eps:` have their marginals recomputed from the pool (a Plackett-Luce
  slot's logged propensity is conditional on earlier slots, IPS needs the marginal); `ts:`/`lift:`
  log Monte-Carlo marginals with each slot and those are used as logged.

A request counts only when every shown slot has its outcome: an application that logged some
impressions of an answer but not others would bias the click-through rate. A target that puts mass
where the logging policy never shows anything (e.g. greedy's answer outside the logged pool, or
eps logging that explores only the first slots) cannot be estimated there; that mass is reported
(`target_mass_unsupported`) and the estimate is biased low by up to it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field

from recstream.contracts.events import RankingLog, TrainingExample
from recstream.explore.feedback import learns_online
from recstream.explore.policies import PlackettLuce, RankingPolicy, make_policy
from recstream.ope import Estimate, LoggedData, doubly_robust, ips, snips

log = logging.getLogger(__name__)

#: Monte-Carlo rankings for Plackett-Luce marginals beyond its first sampled slot. The worker ranks a
#: pool by its order (logits = -rank), so the marginals depend on (spec, pool size, k) only and are
#: computed once per shape: many draws, because one shape's error is shared by all its requests.
MC_SAMPLES = 100_000
#: Above this share of unsupported target mass the report warns that the estimate is biased.
UNSUPPORTED_WARN = 0.01


class OpeEstimate(BaseModel):
    method: str
    ctr: float
    low: float
    high: float


class OpeReport(BaseModel):
    """What `recstream.cli ope` prints: the estimates and everything needed to judge them."""

    target: str
    logging_policies: dict[str, int] = Field(description="Requests used, per logging policy spec")
    ranking_logs: int = Field(description="Ranking logs read")
    requests: int = Field(description="Requests with every shown slot's outcome (the sample)")
    requests_incomplete: int = Field(description="Requests with some shown slots' outcomes missing (left out)")
    impressions: int
    logged_ctr: float = Field(description="Clicks per shown slot of the logging policies themselves")
    estimates: list[OpeEstimate]
    effective_sample_size: float = Field(description="(sum w)^2 / sum w^2 over impressions")
    max_weight: float
    target_mass_unsupported: float | None = Field(
        description="Share of the target's slots the logging policy could not have shown "
        "(None: unknown for ts/lift logs)"
    )
    warnings: list[str] = Field(default_factory=list)


@dataclass
class LoggedRequest:
    """One logged answer: the pool it was drawn from and each shown slot's training example."""

    log: RankingLog
    slots: list[TrainingExample]  # by position 0..n-1


def join(logs: Iterable[RankingLog], examples: Iterable[TrainingExample]) -> tuple[list[LoggedRequest], int]:
    """Complete logged requests (every shown slot has its outcome) and the number of incomplete ones.

    Duplicates (at-least-once delivery) collapse to the last copy of each (request, position)."""
    by_request: dict[str, dict[int, TrainingExample]] = {}
    for ex in examples:
        by_request.setdefault(ex.request_id, {})[ex.position] = ex
    complete: list[LoggedRequest] = []
    incomplete = 0
    for rl in {r.request_id: r for r in logs}.values():
        shown = min(rl.k, len(rl.pool))
        slots = by_request.get(rl.request_id, {})
        if not slots:
            continue  # nothing was logged for this answer (never displayed, or its window is still open)
        if any(j not in slots for j in range(shown)):
            incomplete += 1
            continue
        complete.append(LoggedRequest(rl, [slots[j] for j in range(shown)]))
    return complete, incomplete


def _stateless(spec: str, role: str) -> RankingPolicy:
    policy = make_policy(spec)
    if learns_online(policy):
        raise ValueError(
            f"{role} policy {spec!r} learns online: its propensities depend on evidence the logs do not carry"
        )
    return policy


@lru_cache(maxsize=256)
def _marginals(spec: str, n: int, k: int) -> np.ndarray:
    """[n, k] P(pool item i at slot j), ranking by pool order as the worker does (logits = -rank)."""
    policy = make_policy(spec)
    logits = -np.arange(n, dtype=np.float64)
    rng = np.random.default_rng(n * 1000 + k)
    if isinstance(policy, PlackettLuce):
        m = policy.marginals(logits, k, rng, n_samples=MC_SAMPLES)
    else:
        m = policy.marginals(logits, k, rng)
    m.setflags(write=False)
    return m


def _support(policy: RankingPolicy, marginals: np.ndarray) -> np.ndarray:
    """Cells the logging policy can fill. Plackett-Luce's Monte-Carlo zeros are not impossibilities:
    every item outside the greedy head can reach every sampled slot."""
    if isinstance(policy, PlackettLuce):
        g = min(policy.greedy_slots, marginals.shape[1])
        support = np.zeros_like(marginals, dtype=bool)
        head = np.arange(g)
        support[head, head] = True  # pool order = greedy order
        support[g:, g:] = True
        return support
    return marginals > 0


def _target_marginals(spec: str, rl: RankingLog, k: int) -> tuple[np.ndarray, float]:
    """The target's [n, k] marginals over the pool and its mass outside the pool (greedy only)."""
    n = len(rl.pool)
    if spec == "greedy":
        m = np.zeros((n, k))
        row = {c.item_id: i for i, c in enumerate(rl.pool)}
        outside = 0.0
        for j, item in enumerate(rl.greedy[:k]):
            if item in row:
                m[row[item], j] = 1.0
            else:
                outside += 1.0
        return m, outside
    return _marginals(spec, n, k), 0.0


def _examination(k: int) -> np.ndarray:
    """Position-based examination 1 / (1 + j), the click model the learner's IPW weights assume."""
    return 1.0 / (1.0 + np.arange(k))


def evaluate_logs(
    logs: Iterable[RankingLog], examples: Iterable[TrainingExample], target: str, alpha: float = 0.05
) -> OpeReport:
    """Join the two topics' records and estimate `target`'s click-through rate (see `evaluate`)."""
    logs = list(logs)
    requests, incomplete = join(logs, examples)
    report = evaluate(requests, target, alpha)
    return report.model_copy(update={"ranking_logs": len(logs), "requests_incomplete": incomplete})


def evaluate(requests: Sequence[LoggedRequest], target: str, alpha: float = 0.05) -> OpeReport:
    """IPS, SNIPS and doubly robust estimates of `target`'s click-through rate from logged requests.

    The doubly robust click model is the ranker's own: P(click) = sigmoid(logit) / (1 + slot)."""
    target = target.strip()
    _stateless(target, "target")
    if not requests:
        raise ValueError(
            "no complete logged requests: is a stochastic EXPLORATION_POLICY live and are impressions logged?"
        )
    rows_req, clicks, p_log, p_target, q_hat = [], [], [], [], []
    dm, slots_per_request, unsupported = [], [], []
    logging_used: Counter[str] = Counter()
    unsupported_known = True
    for r, lr in enumerate(requests):
        rl = lr.log
        n, k = len(rl.pool), len(lr.slots)
        row = {c.item_id: i for i, c in enumerate(rl.pool)}
        logging_policy = make_policy(rl.policy_spec)
        if learns_online(logging_policy):
            m_log, support = None, None
            unsupported_known = False
        else:
            m_log = _marginals(rl.policy_spec, n, k)
            support = _support(logging_policy, m_log)
        m_target, outside = _target_marginals(target, rl, k)
        q = (1.0 / (1.0 + np.exp(-np.array([c.score for c in rl.pool]))))[:, None] * _examination(k)[None, :]
        dm.append(float((m_target * q).sum()))
        if support is not None:
            unsupported.append((float(m_target[~support].sum()) + outside) / k)
        for j, ex in enumerate(lr.slots):
            i = row.get(ex.item_id)
            if i is None:
                raise ValueError(f"request {rl.request_id}: shown item {ex.item_id} is not in its logged pool")
            rows_req.append(r)
            clicks.append(ex.label)
            # Floor Monte-Carlo estimates at one draw: the slot *was* shown, so its probability is not 0.
            p_log.append(ex.propensity if m_log is None else max(float(m_log[i, j]), 1.0 / MC_SAMPLES))
            p_target.append(float(m_target[i, j]))
            q_hat.append(float(q[i, j]))
        slots_per_request.append(k)
        logging_used[rl.policy_spec] += 1
    data = LoggedData(
        request=np.array(rows_req),
        click=np.array(clicks),
        propensity=np.array(p_log),
        target_propensity=np.array(p_target),
        slots_per_request=np.array(slots_per_request, dtype=np.float64),
        q_hat=np.array(q_hat),
        dm=np.array(dm),
    )
    estimates: list[Estimate] = [ips(data, alpha), snips(data, alpha), doubly_robust(data, alpha)]
    w = data.weights()
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
    mass = float(np.mean(unsupported)) if unsupported_known else None
    warnings = []
    if mass is not None and mass > UNSUPPORTED_WARN:
        warnings.append(
            f"{mass:.1%} of the target's slots lie where the logging policy never shows anything: "
            "the estimates are biased low by up to that share (log with more exploration)"
        )
    if ess < 100:
        warnings.append(f"effective sample size {ess:.0f}: too few logged requests resemble the target")
    return OpeReport(
        target=target,
        logging_policies=dict(logging_used),
        ranking_logs=len(requests),
        requests=len(requests),
        requests_incomplete=0,
        impressions=len(rows_req),
        logged_ctr=float(np.mean(clicks)),
        estimates=[OpeEstimate(method=e.method, ctr=e.value, low=e.low, high=e.high) for e in estimates],
        effective_sample_size=ess,
        max_weight=float(w.max()),
        target_mass_unsupported=mass,
        warnings=warnings,
    )
