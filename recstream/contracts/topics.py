"""The topic registry: every topic's name, key, value schema, partitions and cleanup, declared once.

Keys keep one user's events on one partition so they are processed in order; the catalog is keyed
by item so upserts/deletes of one item stay ordered and compaction keeps the latest state.
Derived names (dead letters) come from one function, never from string literals elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import TypeAdapter

from recstream.contracts.events import (
    BehaviourEvent,
    CatalogEvent,
    DeadLetter,
    ItemDelete,
    RankingLog,
    RecommendationRequest,
    RecommendationResult,
    TrainingExample,
)

DEAD_LETTER_SUFFIX = ".dlq"


@dataclass(frozen=True)
class TopicSpec:
    logical: str
    value_type: Any
    key_field: str
    partitions: int
    cleanup_policy: Literal["delete", "compact"] = "delete"
    retention_ms: int = 7 * 24 * 3600 * 1000
    description: str = ""
    retention_bytes: int = -1  # per partition; -1 = bounded by time only
    # consumers check that the key is the event's key field and the partition Kafka's murmur2
    # partitioner gives it (per-user state is per partition); a misplaced event is dead-lettered
    keyed_placement: bool = False
    # what a tombstone (null value) with this key means; None = nothing, it is dead-lettered
    tombstone: Callable[[str], Any] | None = field(default=None, compare=False)
    adapter: TypeAdapter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", TypeAdapter(self.value_type))

    def name(self, prefix: str = "") -> str:
        return topic_name(self.logical, prefix)

    def config(self) -> dict[str, str]:
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "retention.bytes": str(self.retention_bytes),
        }


def topic_name(logical: str, prefix: str = "") -> str:
    return f"{prefix}{logical}"


def dead_letter_topic(source_topic: str) -> str:
    """The dead-letter topic of a (full, prefixed) topic name."""
    return f"{source_topic}{DEAD_LETTER_SUFFIX}"


CATALOG = TopicSpec(
    "catalog",
    CatalogEvent,
    "item_id",
    2,
    "compact",
    -1,
    "Item upserts and deletes (latest state per item); a tombstone (key = item_id, null value), the usual "
    "delete on a compacted topic, deletes the item like an ItemDelete",
    tombstone=lambda key: ItemDelete(item_id=key),
)
REQUESTS = TopicSpec(
    "requests",
    RecommendationRequest,
    "user_id",
    4,
    description="Search queries and recommendation requests",
    keyed_placement=True,
)
BEHAVIOUR = TopicSpec(
    "behaviour",
    BehaviourEvent,
    "user_id",
    4,
    description="Impressions, views, clicks, carts, purchases",
    keyed_placement=True,
)
RECOMMENDATIONS = TopicSpec(
    "recommendations", RecommendationResult, "user_id", 4, description="Ranked results for applications"
)
TRAINING_EXAMPLES = TopicSpec(
    "training-examples", TrainingExample, "user_id", 2, description="Impressions joined with outcomes"
)
RANKING_LOG = TopicSpec(
    "ranking-log",
    RankingLog,
    "user_id",
    2,
    # ~9 KB per answer: at 200 answers/s with RANKING_LOG=all a day would be ~155 GB. Off-policy
    # estimates need thousands of answers and the trainer reads it live, so a day or 8 GiB per
    # partition (~2.5 h at that rate), whichever comes first.
    retention_ms=24 * 3600 * 1000,
    retention_bytes=8 * 1024**3,
    description="Candidate pools of exploring answers (off-policy evaluation), ranker inputs of answers (training)",
)
DEAD_LETTERS = TopicSpec(
    "dead-letters",
    DeadLetter,
    "source_topic",
    1,
    retention_ms=30 * 24 * 3600 * 1000,
    description="Template for <topic>.dlq topics",
)

TOPICS: dict[str, TopicSpec] = {
    t.logical: t for t in (CATALOG, REQUESTS, BEHAVIOUR, RECOMMENDATIONS, TRAINING_EXAMPLES, RANKING_LOG)
}


def all_topic_names(prefix: str = "") -> list[str]:
    """Every topic the system uses, dead letters included."""
    names = []
    for spec in TOPICS.values():
        names.append(spec.name(prefix))
        names.append(dead_letter_topic(spec.name(prefix)))
    return names
