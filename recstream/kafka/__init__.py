"""Kafka plumbing shared by applications, services and stream processors (confluent-kafka)."""
