"""Pure recommendation logic: session features, candidate filters, scoring, re-ranking, feedback joins.

Nothing here does I/O, so the stream agents (streams/) stay thin and every rule is unit-testable,
and a test can recompute what a worker should have produced in-process and compare.
"""

from recstream.recommend.candidates import CandidateFilter, build_filter
from recstream.recommend.feedback import PendingImpression, impression_key
from recstream.recommend.rerank import diversify
from recstream.recommend.scoring import Candidate, HeuristicRanker, RankContext
from recstream.recommend.session import EVENT_WEIGHTS, SessionState, apply_event

__all__ = [
    "EVENT_WEIGHTS",
    "Candidate",
    "CandidateFilter",
    "HeuristicRanker",
    "PendingImpression",
    "RankContext",
    "SessionState",
    "apply_event",
    "build_filter",
    "diversify",
    "impression_key",
]
