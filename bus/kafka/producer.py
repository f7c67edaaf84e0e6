"""The Kafka bus: publishing to any Kafka-protocol cluster through one aiokafka producer.

Publishing: one producer per process, started in :meth:`KafkaBus.start`. ``submit`` (and
``publish``, which awaits it) puts the record in a list; one sender task takes the list
each loop turn (or after ``linger_ms``), builds a batch per partition
(``create_batch``: the key's partition as the Java client maps it,
:mod:`bus.kafka.partitioner`) and hands it to the producer (``send_batch``). The batch's
acknowledgement (``acks=all``; anything less needs ``allow_unsafe_acks``) answers each of
its records; one timer bounds them all by ``publish_timeout_s``
(:class:`bus.deadlines.Deadlines`). Per record that is a list append, against a task, a
coroutine, a timer and aiokafka's own ``send`` before (docs/performance.md, "Kafka:
batches built per loop turn"). While the producer still holds a batch of a partition
that its request has not taken, ``send_batch`` waits; the records arriving meanwhile go
out together in the next batch, as aiokafka's ``send`` would have grouped them.

Every failure becomes :class:`~schemas.errors.BusUnavailable`, so the web layer answers
503 and Voucherify retries, except those that retrying cannot cure: a topic that is
missing and may not be created is :class:`~schemas.errors.TopicMissing` (the intake
quarantines the event), and a record too large for the producer (``max_record_bytes``,
checked as aiokafka's ``send`` checks it) or for the broker (its ``message.max.bytes``,
or the topic's ``max.message.bytes``) is :class:`~schemas.errors.RecordTooLarge`. A
broker refuses a whole batch for its size, so the records of a refused batch are sent
once more, each in a batch of its own (same partition); only a record refused alone is
called too large: a small event never pays for a large neighbour.

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
in a task of its own, so concurrent publishes never race to build several. The move to
unavailable and back is logged once each way, not once per failed request.

Topics are checked and created by :mod:`bus.kafka.admin`; consuming is
:mod:`bus.kafka.subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Final, NamedTuple

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bus.config import BusSettings
from bus.deadlines import Deadlines
from bus.kafka._futures import retrieve
from bus.kafka.admin import KafkaTopics
from bus.kafka.options import GroupTiming, acks, client_options
from bus.kafka.partitioner import partition_for
from bus.kafka.subscription import KafkaSubscription
from bus.types import UNREADY_AFTER_FAILED_PUBLISH_S, RevokeCallback, Subscription
from schemas.errors import BusUnavailable, ConfigError, RecordTooLarge, TopicMissing
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


def _record_size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """A record's size in a batch, as aiokafka's ``send`` checks it against
    ``max_request_size``."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    return size


def _unavailable(error: BaseException, timeout_s: float) -> BusUnavailable:
    if isinstance(error, BusUnavailable):
        return BusUnavailable(str(error))
    reason = (
        f"no acknowledgement within {timeout_s:.1f}s"
        if isinstance(error, TimeoutError)
        else f"{type(error).__name__}: {error}"
    )
    return BusUnavailable(f"the Kafka bus did not store the record: {reason}")


class _Sent(NamedTuple):
    """A batch the producer holds, with its records."""

    topic: str
    partition: int
    records: list[_Waiting]
    started: float  # time.monotonic() when its records were taken


def _unsent(records: Iterable[_Waiting]) -> list[_Waiting]:
    return [record for record in records if not record.sent]


