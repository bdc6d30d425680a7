"""The served sequence model (recstream.models.sequence): trained as the `sasrec-id` baseline is, on
the same training data and budget rule, and joined to the ranked list as validation says.

The fusion grid is the one the probe of bench/README.md ("SASRec as a candidate source") searched:
adding its candidates and weighing its score each moved validation NDCG@10 by about as much as
the 943 validation cases can separate, so (0, 0) -- the ranker alone -- stays a candidate and wins
ties. The best other setting must also beat it by more than the noise of the choice
(`MIN_GAIN_SE`): the sequence model costs a second model call per request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from recstream.models.sequence import SequenceScorer
from recstream.models.sequence_fusion import SequenceFusion

log = logging.getLogger(__name__)

#: Sequence candidates per list, and weights of its score in the order, that validation chooses from.
FUSION_CANDIDATES = (0, 10, 25, 50)
FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: The sequence model is served only when the best setting's validation NDCG@10 beats the ranker
#: alone's by at least this many standard errors of their paired per-case difference. A smaller gain
#: is inside the noise of picking the best of 20 settings, and does not pay for a second model call
#: per request (bench-stream at 100 requests/s: +2.1 CPU-ms per request, p99 17-20 -> 51 ms).
MIN_GAIN_SE = 1.0


def worth_serving(best: np.ndarray, alone: np.ndarray, min_se: float = MIN_GAIN_SE) -> tuple[bool, float, float]:
    """Whether per-case validation gains `best` beat `alone` (the ranker alone, same cases) by at
    least `min_se` standard errors of the paired difference; with the mean gain and that error."""
    diff = np.asarray(best, np.float64) - np.asarray(alone, np.float64)
    gain = float(diff.mean()) if len(diff) else 0.0
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    return gain > 0.0 and gain >= min_se * se, gain, se


def choose_fusion(
    ranker: Any,
    retrieval: Any,
    ctx: Any,
    sequence: SequenceScorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    depth: int,
    times: Sequence[float | None],
    new_item_slot_factor: float | None = 1.0,
) -> tuple[SequenceFusion, dict[str, float]]:
    """The (candidates, weight) of the grid with the best validation NDCG@10 of the served list
    (ranked slates, new items placed as the version will serve them: `new_item_slot_factor`, None
    for not at all; full ranking as the quality bench scores it); ties go to
    fewer candidates, then to a lower weight, and a gain over the ranker alone (0, 0) smaller than
    `MIN_GAIN_SE` standard errors keeps the ranker alone. Returns it and every setting's figure,
    with the best setting's gain over the ranker alone and its standard error."""
    from recstream.eval.metrics import target_ranks
    from recstream.eval.stats import ndcg_gains
    from recstream.training.ranker import listed_scores, ranked_slates

    figures: dict[str, float] = {}
    alone = SequenceFusion(candidates=0, weight=0.0)
    alone_gains: np.ndarray | None = None
    best: tuple[SequenceFusion, np.ndarray] | None = None
    for n in FUSION_CANDIDATES:
        fusion = SequenceFusion(candidates=n, weight=max(FUSION_WEIGHTS))
        scores, slates = ranked_slates(ranker, retrieval, ctx, histories, depth, times, sequence, fusion)
        for w in FUSION_WEIGHTS:
            listed = listed_scores(scores, slates, new_item_slot_factor, weight=w)
            per_case = ndcg_gains(target_ranks(listed, targets, histories))
            figures[f"{n},{w:g}"] = round(float(per_case.mean()), 4)
            if n == 0 and w == 0:
                alone_gains = per_case
            if best is None or per_case.mean() > best[1].mean() + 1e-12:
                best = (SequenceFusion(candidates=n, weight=w), per_case)
    assert best is not None and alone_gains is not None
    serve, gain, se = worth_serving(best[1], alone_gains)
    figures.update(gain_over_ranker_alone=round(gain, 4), gain_se=round(se, 4))
    chosen = best[0] if serve else alone
    log.info(
        "sequence fusion on validation: %s -> best %s (%+.4f over the ranker alone, SE %.4f): serving %s",
        figures,
        best[0],
        gain,
        se,
        chosen,
    )
    return chosen, figures
