"""Ranking logs of greedy answers, as the worker writes them with RANKING_LOG=all: pool = the answer,
each shown item with the CAND_FEATURES row it was scored with, the CONTEXT vector, six decimals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recstream.contracts.events import PoolCandidate, RankingLog


def greedy_answer_log(
    request_id: str,
    user_id: str,
    items: Sequence[str],
    features: np.ndarray,
    context: np.ndarray,
    scores: Sequence[float] | None = None,
) -> RankingLog:
    shown = [
        PoolCandidate(
            item_id=item,
            score=0.0 if scores is None else float(scores[n]),
            features=np.round(np.asarray(features[n], np.float64), 6).tolist(),
        )
        for n, item in enumerate(items)
    ]
    return RankingLog(
        request_id=request_id,
        user_id=user_id,
        model_version="ranker-v1",
        policy_spec="greedy",
        k=len(shown),
        pool=shown,
        greedy=shown,
        context=np.round(np.asarray(context, np.float64), 6).tolist(),
    )
