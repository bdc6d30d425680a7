"""Ranking metrics by FULL ranking against all items, with the user's seen items excluded.

Sampled-negative metrics overstate quality and are not comparable across papers, so every case is
ranked against the whole catalogue. Each case has exactly one relevant item (the target), hence:

* rank: 0-based position of the target among the non-excluded items. Ties count against the
  target (it is placed after every item with an equal score), so a constant scorer gets no credit.
* HR@K = Recall@K = [rank < K] (identical with one relevant item; both are reported for familiarity)
* NDCG@K = 1 / log2(rank + 2) if rank < K else 0
* MRR = 1 / (rank + 1), over the full ranking (not truncated)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

ScoreFn = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]


def target_ranks(
    scores: np.ndarray | torch.Tensor,
    targets: np.ndarray | Sequence[int],
    exclude: Sequence[np.ndarray | Sequence[int]] | None = None,
) -> np.ndarray:
    """0-based rank of each row's target among items not excluded for that row.

    `exclude[i]` lists item indices already seen by row i's user; the target itself is never
    excluded. NaN scores rank last.
    """
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    s = s.to(torch.float64).clone()
    if s.ndim != 2:
        raise ValueError(f"scores must be [batch, n_items], got shape {tuple(s.shape)}")
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if t.shape[0] != s.shape[0]:
        raise ValueError(f"{s.shape[0]} score rows but {t.shape[0]} targets")
    s = torch.nan_to_num(s, nan=-np.inf)
    rows = torch.arange(s.shape[0])
    target_score = s[rows, t].clone()
    if exclude is not None:
        if len(exclude) != s.shape[0]:
            raise ValueError(f"{s.shape[0]} score rows but {len(exclude)} exclusion lists")
        lens = [len(e) for e in exclude]
        if sum(lens):
            r = torch.as_tensor(np.repeat(np.arange(len(exclude)), lens))
            c = torch.as_tensor(np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude if len(e)]))
            s[r, c] = -np.inf
    s[rows, t] = -np.inf  # compare against the others only
    # excluded and NaN items (-inf) never count; a finite target after a tie is placed last
    ranks = ((s >= target_score[:, None]) & (s > -np.inf)).sum(dim=1)
    return ranks.numpy().astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """HR@K, NDCG@K, Recall@K for each K and MRR, averaged over cases."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    if len(ranks) == 0:
        return {**{f"{m}@{k}": float("nan") for k in ks for m in ("HR", "NDCG", "Recall")}, "MRR": float("nan")}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        out[f"Recall@{k}"] = float(hit.mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def rank_cases(
    score_fn: ScoreFn,
    users: np.ndarray,
    histories: list[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Ranks for every case, scoring users in batches through `score_fn(users, histories)`.

    Each case's history is both the scorer's input and the exclusion set.
    """
    ranks = np.empty(len(users), dtype=np.int64)
    starts = range(0, len(users), batch_size)
    for lo in tqdm(starts, desc="rank", disable=not progress, leave=False):
        hi = min(lo + batch_size, len(users))
        hist = histories[lo:hi]
        scores = score_fn(np.asarray(users[lo:hi]), hist)
        ranks[lo:hi] = target_ranks(scores, targets[lo:hi], hist)
    return ranks


def evaluate(
    model: object | ScoreFn,
    cases: object,
    ks: Sequence[int] = (10, 50),
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of a model (anything with `.score`) or score function on `EvalCases`."""
    score_fn: ScoreFn = model.score if hasattr(model, "score") else model  # type: ignore[assignment]
    ranks = rank_cases(
        score_fn,
        cases.users,  # type: ignore[attr-defined]
        cases.histories,  # type: ignore[attr-defined]
        cases.targets,  # type: ignore[attr-defined]
        batch_size=batch_size,
        progress=progress,
    )
    out = metrics_from_ranks(ranks, ks)
    out["n_cases"] = len(ranks)
    return out
