"""The Kafka bus: publishing to any Kafka-protocol cluster through one aiokafka producer.

Publishing: one producer per process, started in :meth:`KafkaBus.start`. ``publish`` is
``send`` + wait for the acknowledgement (``acks=all``; anything less needs
``allow_unsafe_acks``), bounded by ``publish_timeout_s``; every failure becomes
:class:`~schemas.errors.BusUnavailable`, so the web layer answers 503 and Voucherify
retries, except one that retrying cannot cure: a record too large for the producer
(``max_record_bytes``) or for the broker (its ``message.max.bytes``, or the topic's
``max.message.bytes``) is :class:`~schemas.errors.RecordTooLarge`. A broker refuses a whole
batch for its size, so a record refused that way is sent once more in a batch of its own
(same partition) before it is called too large: a small event never pays for a large
neighbour.

Batches are large (``max_batch_bytes``, 1 MiB by default) because aiokafka keeps one
request in flight per broker: with its 16 KiB default a batch holds three or four webhook
bodies and concurrent senders queue behind it (see ``docs/performance.md``).

A timed-out publish cannot be withdrawn on Kafka: the batch holding it may still be
delivered until it expires (``request_timeout_s``). The caller was told "not stored", so
Voucherify retries and the record can appear twice; the handlers' idempotency ledger
absorbs that (delivery is at least once everywhere).

Recovery: the aiokafka producer reconnects by itself when a broker comes back (checked
against a killed and restarted broker), so the same :class:`KafkaBus` keeps serving. The
one failure it cannot recover from is a dead sender task (aiokafka's "unexpected error in
sender routine"), after which every send fails; the bus then replaces the producer once,
under a lock, so concurrent publishes never race to build several. The move to
unavailable and back is logged once each way, not once per failed request.

Topics are checked and created by :mod:`bus.kafka.admin`; consuming is
:mod:`bus.kafka.subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
)

from bus.config import BusSettings
from bus.kafka._futures import retrieve
from bus.kafka.admin import KafkaTopics
from bus.kafka.options import GroupTiming, acks, client_options
from bus.kafka.partitioner import partition_for
from bus.kafka.subscription import KafkaSubscription
from bus.types import RevokeCallback, Subscription
from schemas.errors import BusUnavailable, ConfigError, RecordTooLarge
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.kafka")

_IDEMPOTENCE_HINT: Final = (
    "set PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false for brokers without idempotent producers "
    "(for example the Tansu test broker)"
)
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError)


def _sender_dead(producer: Any) -> bool:
    """True when the producer's background sender has stopped, so every send would fail.

    aiokafka exposes no public flag for this; the attribute path is checked defensively.
    """
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return isinstance(task, asyncio.Task) and task.done()


def _size(value: bytes, key: bytes | None, headers: Headers) -> int:
    """A record's size without the batch framing: value, key, header names and values."""
    return len(value) + len(key or b"") + sum(len(n) + len(v) for n, v in headers)


