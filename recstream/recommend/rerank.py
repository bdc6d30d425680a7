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


def new_item_order(scores: Sequence[float], is_new: Sequence[bool], slot_factor: float = 1.0) -> np.ndarray:
    """The list order (candidate indices, best first) for candidates given in retrieval order.

    Candidates nobody has interacted with are placed by retrieval, not by the ranker: its popularity
    and trend features say nothing of a new item but "unseen", and letting it act on that buries
    every new item (measured offline: cold-start NDCG@10 0.021 -> 0). A new item at retrieval slot s
    goes to slot s * `slot_factor` (1: its own slot; 0: ahead of every known item); the known items
    fill the other slots in the ranker's order. Offline scoring and the worker both order lists
    with this function.
    """
    scores = np.asarray(scores, dtype=np.float64)
    new = np.asarray(is_new, dtype=bool)
    if not 0.0 <= slot_factor <= 1.0:
        raise ValueError(f"slot_factor must be in [0, 1], got {slot_factor}")
    slot = np.arange(len(scores), dtype=np.float64)
    warm = np.flatnonzero(~new)
    slot[warm[np.argsort(-scores[warm], kind="stable")]] = warm
    # a new item goes just ahead of the known item that holds the slot it lands on
    slot[new] = slot[new] * slot_factor - 0.5
    return np.argsort(slot, kind="stable")


def new_item_slot_factor(places: bool, setting: float | None = None) -> float | None:
    """Where a list puts the candidates nobody has interacted with: at their retrieval slot times the
    operator's NEW_ITEM_SLOT_FACTOR when set, else as the version chose (its retrieval slot, or None:
    the ranker orders them like the rest). Offline scoring and the worker both ask this."""
    if setting is not None:
        return setting
    return 1.0 if places else None


def place_new_items(scores: Sequence[float], is_new: Sequence[bool], slot_factor: float = 1.0) -> np.ndarray:
    """`new_item_order` as ordering scores: the same multiset of ranker scores, reassigned so that
    sorting by score gives that order (what the worker diversifies by)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.empty_like(scores)
    out[new_item_order(scores, is_new, slot_factor)] = np.sort(scores)[::-1]
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
