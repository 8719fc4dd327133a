"""Surge: Kafka-driven, dynamically batching inference workers."""

__version__ = "0.1.0"
