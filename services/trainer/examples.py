"""Training examples as the learner sees them: decoded from the training-examples topic, with the
ranker inputs they were served with (from the ranking log) or rebuilt from the catalog."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from recstream.continual import Example
from recstream.contracts.events import ItemUpsert, RankingLog, TrainingExample
from recstream.models.ranker import AFFINITY_WINDOW, CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES, candidate_features

log = logging.getLogger(__name__)


def example_from_event(ev: TrainingExample) -> Example:
    return Example(
        user=ev.user_id,
        item=ev.item_id,
        position=ev.position,
        propensity=ev.propensity,
        label=ev.label,
        model_version=ev.model_version,
        ts_ms=ev.ts_ms,
        context_items=tuple(ev.context_items),
        request_id=ev.request_id,
        query=ev.query or None,
    )


class CatalogFeatures:
    """FeatureSource for logged impressions: item vectors from the catalog's texts by the encoder the
    indexer uses (the served item encoder); the context and per-candidate features the ranker was
    served with when the example carries them (logged in the ranking log, the default), otherwise
    rebuilt: session = mean vector of the context items, features from the same
    `candidate_features` the serving path uses; a search's query (when the joiner knew it) is
    encoded into the context's second half and is what its candidates were retrieved by, as at
    serving. A rebuild is an approximation: serving's session vector comes from the session
    encoder, its popularity and trend counts from the worker's tables, and the rebuild leaves the
    co-visitation feature at 0."""

    #: Query vectors kept between rounds (a query's examples arrive over a feedback window).
    QUERY_CACHE = 10_000

    def __init__(self, encode: Callable[[list[str]], np.ndarray] | None = None, model_repo: Path | None = None) -> None:
        """`encode`: texts -> vectors (queries; items too when no `model_repo` is given). With
        `model_repo`, items are embedded as the catalog indexer embeds them (its item encoder)."""
        self._encode = encode
        self._model_repo = model_repo
        self.vectors: dict[str, np.ndarray] = {}
        self.texts: dict[str, str] = {}  # every known item's text: re-encoded when the encoder changes
        self.encoded_with: int | None = None  # the item_encoder version the vectors come from
        self.categories: dict[str, str] = {}
        self.counts: dict[str, float] = {}
        self.max_count = 1.0  # counts only grow; 1 until any, as `candidate_features` expects
        self._pending: dict[str, str] = {}
        self.query_vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def _encoder(self) -> Callable[[list[str]], np.ndarray]:
        if self._encode is None:
            from recstream.models.encoder import TextEncoder

            enc = TextEncoder()
            self._encode = enc.encode
        return self._encode

    def upsert(self, item: ItemUpsert) -> None:
        self._pending[item.item_id] = self.texts[item.item_id] = item.text()
        self.categories[item.item_id] = item.category

    def delete(self, item_id: str) -> None:
        self._pending.pop(item_id, None)
        self.vectors.pop(item_id, None)
        self.texts.pop(item_id, None)

    def flush(self) -> int:
        """Encode pending item texts (batched); returns how many. When a newer item_encoder version
        is in the repository, every known item is encoded again: the stream workers re-embed the
        catalogue with it, and vectors of two versions would mix two spaces in one round (the
        candidate, the gate and the off-policy rescoring all read them)."""
        if self._model_repo is not None:
            from recstream.contracts.models import ITEM_ENCODER
            from recstream.models.repository import versions

            newest = max(versions(self._model_repo, ITEM_ENCODER), default=None)
            if newest != self.encoded_with:
                if self.vectors:
                    log.info("item_encoder v%s is newer: re-encoding %d items", newest, len(self.texts))
                    self._pending.update(self.texts)
                self.encoded_with = newest
        if not self._pending:
            return 0
        ids, texts = list(self._pending), list(self._pending.values())
        if self._model_repo is not None:
            from recstream.models.served import item_vectors_as_indexed

            vecs = np.asarray(item_vectors_as_indexed(self._model_repo, texts, ids), dtype=np.float32)
        else:
            vecs = np.asarray(self._encoder()(texts), dtype=np.float32)
        self.vectors.update(zip(ids, vecs, strict=True))
        self._pending.clear()
        return len(ids)

    def observe(self, ex: Example) -> None:
        """Count the example's click, after noting on it the counts it is rebuilt with: built from
        the counts at round time, every clicked item had at least 1 and an ignored one often 0,
        so the popularity feature held the label (weighted AUC 0.82 on labels unrelated to the
        item) and the gate, whose held-back window had the same leak, rewarded leaning on it."""
        ex.counts_before = (self.counts.get(ex.item, 0.0), self.max_count)
        if ex.label > 0:
            count = self.counts.get(ex.item, 0.0) + 1.0
            self.counts[ex.item] = count
            self.max_count = max(self.max_count, count)

    def knows(self, ex: Example) -> bool:
        return ex.item in self.vectors or ex.item in self._pending

    def _queries(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        """Vectors of the queries of the examples to rebuild (new ones encoded in one batch)."""
        wanted = {ex.query for ex in examples if ex.query and (ex.context is None or ex.cand_features is None)}
        new = [q for q in wanted if q not in self.query_vectors]
        if new:
            vecs = np.asarray(self._encoder()(new), dtype=np.float32)
            self.query_vectors.update(zip(new, vecs, strict=True))
        for q in wanted:
            self.query_vectors.move_to_end(q)
        while len(self.query_vectors) > max(self.QUERY_CACHE, len(wanted)):
            self.query_vectors.popitem(last=False)
        return {q: self.query_vectors[q] for q in wanted}

    def build(self, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.flush()
        queries = self._queries(examples)
        zeros = np.zeros(ITEM_DIM, np.float32)
        ctx = np.zeros((len(examples), 2 * ITEM_DIM), np.float32)
        cand = np.zeros((len(examples), ITEM_DIM), np.float32)
        feats = np.zeros((len(examples), N_CAND_FEATURES), np.float32)
        for r, ex in enumerate(examples):
            v = self.vectors.get(ex.item, zeros)
            cand[r] = v
            if ex.context is not None and ex.cand_features is not None:
                ctx[r], feats[r] = ex.context, ex.cand_features
                continue
            hist = [i for i in ex.context_items if i in self.vectors][-AFFINITY_WINDOW:]
            if hist:
                s = np.mean([self.vectors[i] for i in hist], axis=0)
                ctx[r, :ITEM_DIM] = s / (np.linalg.norm(s) + 1e-9)
            retrieved_by = ctx[r, :ITEM_DIM]
            if ex.query:  # a search: retrieved by its query, which is the context's second half
                ctx[r, ITEM_DIM:] = retrieved_by = queries[ex.query]
            count, max_count = ex.counts_before or (self.counts.get(ex.item, 0.0), self.max_count)
            feats[r] = candidate_features(
                np.array([float(retrieved_by @ v)]),
                np.array([count]),
                [self.categories.get(ex.item, "unknown")],
                [self.categories.get(i, "unknown") for i in hist],
                max_count,
            )[0]
        return ctx, cand, feats


class ServedInputs:
    """The ranker's inputs per answer, from the ranking log, until the answer's training examples
    arrive (the feedback window closes ~30 s after the impression): request id -> (CONTEXT [768],
    item -> CAND_FEATURES row). Bounded by age and count; float16 (~3.3 KB per answer of 10)."""

    def __init__(self, ttl_s: float = 120.0, capacity: int = 50_000) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._by_request: OrderedDict[str, tuple[float, np.ndarray, dict[str, np.ndarray]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_request)

    def add(self, rl: RankingLog, now: float | None = None) -> None:
        if rl.context is None:
            return
        rows = {c.item_id: np.asarray(c.features, np.float16) for c in [*rl.pool, *rl.greedy] if c.features is not None}
        widths = {len(row) for row in rows.values()}
        if len(rl.context) != CONTEXT_DIM or widths - {N_CAND_FEATURES}:
            # another ranker's inputs (an older worker, another feature schema): learning from them
            # would fail every round that samples one; the examples are rebuilt from the catalog
            log.warning(
                "ranking log %s: inputs of another shape (context %d, features %s; expected %d, %d): not used",
                rl.request_id,
                len(rl.context),
                sorted(widths),
                CONTEXT_DIM,
                N_CAND_FEATURES,
            )
            return
        now = time.monotonic() if now is None else now
        self._by_request[rl.request_id] = (now, np.asarray(rl.context, np.float16), rows)
        self._by_request.move_to_end(rl.request_id)
        while self._by_request and (
            len(self._by_request) > self.capacity or next(iter(self._by_request.values()))[0] < now - self.ttl_s
        ):
            self._by_request.popitem(last=False)

    def attach(self, ex: Example) -> bool:
        """Give the example the inputs its item was served with; False if they are not known."""
        found = self._by_request.get(ex.request_id)
        row = found[2].get(ex.item) if found is not None else None
        if row is None:
            return False
        # float16 and shared by the answer's examples (the replay buffer holds tens of thousands);
        # `build` widens them to float32.
        ex.context = found[1]  # type: ignore[index]
        ex.cand_features = row
        return True
