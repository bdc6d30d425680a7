"""Off-policy evaluation from production logs: would another ranking policy earn more clicks?

Why: before an operator switches EXPLORATION_POLICY (or tunes its temperature) the logs of the
policy that is live already say what the candidate would have earned, if the live policy explored.
The worker publishes, for each answer of a stochastic policy, the pool it drew from (`ranking-log`
topic, `RankingLog`); the feedback joiner publishes each shown slot with its outcome
(`training-examples`). Joined by request id they are the logged data of recstream.ope.estimators.

What can be evaluated, and against which logs:
* target policies: `greedy` (the answer the worker would have given, logged per request),
  `pl:T[:HEAD]` and `eps:E[:SLOTS]` (their propensities are functions of the pool alone). The
  learning policies `ts:`/`lift:` are refused: their propensities depend on evidence the logs do
  not carry; compare them online or in `make bench-loop`.
* logging policies: `pl:` and `eps:` have their marginals recomputed exactly from the pool (a
  Plackett-Luce slot's logged propensity is conditional on earlier slots, IPS needs the marginal);
  `ts:` logs Monte-Carlo marginals with each slot and those are used as logged.

A request counts only when every shown slot has its outcome: an application that logged some
impressions of an answer but not others would bias the click-through rate. A request whose log
cannot be used (a spec this version cannot parse, a shown item missing from its pool...) is
skipped and counted by reason, never fatal. A target that puts mass where the logging policy
(practically) never shows anything - the greedy answer's items outside the logged pool, eps logs
that explore only the first slots - cannot be estimated there by IPS/SNIPS; that mass is reported
(`target_mass_unsupported`) and those estimates are biased low by up to it. Doubly robust fills
those cells with its click model.

A candidate *model version* is evaluated the same way (`rescore=`): it ranks each logged pool by
its own logits, recomputed from the inputs the worker served with (the logged context vector and
candidate features, plus the item vectors), and the target policy acts on that order. The answer
is compared with the logging model's own order over the same pool by paired differences
(`versus_logging_model`): same requests, same clicks, so most of the noise cancels. Both rank the
logged pool by pure score (no category cap), and items the logging model left out of the pool are
out of reach - an estimate of a new model *within the pools the live one drew*.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, Field

from recstream.contracts.events import RankingLog, TrainingExample
from recstream.explore.feedback import learns_online
from recstream.explore.policies import PlackettLuce, RankingPolicy, greedy_order
from recstream.explore.specs import make_policy
from recstream.ope.estimators import LoggedData, doubly_robust, ips, snips
from recstream.ope.logged import LoggedRequest, UnusableLog, join
from recstream.ope.rescoring import Rescorer

#: A cell the logging policy fills less often than this is treated as unsupported: a weight above
#: a million is never observed in practice, so IPS effectively misses that mass.
SUPPORT_FLOOR = 1e-6
#: Below this effective sample size the report warns that the estimate rests on too few requests.
MIN_ESS = 100


class OpeEstimate(BaseModel):
    method: str
    ctr: float
    low: float
    high: float


class OpeReport(BaseModel):
    """What `recstream.ops.cli ope` prints: the estimates and everything needed to judge them."""

    target: str
    confidence: float
    logging_policies: dict[str, int] = Field(description="Requests used, per logging policy spec")
    ranking_logs: int = Field(description="Distinct requests in the ranking log")
    requests: int = Field(description="Requests with every shown slot's outcome (the sample)")
    requests_incomplete: int = Field(description="Requests with some shown slots' outcomes missing (left out)")
    requests_invalid: dict[str, int] = Field(description="Requests left out because their logs are unusable, by reason")
    impressions: int
    logged_ctr: float = Field(description="Clicks per shown slot of the logging policies themselves")
    estimates: list[OpeEstimate]
    effective_sample_size: float = Field(description="(sum w)^2 / sum w^2 over impressions")
    max_weight: float
    target_mass_unsupported: float | None = Field(
        description="Share of the target's slots the logging policy (practically) never fills "
        "(None: unknown for ts logs, which carry only the shown slots' propensities)"
    )
    candidate_model: str | None = Field(None, description="The model version that ranked the pools (None: logged)")
    baseline_model: str | None = Field(
        None, description="The model the candidate is paired with (None: the logging model's logged scores)"
    )
    versus_logging_model: list[OpeEstimate] = Field(
        default_factory=list,
        description="Paired difference candidate - baseline (the logging model unless baseline_model is set), "
        "same policy over the same pools (IPS and DR)",
    )
    warnings: list[str] = Field(default_factory=list)


@lru_cache(maxsize=64)
def explores(spec: str) -> bool:
    """Whether answers logged under `spec` can enter an estimate (a parseable, stochastic policy)."""
    try:
        return make_policy(spec).stochastic
    except ValueError:
        return False


def _policy(spec: str) -> RankingPolicy:
    try:
        return make_policy(spec)
    except ValueError as exc:
        raise UnusableLog("unknown policy spec") from exc


def check_target(spec: str) -> RankingPolicy:
    """The target policy, or ValueError if it cannot be evaluated from logs."""
    policy = make_policy(spec)
    if learns_online(policy):
        raise ValueError(f"target {spec!r} learns online: its propensities depend on evidence the logs do not carry")
    return policy


@lru_cache(maxsize=256)
def _marginals(spec: str, n: int, k: int) -> np.ndarray:
    """[n, k] P(pool item i at slot j), ranking by pool order as the worker does (logits = -rank).
    Depends on (spec, n, k) only, so it is computed once per shape; read-only."""
    policy = make_policy(spec)
    logits = -np.arange(n, dtype=np.float64)
    m = policy.exact_marginals(logits, k) if isinstance(policy, PlackettLuce) else policy.marginals(logits, k)
    m.setflags(write=False)
    return m


def _examination(k: int) -> np.ndarray:
    """Position-based examination 1 / (1 + j), the click model the learner's IPW weights assume."""
    return 1.0 / (1.0 + np.arange(k))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


