"""The transport: one ``Bus`` protocol, a Kafka implementation and the embedded SQLite log.

The package's names load on first use (:func:`__getattr__`): a process that needs one of
its modules loads no more than that one: the writer processes of the embedded bus
(:mod:`bus.sqlite.writer`) and of the ledger (:mod:`handlers.worker.ledger_writer`) import a
few small modules of :mod:`bus.sqlite`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.config import BusSettings
    from bus.types import Bus, Message, Subscription, TopicPartition

__all__ = ["Bus", "BusSettings", "Message", "Subscription", "TopicPartition", "create_bus"]


def __getattr__(name: str) -> Any:
    if name == "BusSettings":
        from bus.config import BusSettings  # noqa: PLC0415 - loaded on first use

        return BusSettings
    if name in {"Bus", "Message", "Subscription", "TopicPartition"}:
        from bus import types  # noqa: PLC0415 - loaded on first use

        return getattr(types, name)
    raise AttributeError(f"module 'bus' has no attribute {name!r}")


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
        kept_topics_retention_s=settings.kept_topics_retention_s,
        poll_interval_s=settings.poll_interval_s,
    )
