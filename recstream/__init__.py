"""recstream: event-streaming real-time search and recommendation.

The shared library every role imports: contracts (events, topics, settings), the Kafka client,
models and the pure recommendation logic. Services (`services/`) and stream processors
(`streams/`) only orchestrate I/O around it.
"""

__version__ = "0.1.0"