class _Waiting:
    """A submitted record and its answer."""

    __slots__ = ("deadline", "future", "headers", "key", "sent", "timeout", "topic", "value")

    def __init__(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        future: asyncio.Future[None],
        timeout: float,
    ) -> None:
        self.topic = topic
        self.value = value
        self.key = key
        self.headers = headers
        self.future = future
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.sent = False  # in a batch the producer holds


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
        self._failed: tuple[float, str] | None = None  # the last refused publish (monotonic)
        self._waiting: list[_Waiting] = []  # submitted, for the sender's next batches
        self._sender: asyncio.Task[None] | None = None
        self._deadlines = Deadlines[_Waiting](self._timed_out)
        self._tasks: set[asyncio.Task[None]] = set()  # a refused batch's records, alone
        # The loop it was started on, looked up once: on Python 3.11 each
        # get_running_loop() is a getpid() system call (docs/performance.md).
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------

    def _new_producer(self) -> Any:
        s = self.settings
        try:
            return AIOKafkaProducer(
                **self._options,
                acks=acks(s.acks),
                enable_idempotence=s.enable_idempotence,
                compression_type=None if s.compression == "none" else s.compression,
                # Batches are built by submit (records checked against
                # max_record_bytes there, partitions chosen by partition_for) and closed,
                # so aiokafka's own per-record checks, partitioner and linger do not apply.
                max_batch_size=s.max_batch_bytes,
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
        self._loop = asyncio.get_running_loop()
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
        """Send what waits, let the producer deliver what it holds (bounded), stop."""
        self._topics.close()
        sender = self._sender
        if sender is not None:
            await asyncio.wait([sender], timeout=self.settings.request_timeout_s)
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        for task in list(self._tasks):
            task.cancel()
        replacement = self._replacement
        producer, self._producer = self._producer, None
        if replacement is not None and not replacement.done():
            # It sees the bus closed and stops the producer it started.
            with contextlib.suppress(BusUnavailable, ConfigError):
                await replacement
        if producer is not None:
            await self._stop_quietly(producer)
            log.info("bus_closed", bus="kafka")
        # Whatever the stopped producer did not answer (and nothing waits unsent now).
        self._waiting = []
        for record in self._deadlines.unanswered():
            record.future.set_exception(BusUnavailable("the Kafka bus is closed"))
        self._loop = None

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

    # -- publishing -----------------------------------------------------------------

    def submit(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> asyncio.Future[None]:
        """As :meth:`publish`, without a coroutine (:class:`bus.types.SubmittingBus`):
        the record waits for the loop's next turn and goes out in one batch with the
        others of its topic and partition."""
        future: asyncio.Future[None] = (self._loop or asyncio.get_running_loop()).create_future()
        if self._producer is None:
            future.set_exception(BusUnavailable("the Kafka bus is not started"))
            return future
        listed = list(headers)  # aiokafka's record builder takes only a list
        size = _record_size(key, value, listed)
        if size > self.settings.max_record_bytes:
            future.set_exception(self._too_large(topic, size, "producer"))
            return future
        timeout = self.settings.publish_timeout_s if timeout_s is None else timeout_s
        waiting = _Waiting(topic, value, key=key, headers=listed, future=future, timeout=timeout)
        self._waiting.append(waiting)
        self._deadlines.add(waiting)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting())
        return future

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> None:
        await self.submit(topic, value, key=key, headers=headers, timeout_s=timeout_s)

    async def _send_waiting(self) -> None:
        """Send the waiting records, ``linger_ms`` or a loop turn's worth at a time, until
        none wait.

        A producer with a batch of a partition not yet taken by its request makes
        ``send_batch`` wait; the records arriving meanwhile go out together next.
        """
        linger_s = self.settings.linger_ms / 1000
        try:
            while self._waiting:
                if linger_s:
                    await asyncio.sleep(linger_s)
                waiting, self._waiting = self._waiting, []
                try:
                    await self._send(waiting)
                except asyncio.CancelledError:
                    self._fail(_unsent(waiting), BusUnavailable("the Kafka bus is closed"))
                    raise
                except Exception as err:  # a bug: answer the records, go on with the next
                    log.exception("bus_send_failed", bus="kafka")
                    self._fail(_unsent(waiting), err)
        finally:
            self._sender = None

    async def _send(self, waiting: list[_Waiting]) -> None:
        try:
            producer = await self._current_producer()
        except (KafkaError, BusUnavailable) as err:
            self._fail(waiting, err)
            return
        by_topic: dict[str, list[_Waiting]] = {}
        for record in waiting:  # those answered meanwhile are left out by _send_batches
            by_topic.setdefault(record.topic, []).append(record)
        for topic, records in by_topic.items():
            try:
                await self._topics.before_publish(topic)
                partitions = sorted(await producer.partitions_for(topic))
                by_partition: dict[int, list[_Waiting]] = {}
                for record in records:
                    partition = partition_for(record.key, partitions, partitions)
                    by_partition.setdefault(partition, []).append(record)
                for partition, members in by_partition.items():
                    await self._send_batches(producer, topic, partition, members)
            except TopicMissing as err:  # the caller's to handle (the intake quarantines)
                for record in records:
                    if not record.future.done():
                        record.future.set_exception(TopicMissing(*err.args))
                self._deadlines.settled()
            except (KafkaError, BusUnavailable) as err:
                self._fail(_unsent(records), err)

    async def _send_batches(
        self, producer: Any, topic: str, partition: int, records: list[_Waiting]
    ) -> None:
        """``records`` in as few batches as ``max_batch_bytes`` allows (a record that fills
        a batch alone still goes: aiokafka's builder takes any first record). A record
        answered meanwhile (its deadline passed while an earlier batch waited) is left out:
        its caller was told it is not stored."""
        started = time.monotonic()
        records = [record for record in records if not record.future.done()]
        while records:
            batch = producer.create_batch()
            count = 0
            for record in records:
                if (
                    batch.append(
                        key=record.key, value=record.value, timestamp=None, headers=record.headers
                    )
                    is None
                ):
                    break
                count += 1
            if not count:  # never seen: the builder takes any first record
                raise RuntimeError("aiokafka's batch builder refused a batch's first record")
            batch.close()  # nothing else may join it: its records are exactly these
            members, records = records[:count], records[count:]
            delivery = await producer.send_batch(batch, topic, partition=partition)
            for record in members:
                record.sent = True
            sent = _Sent(topic, partition, members, started)
            delivery.add_done_callback(functools.partial(self._delivered, sent))

    def _delivered(self, sent: _Sent, delivery: asyncio.Future[Any]) -> None:
        members = sent.records
        if delivery.cancelled():
            error: BaseException | None = BusUnavailable("the delivery was cancelled")
        else:
            error = delivery.exception()
        if error is None:
            for record in members:
                if not record.future.done():
                    record.future.set_result(None)
            self._mark_available(time.monotonic() - sent.started)
        elif isinstance(error, _TOO_LARGE) and len(members) > 1:
            # The broker refuses a whole batch for its size: each record once more in a
            # batch of its own, so a small record never pays for a large neighbour.
            for record in members:
                if not record.future.done():
                    self._background(self._send_alone(record, sent.partition))
        elif isinstance(error, _TOO_LARGE):
            (record,) = members
            if not record.future.done():
                size = _record_size(record.key, record.value, record.headers)
                record.future.set_exception(self._too_large(sent.topic, size, "broker"))
        else:
            self._fail(members, error)
        self._deadlines.settled()

    async def _send_alone(self, record: _Waiting, partition: int) -> None:
        """Send a record whose batch the broker refused for its size in a batch of its
        own, to the same partition."""
        try:
            producer = await self._current_producer()
            await self._send_batches(producer, record.topic, partition, [record])
        except asyncio.CancelledError:
            self._fail([record], BusUnavailable("the Kafka bus is closed"))
            raise
        except (KafkaError, BusUnavailable) as err:
            self._fail([record], err)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, records: Iterable[_Waiting], error: BaseException) -> None:
        """Answer each record still waiting: the bus did not store it."""
        self._mark_unavailable(error)
        for record in records:
            if not record.future.done():
                record.future.set_exception(_unavailable(error, record.timeout))
        self._deadlines.settled()

    def _timed_out(self, record: _Waiting) -> None:
        self._fail([record], TimeoutError())

    def _too_large(self, topic: str, size: int, refused_by: str) -> RecordTooLarge:
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
            f"the Kafka bus refuses a record of about {size} bytes for topic {topic}: over {where}"
        )

    # -- availability ---------------------------------------------------------------

    def _mark_unavailable(self, err: BaseException) -> None:
        """Log the transition to unavailable once, not once per failed request."""
        self._topics.recheck_later()
        self._failed = (time.monotonic(), repr(err))
        if self._available:
            self._available = False
            log.warning("bus_unavailable", bus="kafka", error=repr(err))
        else:
            log.debug("bus_publish_failed", bus="kafka", error=repr(err))

    def _mark_available(self, elapsed_s: float) -> None:
        self._failed = None
        if not self._available:
            self._available = True
            log.info("bus_recovered", bus="kafka", publish_s=round(elapsed_s, 3))

    async def ping(self) -> None:
        if self._failed is not None:
            at, error = self._failed
            if (ago := time.monotonic() - at) < UNREADY_AFTER_FAILED_PUBLISH_S:
                raise BusUnavailable(f"the Kafka bus refused a publish {ago:.0f}s ago: {error}")
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
