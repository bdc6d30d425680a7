"""The served hybrid search: the fused score `make bench-search` tunes, computed per request.

Offline, a search scores the whole catalogue with z(dense) + lexical * z(BM25) + popularity *
z(log-popularity) + session * z(session similarity), each signal z-scored over the catalogue for
that query. Serving gives each candidate exactly that number without scoring every item:

* the mean and spread of q . v over the catalogue follow from the item vectors' mean and covariance
  (mean = q . mu, std = sqrt(q^T C q)), so the dense and session terms are linear in the item vector
  and their sum is ONE vector search with w = q / std_q + session * s / std_s;
* BM25 scores every item anyway (bm25s, sparse), so its mean and spread are exact;
* popularity's mean and spread are the catalogue's, from the same snapshot.

Candidates are the vector search's top-N for w plus BM25's top-N; each gets the exact fused score
and the contribution of each signal as its `reasons`. An item that only popularity would lift into
the top k is not retrieved (the served weights give popularity 0). The session term uses s . v for
every item, where the offline session score replaces it for items without a learned ID residual
(the two-tower's cold-item rule): for those few items the served score is not the offline one.
The snapshot (vectors, texts, popularity) is rebuilt when the catalogue changes (~30-40 ms for
1,700 items, streams.hybrid_search).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from recstream.recommend.candidates import CandidateFilter, FilterColumns
from recstream.search.scoring import BM25Index

#: The text_encoder config parameter that carries the weights (written by export_query_encoder).
WEIGHTS_PARAMETER = "search_weights"


class SearchWeights(BaseModel):
    """Fusion weights of the served search, chosen on validation by `make bench-search --export`."""

    lexical: float = Field(0.0, ge=0, description="BM25 (z-scored)")
    popularity: float = Field(0.0, ge=0, description="log(1 + interactions) (z-scored)")
    session: float = Field(0.0, ge=0, description="session vector . item vector (z-scored)")

    @classmethod
    def from_bench(cls, weights: dict[str, float]) -> SearchWeights:
        """From the bench's tuned knobs (alpha: BM25, beta: popularity, lambda: session)."""
        return cls(
            lexical=weights.get("alpha", 0.0), popularity=weights.get("beta", 0.0), session=weights.get("lambda", 0.0)
        )

    @classmethod
    def from_model_config(cls, cfg: dict) -> SearchWeights | None:
        """From a Triton model config (JSON form); None when the model carries none."""
        raw = cfg.get("parameters", {}).get(WEIGHTS_PARAMETER, {}).get("string_value")
        return cls.model_validate(json.loads(raw)) if raw else None


@dataclass
class Scored:
    scores: np.ndarray
    reasons: list[dict[str, float]]
    cosines: np.ndarray  # query . item of each candidate (a search's retrieval_score)


def _std(x: np.ndarray) -> float:
    return float(np.std(x)) if len(x) else 0.0


