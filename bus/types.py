"""The transport contract: one ``Bus`` protocol that the Kafka and the embedded bus implement.

A bus publishes with an acknowledgement (``publish`` returns only once the record is
durable) and lets consumer groups read topics with explicit commits (at-least-once). A
bus may also take a record without a coroutine (:class:`SubmittingBus`: both of
pubrelay's do); :func:`submitter` gives every bus that shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Final, NamedTuple, Protocol, runtime_checkable

from schemas.frozen import frozen
from schemas.record import Headers

UNREADY_AFTER_FAILED_PUBLISH_S: Final = 30.0
"""After a publish the bus refused (a full disk, a Kafka partition short of in-sync
replicas), ``ping`` fails for this long unless a publish succeeds first, so ``/readyz``
says what every publish meets. Not longer: a balancer that stops sending on ``/readyz``
would leave no publish to show the bus is back."""


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@frozen
class Message:
    """One record read from the bus."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


RevokeCallback = Callable[[Collection[TopicPartition]], Awaitable[None]]
"""Called before partitions are taken from a subscription, so in-flight work can be
finished and committed. The embedded bus never revokes."""


class Subscription(Protocol):
    """A consumer-group member reading some topics.

    ``fetch`` returns records after the last one fetched (starting from the group's
    committed offsets); ``commit`` stores, per partition, the offset of the next record
    to read. A record whose offset was not committed is delivered again after a restart
    or a rebalance.
    """

    group: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def fetch(self, *, max_records: int = 500, timeout_s: float = 1.0) -> list[Message]:
        """Wait up to ``timeout_s`` for records; return at most ``max_records`` (maybe none)."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Store the next offset to read for each partition."""
        ...

    async def lag(self) -> Mapping[TopicPartition, int]:
        """Records not yet committed by this group, per assigned partition."""
        ...


class Bus(Protocol):
    """A durable log of topics."""

    async def start(self) -> None:
        """Connect; raise :class:`schemas.errors.BusUnavailable` when the bus cannot be used."""
        ...

    async def close(self) -> None:
        """Flush what is pending and release every resource."""
        ...

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> None:
        """Append one record and return once the bus has made it durable.

        Raises :class:`schemas.errors.BusUnavailable` when the record could not be
        acknowledged within ``timeout_s`` (or the bus's default); the caller must then
        treat the record as not stored.
        """
        ...

    async def ping(self) -> None:
        """Raise :class:`schemas.errors.BusUnavailable` if the bus cannot be reached now, or
        refused a publish within :data:`UNREADY_AFTER_FAILED_PUBLISH_S` and has stored none
        since."""
        ...

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Make sure the topics exist (creating them when allowed), or raise ``TopicMissing``."""
        ...

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> Subscription:
        """A new (not yet started) member of consumer group ``group``."""
        ...


class Submit(Protocol):
    """:meth:`Bus.publish` without a coroutine: the future is settled as ``publish``
    returns or raises. The record is taken whether or not the future is awaited."""

    def __call__(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> asyncio.Future[None]: ...


@runtime_checkable
class SubmittingBus(Bus, Protocol):
    """A bus whose :meth:`submit` takes a record without a coroutine or a task (callers
    that answer from a callback save both: docs/performance.md, "The request without a
    task")."""

    def submit(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> asyncio.Future[None]:
        """As :class:`Submit`."""
        ...


def submitter(bus: Bus) -> Submit:
    """``bus.submit`` when the bus has one; otherwise each record is published by a task
    of its own (kept referenced until it is done)."""
    if isinstance(bus, SubmittingBus):
        return bus.submit
    tasks: set[asyncio.Task[None]] = set()

    def submit(
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> asyncio.Future[None]:
        publish = bus.publish(topic, value, key=key, headers=headers, timeout_s=timeout_s)
        task = asyncio.get_running_loop().create_task(publish)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    return submit
