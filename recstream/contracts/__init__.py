"""Contracts shared by every producer and consumer: event schemas and the topic registry."""

from recstream.contracts.events import (
    SCHEMA_VERSION,
    BehaviourEvent,
    BehaviourType,
    CatalogEvent,
    DeadLetter,
    ItemDelete,
    ItemUpsert,
    PoolCandidate,
    RankedItem,
    RankingLog,
    RecommendationRequest,
    RecommendationResult,
    RequestFilters,
    SearchQuery,
    TrainingExample,
)
from recstream.contracts.topics import TOPICS, TopicSpec, dead_letter_topic, topic_name

__all__ = [
    "SCHEMA_VERSION",
    "TOPICS",
    "BehaviourEvent",
    "BehaviourType",
    "CatalogEvent",
    "DeadLetter",
    "ItemDelete",
    "ItemUpsert",
    "PoolCandidate",
    "RankedItem",
    "RankingLog",
    "RecommendationRequest",
    "RecommendationResult",
    "RequestFilters",
    "SearchQuery",
    "TopicSpec",
    "TrainingExample",
    "dead_letter_topic",
    "topic_name",
]
