"""Business re-ranking after scoring: no duplicates, and no single category swamping the list."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from recstream.recommend.scoring import Candidate

#: At most this share of a list may be one category: enough to follow a strong interest,
#: not so much that the list stops exploring.
MAX_CATEGORY_SHARE = 0.6
#: Soft penalty per already-picked item of the same category (in score units, scores are ~[0, 1]).
CATEGORY_PENALTY = 0.02


def keep_new_items_in_place(scores: Sequence[float], is_new: Sequence[bool]) -> np.ndarray:
    """Ranker scores for candidates given in retrieval order, adjusted so that items with no
    interaction data keep their retrieval slot while the others are ordered by the ranker around
    them (the quality bench's cold-item rule: the popularity and trend features say nothing of a
    new item but "unseen", and letting the ranker act on that buries every new item).

    Returns the same multiset of scores, reassigned so that sorting by score gives that order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    new = np.asarray(is_new, dtype=bool)
    if not new.any() or new.all():
        return scores.astype(np.float32)
    order = np.arange(len(scores))
    warm = np.flatnonzero(~new)
    order[warm] = warm[np.argsort(-scores[warm], kind="stable")]
    out = np.empty_like(scores)
    out[order] = np.sort(scores)[::-1]
    return out.astype(np.float32)


def diversify(
    candidates: Sequence[Candidate],
    scores: Sequence[float],
    k: int,
    max_share: float = MAX_CATEGORY_SHARE,
    penalty: float = CATEGORY_PENALTY,
) -> list[tuple[Candidate, float]]:
    """Greedy selection of up to k (candidate, score) by penalised score, deduplicated by item id.

    If the category cap leaves the list short (few categories available), the cap is lifted for
    the remaining slots rather than returning fewer items than asked for.
    """
    cap = max(1, math.ceil(k * max_share))
    pool = sorted(zip(candidates, (float(s) for s in scores), strict=True), key=lambda cs: -cs[1])
    picked: list[tuple[Candidate, float]] = []
    ids: set[str] = set()
    per_cat: dict[str, int] = {}
    for enforce_cap in (True, False):
        while len(picked) < k:
            best_i, best_adj = -1, -math.inf
            for i, (cand, score) in enumerate(pool):
                if cand.item_id in ids:
                    continue
                n = per_cat.get(cand.category or "", 0)
                if enforce_cap and n >= cap:
                    continue
                adj = score - penalty * n
                if adj > best_adj:
                    best_i, best_adj = i, adj
            if best_i < 0:
                break
            cand, score = pool.pop(best_i)
            picked.append((cand, score))
            ids.add(cand.item_id)
            per_cat[cand.category or ""] = per_cat.get(cand.category or "", 0) + 1
        if len(picked) >= k:
            break
    return picked
