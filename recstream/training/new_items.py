"""Whether the served lists place the candidates nobody has interacted with by retrieval (the
cold-start rule) or let the ranker order them like every other candidate: chosen per data set on its
own leave-last-out validation cases, by `make train`, with the ranker just trained.

The placement exists so that a new item is seen: the ranker's popularity and trend features say
nothing of it but "unseen", and would bury it. It is paid for by the known items it pushes down.
Where items without interactions are few (ML-100k: 4 of 1,682 in the training part) the price is
nil (validation 0.0000-0.0003 NDCG@10) and the placement stays. On a sparse catalogue they are many
long-tail items that nobody wants rather than new ones: on ML-100k thinned to a quarter of its
interactions without timestamps (240 of 1,682 items never interacted with) they took 15 % of the
top-10 slots while 0.3 % of the validation targets were such items, and placing them cost 12 % of
validation NDCG@10 (0.0525 -> 0.0469). There the lists are better without it, and validation says so.

A binary choice whose cost shows on only the few cases a new item reaches has a tiny standard
error, so the rule asks for both a paired standard error (`MIN_GAIN_SE`, as the sequence fusion)
and a material cost: at least `MIN_COST_SHARE` of the validation NDCG@10. Ties keep the placement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: The placement is turned off only when it costs at least this share of the lists' validation
#: NDCG@10 (ML-100k: at most 0.2 %; the thinned data set: 12 %; any value between keeps both choices).
MIN_COST_SHARE = 0.01


def placement_decision(placed: np.ndarray, ranked: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Whether to place new items, from per-case validation NDCG@10 with the placement (`placed`)
    and without it (`ranked`, the same cases); with the figures behind the choice."""
    from recstream.training.sequence import worth_serving

    off, gain, se = worth_serving(ranked, placed)
    base = float(np.mean(placed)) if len(placed) else 0.0
    material = gain >= MIN_COST_SHARE * base
    places = not (off and material)
    figures = {
        "placed_valid_ndcg10": round(base, 4),
        "ranked_valid_ndcg10": round(float(np.mean(ranked)) if len(ranked) else 0.0, 4),
        "placement_cost": round(gain, 4),
        "placement_cost_se": round(se, 4),
    }
    return places, figures


def choose_placement(
    ranker: Any,
    retrieval: Any,
    ctx: Any,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    depth: int,
    times: Sequence[float | None],
) -> tuple[bool, dict[str, float]]:
    """`placement_decision` on validation lists of the ranker alone, built and scored as served."""
    from recstream.eval.metrics import target_ranks
    from recstream.eval.stats import ndcg_gains
    from recstream.training.ranker import listed_scores, ranked_slates

    scores, slates = ranked_slates(ranker, retrieval, ctx, histories, depth, times)
    placed = ndcg_gains(target_ranks(listed_scores(scores, slates, 1.0), targets, histories))
    ranked = ndcg_gains(target_ranks(listed_scores(scores, slates, None), targets, histories))
    places, figures = placement_decision(placed, ranked)
    figures["new_item_share_top10"] = round(new_item_share(slates), 4)
    log.info("new-item placement on validation: %s -> %s", figures, "placed" if places else "ranked by the ranker")
    return places, figures


def new_item_share(slates: Sequence[Any], factor: float | None = 1.0, k: int = 10) -> float:
    """Share of the top-k slots of the lists (new items placed at `factor`) that hold an item nobody
    has interacted with."""
    shown = new = 0
    for slate in slates:
        top = slate.order(factor)[:k]
        fresh = set(slate.candidates[slate.is_new].tolist())
        shown += len(top)
        new += sum(int(i) in fresh for i in top)
    return new / max(1, shown)
