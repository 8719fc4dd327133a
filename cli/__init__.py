"""Surge: Kafka-driven, dynamically batching inference workers."""

__version__ = "0.2.0"
