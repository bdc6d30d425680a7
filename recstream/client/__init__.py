"""The application SDK: send events, consume validated events, ask for recommendations.

Public names: EventProducer, EventConsumer, ConsumedEvent, RecommendationClient, DeliveryError, TopicUnavailable.
"""

from recstream.client.consumer import ConsumedEvent, EventConsumer
from recstream.client.producer import DeliveryError, EventProducer
from recstream.client.recommendations import RecommendationClient, TopicUnavailable

__all__ = [
    "ConsumedEvent",
    "DeliveryError",
    "EventConsumer",
    "EventProducer",
    "RecommendationClient",
    "TopicUnavailable",
]