@dataclass
class _Rows:
    """One usable request's contribution to LoggedData."""

    click: list[float]
    p_log: list[float]
    p_target: list[float]
    q_hat: list[float]
    dm: float
    unsupported: float | None


def _rows(lr: LoggedRequest, target: str, order: np.ndarray | None = None) -> _Rows:
    """Logging and target propensities of one request's shown slots; UnusableLog if it has none.

    order: the target ranks the pool in this order (pool indices, best first) instead of the
    logged one; a greedy target then shows the first k of it."""
    rl, k = lr.log, len(lr.slots)
    n = len(rl.pool)
    if k == 0:
        raise UnusableLog("empty pool")
    row = {c.item_id: i for i, c in enumerate(rl.pool)}
    if len(row) < n or len({ex.item_id for ex in lr.slots}) < k:
        raise UnusableLog("an item twice in one pool or answer")
    rows = [row.get(ex.item_id) for ex in lr.slots]
    if any(i is None for i in rows):
        raise UnusableLog("a shown item is not in its logged pool")
    logging_policy = _policy(rl.policy_spec)
    if not logging_policy.stochastic:
        raise UnusableLog("logged by a policy that never explores")
    m_log = None if learns_online(logging_policy) else _marginals(rl.policy_spec, n, k)
    q = _sigmoid(np.array([c.score for c in rl.pool]))[:, None] * _examination(k)[None, :]
    exam = _examination(k)
    if order is not None:
        if target == "greedy":
            m_target = np.zeros((n, k))
            m_target[order[:k], np.arange(k)] = 1.0
        else:
            m_target = np.empty((n, k))
            m_target[order] = _marginals(target, n, k)  # row r of the marginals = the item ranked r-th
        outside = outside_dm = 0.0
    elif target == "greedy":
        m_target = np.zeros((n, k))
        outside_dm = outside = 0.0
        for j, c in enumerate(rl.greedy[:k]):
            if c.item_id in row:
                m_target[row[c.item_id], j] = 1.0
            else:  # the greedy answer reached past the pool: only the click model can value it
                outside += 1.0
                outside_dm += float(_sigmoid(np.array([c.score]))[0] * exam[j])
    else:
        m_target, outside, outside_dm = _marginals(target, n, k), 0.0, 0.0
    unsupported = None
    if m_log is not None:
        unsupported = (float(m_target[m_log < SUPPORT_FLOOR].sum()) + outside) / k
    p_log = []
    for j, (ex, i) in enumerate(zip(lr.slots, rows, strict=True)):
        p = ex.propensity if m_log is None else float(m_log[i, j])
        if p <= 0:
            raise UnusableLog("a shown slot the logging policy could not have filled")
        p_log.append(p)
    return _Rows(
        click=[ex.label for ex in lr.slots],
        p_log=p_log,
        p_target=[float(m_target[i, j]) for j, i in enumerate(rows)],
        q_hat=[float(q[i, j]) for j, i in enumerate(rows)],
        dm=float((m_target * q).sum()) + outside_dm,
        unsupported=unsupported,
    )


def _checked(scores: np.ndarray, lr: LoggedRequest) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(lr.log.pool),) or not np.all(np.isfinite(scores)):
        raise UnusableLog("the candidate model gave no finite score per pool item")
    return scores


def _logged_data(used: Sequence[_Rows], paired_with: Sequence[_Rows] | None = None) -> LoggedData:
    """The rows as recstream.ope data; with `paired_with`, target propensities and the click model's
    value are differences (IPS and DR are linear in them: their estimate is the paired difference)."""
    p_target = np.concatenate([r.p_target for r in used])
    dm = np.array([r.dm for r in used])
    if paired_with is not None:
        p_target = p_target - np.concatenate([r.p_target for r in paired_with])
        dm = dm - np.array([r.dm for r in paired_with])
    return LoggedData(
        request=np.concatenate([np.full(len(r.click), n) for n, r in enumerate(used)]),
        click=np.concatenate([r.click for r in used]),
        propensity=np.concatenate([r.p_log for r in used]),
        target_propensity=p_target,
        slots_per_request=np.array([len(r.click) for r in used], dtype=np.float64),
        q_hat=np.concatenate([r.q_hat for r in used]),
        dm=dm,
    )


