"""The served sequence model (recstream.models.sequence): trained as the `sasrec-id` baseline is, on
the same training data and budget rule, and joined to the ranked list as validation says.

The fusion grid is the one the probe of bench/README.md ("SASRec as a candidate source") searched:
adding its candidates and weighing its score each moved validation NDCG@10 by about as much as
the 943 validation cases can separate, so (0, 0) -- the ranker alone -- stays a candidate and wins
ties.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recstream.models.sequence import SequenceScorer
from recstream.models.sequence_fusion import SequenceFusion
from recstream.models.training import CheckpointMeta, read_meta

log = logging.getLogger(__name__)

#: Sequence candidates per list, and weights of its score in the order, that validation chooses from.
FUSION_CANDIDATES = (0, 10, 25, 50)
FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def train_sequence_model(split: Any, seed: int, path: Path, key: str) -> tuple[SequenceScorer, dict[str, float]]:
    """The `sasrec-id` baseline's model for `seed` on `split`, as a servable scorer (cached at `path`
    under `key`)."""
    from recstream.eval.baselines import SASRecID

    meta = read_meta(path)
    if meta is not None and meta.data_hash == key:
        log.info("reusing %s", path)
        return SequenceScorer.load(path), dict(meta.metrics)
    t0 = time.perf_counter()
    model = SASRecID(seed=seed).fit(split)
    trained = np.bincount(split.train["item_idx"].to_numpy(np.int64), minlength=split.n_items) > 0
    scorer = SequenceScorer(model.net, split.item_ids, trained)
    stats = {
        "valid_ndcg10": float(model.info["best_val_ndcg10"]),
        "best_epoch": float(model.info["best_epoch"]),
        "train_seconds": time.perf_counter() - t0,
    }
    scorer.save(path, CheckpointMeta(kind="sequence", config=model.config.model_dump(), data_hash=key, metrics=stats))
    return scorer, stats


def choose_fusion(
    ranker: Any,
    retrieval: Any,
    ctx: Any,
    sequence: SequenceScorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    depth: int,
    times: Sequence[float | None],
) -> tuple[SequenceFusion, dict[str, float]]:
    """The (candidates, weight) of the grid with the best validation NDCG@10 of the served list
    (ranked slates, new items placed, full ranking as the quality bench scores it); ties go to
    fewer candidates, then to a lower weight. Returns it and every setting's figure."""
    from recstream.eval.metrics import metrics_from_ranks, target_ranks
    from recstream.training.ranker import listed_scores, ranked_slates

    figures: dict[str, float] = {}
    best: tuple[float, SequenceFusion] | None = None
    for n in FUSION_CANDIDATES:
        fusion = SequenceFusion(candidates=n, weight=max(FUSION_WEIGHTS))
        scores, slates = ranked_slates(ranker, retrieval, ctx, histories, depth, times, sequence, fusion)
        for w in FUSION_WEIGHTS:
            full = listed_scores(scores, slates, weight=w)
            ndcg = float(metrics_from_ranks(target_ranks(full, targets, histories))["NDCG@10"])
            figures[f"{n},{w:g}"] = round(ndcg, 4)
            if best is None or ndcg > best[0] + 1e-12:
                best = (ndcg, SequenceFusion(candidates=n, weight=w))
    assert best is not None
    log.info("sequence fusion on validation: %s -> %s (NDCG@10 %.4f)", figures, best[1], best[0])
    return best[1], figures
