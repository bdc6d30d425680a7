"""Rescoring logged pools with a candidate ranker version (the `rescore=` of recstream.ope.logs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from recstream.ope.logged import LoggedRequest, UnusableLog

#: A candidate model's logits for a logged request's pool, in pool order (UnusableLog if it cannot).
Rescorer = Callable[[LoggedRequest], np.ndarray]


class PoolRescorer:
    """Rescores logged pools with another model version, from the inputs the worker served with:
    the logged CONTEXT vector and CAND_FEATURES rows, and each item's vector (`item_vectors`, the
    catalog's text embeddings, as retrieval returned them).

    `prepare` scores many pools in a few batched forward passes (the ranker scores each candidate
    on its own, so padding changes nothing); `evaluate` calls it before asking pool by pool."""

    BATCH = 256

    def __init__(self, net: Callable[..., object], item_vectors: Mapping[str, np.ndarray]) -> None:
        self.net = net
        self.item_vectors = item_vectors
        self._scores: dict[str, np.ndarray] = {}

    def _inputs(self, lr: LoggedRequest) -> tuple[np.ndarray, np.ndarray]:
        inputs = lr.ranker_inputs()
        if any(c.item_id not in self.item_vectors for c in lr.log.pool):
            raise UnusableLog("a pool item is not in the catalog")
        return inputs

    def _forward(self, batch: Sequence[tuple[LoggedRequest, tuple[np.ndarray, np.ndarray]]]) -> list[np.ndarray]:
        import torch

        sizes = [len(lr.log.pool) for lr, _ in batch]
        width = max(sizes)
        dim = len(next(iter(self.item_vectors.values())))
        n_feat = batch[0][1][1].shape[1]
        context = np.stack([ctx for _, (ctx, _) in batch]).astype(np.float32)
        items = np.zeros((len(batch), width, dim), np.float32)
        feats = np.zeros((len(batch), width, n_feat), np.float32)
        for b, (lr, (_, f)) in enumerate(batch):
            items[b, : sizes[b]] = [self.item_vectors[c.item_id] for c in lr.log.pool]
            feats[b, : sizes[b]] = f
        with torch.inference_mode():
            out = self.net(torch.from_numpy(context), torch.from_numpy(items), torch.from_numpy(feats))
        scores = np.asarray(out, dtype=np.float64).reshape(len(batch), width)
        return [scores[b, :n] for b, n in enumerate(sizes)]

    def prepare(self, requests: Sequence[LoggedRequest]) -> None:
        """Score every usable pool now, in batches (unusable ones raise when asked for)."""
        usable = []
        for lr in requests:
            try:
                if lr.log.pool:
                    usable.append((lr, self._inputs(lr)))
            except UnusableLog:
                continue
        for start in range(0, len(usable), self.BATCH):
            chunk = usable[start : start + self.BATCH]
            self._scores.update(zip((lr.log.request_id for lr, _ in chunk), self._forward(chunk), strict=True))

    def __call__(self, lr: LoggedRequest) -> np.ndarray:
        cached = self._scores.get(lr.log.request_id)
        if cached is not None:
            return cached
        return self._forward([(lr, self._inputs(lr))])[0]