class HybridSearch:
    """A catalogue snapshot and the weights; scores candidates of one search exactly as offline."""

    def __init__(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str],
        popularity: np.ndarray,
        weights: SearchWeights,
        payloads: Sequence[dict] | None = None,
    ) -> None:
        if not (len(item_ids) == len(vectors) == len(texts) == len(popularity)):
            raise ValueError("item_ids, vectors, texts and popularity must cover the same items")
        self.item_ids = list(item_ids)
        self.row_of = {i: n for n, i in enumerate(self.item_ids)}
        # The payloads' filterable fields, so that the lexical half honours a request's filter.
        self.columns = FilterColumns.of(self.item_ids, payloads) if payloads is not None else None
        self.weights = weights
        v = np.asarray(vectors, np.float64)
        self.mean = v.mean(axis=0) if len(v) else np.zeros(v.shape[1])
        self.cov = np.cov(v, rowvar=False, bias=True) if len(v) > 1 else np.zeros((v.shape[1], v.shape[1]))
        self.bm25 = BM25Index(texts) if weights.lexical and len(texts) else None
        logpop = np.log1p(np.asarray(popularity, np.float64))
        self.pop_mean, self.pop_std = float(logpop.mean()) if len(logpop) else 0.0, _std(logpop)

    def __len__(self) -> int:
        return len(self.item_ids)

    def _moments(self, vec: np.ndarray | None) -> tuple[float, float]:
        if vec is None:
            return 0.0, 0.0
        q = np.asarray(vec, np.float64)
        return float(q @ self.mean), float(np.sqrt(max(q @ self.cov @ q, 0.0)))

    def retrieval_vector(self, query_vec: np.ndarray, session_vec: np.ndarray | None) -> np.ndarray:
        """w such that w . v orders items by the fused dense + session terms."""
        _, sd_q = self._moments(query_vec)
        w = np.asarray(query_vec, np.float64) / sd_q if sd_q > 0 else np.zeros(len(query_vec))
        _, sd_s = self._moments(session_vec)
        if session_vec is not None and self.weights.session and sd_s > 0:
            w = w + self.weights.session * np.asarray(session_vec, np.float64) / sd_s
        return w.astype(np.float32)

    def lexical(self, query: str) -> np.ndarray | None:
        """BM25 over the snapshot's items (None without a lexical weight)."""
        return None if self.bm25 is None else self.bm25.scores([query])[0]

    def lexical_top(self, lexical: np.ndarray | None, n: int, filt: CandidateFilter | None = None) -> list[str]:
        """The item ids of the n best BM25 scores above 0 among the items `filt` allows (the lexical
        half of the candidates). The filter is applied before the cut: a filtered search's exact
        title match may rank below n items the filter refuses. Needs the snapshot's payloads."""
        if lexical is None or n <= 0:
            return []
        keep = lexical > 0
        if filt is not None:
            if self.columns is None:
                raise ValueError("a filtered lexical_top needs the snapshot's payloads")
            keep &= filt.allows_rows(self.columns)
        hits = np.flatnonzero(keep)
        best = hits[np.argsort(-lexical[hits], kind="stable")[:n]]
        return [self.item_ids[i] for i in best]

    def score(
        self,
        query_vec: np.ndarray,
        session_vec: np.ndarray | None,
        lexical: np.ndarray | None,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        popularity: np.ndarray,
    ) -> Scored:
        """Fused z-scores of candidates (+ each signal's weighted contribution)."""
        v = np.asarray(vectors, np.float64).reshape(len(item_ids), len(self.mean))  # 0 candidates: (0, d)
        parts: dict[str, np.ndarray] = {}
        mean_q, sd_q = self._moments(query_vec)
        cosines = v @ np.asarray(query_vec, np.float64)
        parts["dense"] = (cosines - mean_q) / sd_q if sd_q > 0 else np.zeros(len(v))
        w = self.weights
        if w.lexical and lexical is not None:
            sd_b = _std(lexical)
            rows = self.row_of
            raw = np.array([lexical[rows[i]] if i in rows else 0.0 for i in item_ids], np.float64)
            parts["lexical"] = w.lexical * (raw - lexical.mean()) / sd_b if sd_b > 0 else np.zeros(len(v))
        if w.popularity and self.pop_std > 0:
            logpop = np.log1p(np.asarray(popularity, np.float64))
            parts["popularity"] = w.popularity * (logpop - self.pop_mean) / self.pop_std
        mean_s, sd_s = self._moments(session_vec)
        if w.session and session_vec is not None and sd_s > 0:
            parts["session"] = w.session * (v @ np.asarray(session_vec, np.float64) - mean_s) / sd_s
        total = np.sum(list(parts.values()), axis=0)
        reasons = [{k: round(float(p[n]), 4) for k, p in parts.items()} for n in range(len(v))]
        return Scored(total.astype(np.float32), reasons, cosines.astype(np.float32))
