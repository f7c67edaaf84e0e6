"""Every topic and consumer-group name pubrelay uses, built in one place.

Topics start with the bus's topic prefix (``PUBRELAY_BUS__TOPIC_PREFIX``, ``voucherify.``
by default):

* ``<prefix><event type>``: verified events, e.g. ``voucherify.customer.publication.succeeded``;
* ``<prefix>quarantine``: signed bodies that cannot be routed, with the reason in a header;
* ``<prefix>dlq.<handler>``: the events a handler failed (its dead letters);
* ``<prefix>retry.<handler>``: dead letters replayed to that one handler.

Consumer groups start with the worker's group prefix (``PUBRELAY_WORKER__GROUP_PREFIX``,
``pubrelay.`` by default):

* ``<group prefix><handler>``: the handler's worker (each handler reads at its own pace);
* ``<group prefix>replay.<handler>``: remembers which dead letters were replayed;
* ``<group prefix>quarantine-release``: remembers which quarantined records were released.
"""

from __future__ import annotations

from typing import Final

DEFAULT_TOPIC_PREFIX: Final = "voucherify."
DEFAULT_GROUP_PREFIX: Final = "pubrelay."

QUARANTINE_TOPIC: Final = "quarantine"
DLQ_TOPIC_PREFIX: Final = "dlq."
RETRY_TOPIC_PREFIX: Final = "retry."
INTERNAL_TOPICS: Final = (QUARANTINE_TOPIC, DLQ_TOPIC_PREFIX, RETRY_TOPIC_PREFIX)
"""What no event type may start with: its topic would be one of pubrelay's own."""


def topic_for(prefix: str, event_type: str) -> str:
    """The topic an event of ``event_type`` is published to."""
    return prefix + event_type


def quarantine_topic(prefix: str) -> str:
    """Where signed bodies that cannot be routed are kept."""
    return prefix + QUARANTINE_TOPIC


def dlq_topic(prefix: str, handler: str) -> str:
    """Where a handler's failed events are kept: ``<prefix>dlq.<handler>``."""
    return f"{prefix}{DLQ_TOPIC_PREFIX}{handler}"


def retry_topic(prefix: str, handler: str) -> str:
    """Where replay puts events back for one handler only: ``<prefix>retry.<handler>``."""
    return f"{prefix}{RETRY_TOPIC_PREFIX}{handler}"


def consumer_group(group_prefix: str, handler: str) -> str:
    """The consumer group of one handler (each handler reads at its own pace)."""
    return f"{group_prefix}{handler}"


def replay_group(group_prefix: str, handler: str) -> str:
    """The consumer group that remembers which dead letters were replayed."""
    return f"{group_prefix}replay.{handler}"


def quarantine_release_group(group_prefix: str) -> str:
    """The consumer group that remembers which quarantined records were released."""
    return f"{group_prefix}quarantine-release"


def is_kept_topic(prefix: str, topic: str) -> bool:
    """Whether ``topic`` holds records that wait for a human (quarantine, dead letters):
    a bus must keep them until someone acts, never expire them by age."""
    return topic == quarantine_topic(prefix) or topic.startswith(prefix + DLQ_TOPIC_PREFIX)
