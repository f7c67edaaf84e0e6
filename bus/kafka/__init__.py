"""The Kafka bus: any Kafka-protocol cluster through aiokafka."""

from bus.kafka.producer import GroupTiming, KafkaBus

__all__ = ["GroupTiming", "KafkaBus"]