class KafkaBus:
    """A :class:`bus.types.Bus` on a Kafka-protocol cluster."""

    def __init__(self, settings: BusSettings, *, group_timing: GroupTiming | None = None) -> None:
        if settings.kind != "kafka" or not settings.kafka_bootstrap:
            raise ConfigError("PUBRELAY_BUS__URL must be kafka://host:port[,host:port]")
        if settings.enable_idempotence and settings.acks != "all":
            raise ConfigError(
                "PUBRELAY_BUS__ENABLE_IDEMPOTENCE=true requires PUBRELAY_BUS__ACKS=all"
            )
        self.settings = settings
        self.group_timing = group_timing or GroupTiming()
        self._options = client_options(settings)
        self._producer: Any = None
        self._replacement: asyncio.Task[Any] | None = None
        self._topics = KafkaTopics(settings, self._options, lambda: self._producer)
        self._available = True

    # -- lifecycle ------------------------------------------------------------------

    def _new_producer(self) -> Any:
        s = self.settings
        try:
            return AIOKafkaProducer(
                **self._options,
                acks=acks(s.acks),
                enable_idempotence=s.enable_idempotence,
                compression_type=None if s.compression == "none" else s.compression,
                linger_ms=s.linger_ms,
                max_batch_size=s.max_batch_bytes,
                # aiokafka checks each record against it (its only use of the setting).
                max_request_size=s.max_record_bytes,
                partitioner=partition_for,
            )
        except UnsupportedCodecError as err:
            raise ConfigError(
                f"PUBRELAY_BUS__COMPRESSION={s.compression} needs its codec library: {err}"
            ) from err

    async def _start_producer(self) -> Any:
        """A started producer, or a clear error; never hangs past ``request_timeout_s``."""
        producer = self._new_producer()
        bound = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(bound):
                await producer.start()
        except TimeoutError:
            await self._stop_quietly(producer)
            if self.settings.enable_idempotence:
                raise BusUnavailable(
                    f"the Kafka bus at {self.settings.url} gave no idempotent producer id "
                    f"within {bound:.1f}s; if the broker does not support it, " + _IDEMPOTENCE_HINT
                ) from None
            raise BusUnavailable(
                f"the Kafka bus at {self.settings.url} did not answer within {bound:.1f}s"
            ) from None
        except KafkaConnectionError as err:
            await self._stop_quietly(producer)
            raise BusUnavailable(
                f"cannot connect to the Kafka bus at {self.settings.url}: {err}"
            ) from err
        except KafkaError as err:
            await self._stop_quietly(producer)
            if self.settings.enable_idempotence:
                raise ConfigError(
                    f"the Kafka broker at {self.settings.url} refused an idempotent producer "
                    f"({type(err).__name__}); " + _IDEMPOTENCE_HINT
                ) from err
            raise BusUnavailable(
                f"the Kafka bus at {self.settings.url} failed to start a producer: {err!r}"
            ) from err
        return producer

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._producer = await self._start_producer()
        log.info(
            "bus_started",
            bus="kafka",
            bootstrap=self.settings.kafka_bootstrap,
            acks=self.settings.acks,
            idempotence=self.settings.enable_idempotence,
            max_batch_bytes=self.settings.max_batch_bytes,
            max_record_bytes=self.settings.max_record_bytes,
        )
        if self.settings.acks != "all":
            log.warning(
                "bus_unsafe_acks",
                bus="kafka",
                acks=self.settings.acks,
                message="PUBRELAY_BUS__ALLOW_UNSAFE_ACKS is set: a 2xx no longer means the "
                "event survives the loss of a broker",
            )

    async def _stop_quietly(self, producer: Any) -> None:
        """Stop a producer, bounded: batches expire after ``request_timeout_s`` anyway."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s + 1.0):
                await producer.stop()
        except (TimeoutError, KafkaError) as err:
            log.warning("bus_producer_stop_failed", bus="kafka", error=repr(err))

    async def close(self) -> None:
        self._topics.close()
        replacement = self._replacement
        producer, self._producer = self._producer, None
        if replacement is not None and not replacement.done():
            # It sees the bus closed and stops the producer it started.
            with contextlib.suppress(BusUnavailable, ConfigError):
                await replacement
        if producer is not None:
            await self._stop_quietly(producer)
            log.info("bus_closed", bus="kafka")

    # -- publishing -----------------------------------------------------------------

    async def _current_producer(self) -> Any:
        producer = self._producer
        if producer is None:
            raise BusUnavailable("the Kafka bus is not started")
        if not _sender_dead(producer):
            return producer
        # One replacement at a time, in its own task: a publish that times out while
        # waiting must not cancel a half-started producer.
        if self._replacement is None or self._replacement.done():
            self._replacement = asyncio.create_task(self._replace(producer))
            self._replacement.add_done_callback(retrieve)
        try:
            return await asyncio.shield(self._replacement)
        except ConfigError as err:
            raise BusUnavailable(f"the Kafka producer cannot be replaced: {err}") from err

    async def _replace(self, old: Any) -> Any:
        log.warning("bus_producer_replaced", bus="kafka", reason="sender_stopped")
        new = await self._start_producer()
        if self._producer is old:
            self._producer = new
            await self._stop_quietly(old)
            return new
        await self._stop_quietly(new)  # closed, or replaced, meanwhile
        if self._producer is None:
            raise BusUnavailable("the Kafka bus is closed")
        return self._producer

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> None:
        timeout = self.settings.publish_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        delivery: asyncio.Future[Any] | None = None
        try:
            async with asyncio.timeout(timeout):
                producer = await self._current_producer()
                await self._topics.before_publish(topic)
                try:
                    delivery = await producer.send(topic, value, key=key, headers=list(headers))
                except _TOO_LARGE as err:  # over our own max_record_bytes
                    raise self._too_large(
                        topic, _size(value, key, headers), err, "producer"
                    ) from err
                try:
                    await asyncio.shield(delivery)
                except _TOO_LARGE:
                    delivery = await self._send_alone(producer, topic, value, key, headers)
                    try:
                        await asyncio.shield(delivery)
                    except _TOO_LARGE as err:
                        raise self._too_large(
                            topic, _size(value, key, headers), err, "broker"
                        ) from err
        except (TimeoutError, KafkaError, BusUnavailable) as err:
            if delivery is not None and not delivery.done():
                delivery.add_done_callback(retrieve)
            self._mark_unavailable(err)
            if isinstance(err, BusUnavailable):
                raise
            reason = (
                f"no acknowledgement within {timeout:.1f}s"
                if isinstance(err, TimeoutError)
                else f"{type(err).__name__}: {err}"
            )
            raise BusUnavailable(f"the Kafka bus did not store the record: {reason}") from err
        self._mark_available(time.monotonic() - started)

    async def _send_alone(
        self, producer: Any, topic: str, value: bytes, key: bytes | None, headers: Headers
    ) -> asyncio.Future[Any]:
        """Send a record whose batch the broker refused for its size in a batch of its own,
        to the partition its key maps to (as ``send`` would choose it)."""
        batch = producer.create_batch()
        batch.append(key=key, value=value, timestamp=None, headers=list(headers))
        partitions = sorted(await producer.partitions_for(topic))
        partition = partition_for(key, partitions, partitions)
        delivery: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
        return delivery

    def _too_large(self, topic: str, size: int, err: KafkaError, refused_by: str) -> RecordTooLarge:
        """The permanent refusal of a record for its size, logged once per record."""
        limit = self.settings.max_record_bytes
        log.warning(
            "bus_record_too_large",
            bus="kafka",
            topic=topic,
            record_bytes=size,
            refused_by=refused_by,
            max_record_bytes=limit,
        )
        where = (
            f"PUBRELAY_BUS__MAX_RECORD_BYTES={limit}"
            if refused_by == "producer"
            else "the broker's message.max.bytes (or the topic's max.message.bytes)"
        )
        return RecordTooLarge(
            f"the Kafka bus refuses a record of about {size} bytes for topic {topic}: "
            f"over {where} ({type(err).__name__})"
        )

    # -- availability ---------------------------------------------------------------

    def _mark_unavailable(self, err: BaseException) -> None:
        """Log the transition to unavailable once, not once per failed request."""
        self._topics.recheck_later()
        if self._available:
            self._available = False
            log.warning("bus_unavailable", bus="kafka", error=repr(err))
        else:
            log.debug("bus_publish_failed", bus="kafka", error=repr(err))

    def _mark_available(self, elapsed_s: float) -> None:
        if not self._available:
            self._available = True
            log.info("bus_recovered", bus="kafka", publish_s=round(elapsed_s, 3))

    async def ping(self) -> None:
        try:
            await self._topics.names()
        except BusUnavailable:
            self._topics.recheck_later()
            raise

    # -- topics and consumers -------------------------------------------------------

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Check the topics exist, creating the missing ones when allowed
        (:meth:`bus.kafka.admin.KafkaTopics.ensure`)."""
        await self._topics.ensure(topics)

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> Subscription:
        return KafkaSubscription(
            group,
            topics,
            options=self._options,
            timing=self.group_timing,
            request_timeout_s=self.settings.request_timeout_s,
            on_revoke=on_revoke,
        )