def evaluate(
    requests: Sequence[LoggedRequest],
    target: str,
    confidence: float = 0.95,
    rescore: Rescorer | None = None,
    candidate_model: str | None = None,
    baseline: Rescorer | None = None,
    baseline_model: str | None = None,
) -> OpeReport:
    """IPS, SNIPS and doubly robust estimates of `target`'s click-through rate from logged requests.

    The doubly robust click model is the ranker's own: P(click) = sigmoid(logit) / (1 + slot).
    With `rescore` the target acts on the candidate model's order of each pool (see the module doc)
    and the report adds its paired difference with the logging model's order, or with `baseline`'s
    (another model rescoring the same pools, e.g. the live version when the logs span several)."""
    target = target.strip()
    check_target(target)
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    used: list[tuple[LoggedRequest, _Rows]] = []
    paired: list[_Rows] = []
    invalid: Counter[str] = Counter()
    for scorer in (rescore, baseline):
        prepare = getattr(scorer, "prepare", None)
        if prepare is not None:
            prepare(requests)
    for lr in requests:
        try:
            if rescore is None:
                used.append((lr, _rows(lr, target)))
                continue
            base = np.array([c.score for c in lr.log.pool]) if baseline is None else _checked(baseline(lr), lr)
            rows = _rows(lr, target, greedy_order(_checked(rescore(lr), lr)))
            paired.append(_rows(lr, target, greedy_order(base)))
            used.append((lr, rows))
        except UnusableLog as exc:
            invalid[str(exc)] += 1
    if not used:
        raise ValueError(
            "no usable logged requests: is a stochastic EXPLORATION_POLICY live (pl:, eps: or ts:), "
            "and does the application log impressions and clicks?"
            + (f" (left out: {dict(invalid)})" if invalid else "")
        )
    data = _logged_data([r for _, r in used])
    alpha = 1.0 - confidence
    estimates = [ips(data, alpha), snips(data, alpha), doubly_robust(data, alpha)]
    versus: list[OpeEstimate] = []
    if rescore is not None:
        diff = _logged_data([r for _, r in used], paired)
        versus = [
            OpeEstimate(method=e.method, ctr=e.value, low=e.low, high=e.high)
            for e in (ips(diff, alpha), doubly_robust(diff, alpha))
        ]
    w = data.weights()
    ess = float(w.sum() ** 2 / (w**2).sum()) if (w > 0).any() else 0.0
    known = [r.unsupported for _, r in used if r.unsupported is not None]
    mass = float(np.mean(known)) if len(known) == len(used) else None
    warnings = []
    if mass is not None and mass > 0.01:
        warnings.append(
            f"{mass:.1%} of the target's slots lie where the logging policy (practically) never shows anything: "
            "IPS and SNIPS are biased low by up to that share, DR fills it from its click model"
        )
    if ess < MIN_ESS:
        warnings.append(f"effective sample size {ess:.0f}: too few logged answers resemble the target's")
    if invalid:
        warnings.append(f"left out {sum(invalid.values())} unusable logged requests: {dict(invalid)}")
    return OpeReport(
        target=target,
        confidence=confidence,
        logging_policies=dict(Counter(lr.log.policy_spec for lr, _ in used)),
        ranking_logs=len(requests),
        requests=len(used),
        requests_incomplete=0,
        requests_invalid=dict(invalid),
        impressions=len(data.click),
        logged_ctr=float(data.click.mean()),
        estimates=[OpeEstimate(method=e.method, ctr=e.value, low=e.low, high=e.high) for e in estimates],
        effective_sample_size=ess,
        max_weight=float(w.max()),
        target_mass_unsupported=mass,
        candidate_model=candidate_model,
        baseline_model=baseline_model,
        versus_logging_model=versus,
        warnings=warnings,
    )


def evaluate_logs(
    logs: Iterable[RankingLog],
    examples: Iterable[TrainingExample],
    target: str,
    confidence: float = 0.95,
    rescore: Rescorer | None = None,
    candidate_model: str | None = None,
) -> OpeReport:
    """Join the two topics' records and estimate `target`'s click-through rate (see `evaluate`)."""
    logs = list(logs)
    requests, incomplete = join(logs, examples)
    report = evaluate(requests, target, confidence, rescore, candidate_model)
    distinct = len({rl.request_id for rl in logs})
    return report.model_copy(update={"ranking_logs": distinct, "requests_incomplete": incomplete})
