"""The Kafka bus: any Kafka-protocol cluster through aiokafka.

``options`` (how the clients are configured) · ``producer`` (:class:`KafkaBus`: start,
publish, recover) · ``admin`` (topics) · ``subscription`` (consumer-group members).
"""

from bus.kafka.options import GroupTiming
from bus.kafka.producer import KafkaBus

__all__ = ["GroupTiming", "KafkaBus"]
