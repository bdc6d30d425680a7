"""The served sequence model's training: the `sasrec-id` baseline's SASRec, fitted as the baseline
is (same training data and budget rule) and kept as a servable scorer. Apart from the fusion choice
(recstream.training.sequence) so that its cache key does not follow the ranker's code."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from recstream.models.sequence import SequenceScorer
from recstream.models.training import CheckpointMeta, read_meta

log = logging.getLogger(__name__)

#: The modules whose code decides the trained model (its cache key's code part).
SEQUENCE_MODEL_CODE = ("recstream.training.sequence_model", "recstream.data.split")


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
