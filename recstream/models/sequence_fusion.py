"""How the sequence model's scores join a ranked list, in numpy alone (the worker imports this
without torch): the history's wire form, its candidates, and the fused order. The model itself is
recstream.models.sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

#: The version folder's file of item ids, one per row of the model's scores.
ITEM_IDS_FILE = "item_ids.json"


class SequenceFusion(BaseModel):
    """How the sequence model joins the ranked list (chosen on validation by `make train`)."""

    candidates: int = Field(0, ge=0, description="Its best unseen items added to each list the ranker reorders")
    weight: float = Field(0.0, ge=0.0, description="Weight of its z-scored score beside the ranker's in the order")

    @property
    def active(self) -> bool:
        return self.candidates > 0 or self.weight > 0


def left_pad(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Last `length` items of each sequence, shifted by +1 (0 = padding), left-padded."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = np.asarray(s[-length:], dtype=np.int64)
        if len(s):
            out[r, length - len(s) :] = s + 1
    return out


def standardised(x: np.ndarray) -> np.ndarray:
    """z-scores over the finite entries; NaN (no opinion) becomes 0."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    out = np.zeros_like(x)
    if ok.sum() > 1:
        sd = x[ok].std()
        out[ok] = (x[ok] - x[ok].mean()) / (sd if sd > 1e-12 else 1.0)
    return out


def fused_scores(ranker_scores: np.ndarray, sequence_scores: np.ndarray, weight: float) -> np.ndarray:
    """The order of a list: the ranker's z-scored logits plus `weight` x the sequence model's
    z-scored scores over the same candidates (z-scores: the two scales are unrelated)."""
    if weight <= 0:
        return np.asarray(ranker_scores, dtype=np.float64)
    return standardised(ranker_scores) + weight * standardised(sequence_scores)


def sequence_candidates(scores: np.ndarray, exclude: np.ndarray, n: int) -> np.ndarray:
    """Rows of the `n` best-scored items outside `exclude` (untrained items never qualify), best first."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    s = np.array(scores, dtype=np.float64, copy=True)
    s[~np.isfinite(s)] = -np.inf
    exclude = np.asarray(exclude, dtype=np.int64)
    s[exclude[(exclude >= 0) & (exclude < len(s))]] = -np.inf
    n = min(n, int(np.isfinite(s).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-s, n - 1)[:n]
    return top[np.argsort(-s[top], kind="stable")].astype(np.int64)
