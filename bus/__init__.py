"""The transport: one ``Bus`` protocol, a Kafka implementation and the embedded SQLite log."""

from __future__ import annotations

from pathlib import Path

from bus.config import BusSettings
from bus.types import Bus, Message, Subscription, TopicPartition

__all__ = ["Bus", "BusSettings", "Message", "Subscription", "TopicPartition", "create_bus"]


def create_bus(settings: BusSettings, sqlite_path: Path) -> Bus:
    """The bus ``settings.url`` names: Kafka for ``kafka://``, else the embedded log."""
    if settings.kind == "kafka":
        from bus.kafka import KafkaBus  # noqa: PLC0415 - aiokafka loads only when used

        return KafkaBus(settings)
    from bus.sqlite import SqliteBus  # noqa: PLC0415 - symmetric with the Kafka import

    return SqliteBus(
        sqlite_path,
        publish_timeout_s=settings.publish_timeout_s,
        retention_s=settings.retention_s,
        poll_interval_s=settings.poll_interval_s,
    )
