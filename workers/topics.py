"""Creating the topics a worker needs, when the deployment lets it."""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from surge.config import KafkaSettings

log = structlog.get_logger("surge.topics")


class CannotCreateTopic(Exception):
    """The cluster refused to create a topic (replication factor, policy, authorisation)."""


async def ensure_topics(
    kafka: KafkaSettings, names: Iterable[str], partitions: int, replication_factor: int
) -> None:
    """Create the missing topics among `names`."""
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(set(names) - existing)
        if not missing:
            return
        topics = [NewTopic(n, partitions, replication_factor) for n in missing]
        response = await admin.create_topics(topics)
        for topic, code, message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):  # another worker may win a race
                raise CannotCreateTopic(f"cannot create topic {topic!r}: error {code} {message}")
        log.info("topics_created", topics=missing, partitions=partitions)
    finally:
        await admin.close()
