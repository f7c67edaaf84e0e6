"""The Kafka bus: publishing to any Kafka-protocol cluster on one aiokafka client.

Publishing: one aiokafka producer per process, started in :meth:`KafkaBus.start`; its
client holds the connections, the cluster's metadata and the negotiated versions.
``submit`` (and ``publish``, which awaits it) queues the record; records go out in one
batch per partition (the key's partition as the Java client maps it,
:mod:`bus.kafka.partitioner`), and each batch's acknowledgement (``acks=all``; anything
less needs ``allow_unsafe_acks``) answers its records. One timer bounds them all by
``publish_timeout_s`` (:class:`bus.deadlines.Deadlines`). Two ways to send:

- **Produce requests of our own** (without idempotence, and with an answer to wait for:
  ``acks`` of ``all`` or 1). ``submit`` queues the record behind those of its partition,
  from the metadata the client holds (a record it cannot place, say on a topic's first
  publish, goes through :meth:`KafkaBus._route_waiting`, and so do the records submitted
  while that runs). Each broker's sender keeps one request in flight, as aiokafka's
  does: it takes the records of every partition it leads, builds a batch per partition
  with aiokafka's C batch builder (up to ``max_batch_bytes``; the rest waits for the next
  request), sends one request (:mod:`bus.kafka.wire`, encoded by hand, on aiokafka's
  connection) and awaits its answer; the records arriving meanwhile go together in the
  next. A partition with a batch in flight is muted. A failure a
  retry may cure (a leader moving, a lost connection, a request timed out) puts the
  batch back at the head of its partition's queue after fresh metadata and
  ``RETRY_BACKOFF_S``, within its records' deadlines, as aiokafka's sender does, so a
  key's records keep their order. About a tenth of the loop's time per request less
  than aiokafka's sender (docs/performance.md, "A produce request of our own").
- **aiokafka's producer** (idempotence on, the default, or ``acks=0``): the idempotent
  producer's sequence numbers and retries are aiokafka's. One sender task takes the
  waiting records each loop turn (or after ``linger_ms``), builds a closed batch per
  partition (``create_batch``) and hands it to the producer (``send_batch``). While the
  producer still holds a batch of a partition that its request has not taken,
  ``send_batch`` waits; the records arriving meanwhile go out together in the next batch.

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
sender routine"), after which every send through it fails; the bus then replaces the
producer once, in a task of its own, so concurrent publishes never race to build
several. The move to unavailable and back is logged once each way, not once per failed
request.

Topics are checked and created by :mod:`bus.kafka.admin`; consuming is
:mod:`bus.kafka.subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final, NamedTuple

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
    for_code,
)
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

from bus.config import BusSettings
from bus.deadlines import Deadlines
from bus.kafka._futures import retrieve
from bus.kafka.admin import KafkaTopics
from bus.kafka.options import GroupTiming, acks, client_options
from bus.kafka.partitioner import partition_for
from bus.kafka.subscription import KafkaSubscription
from bus.kafka.wire import PartitionData, ProduceAnswer, ProduceCall
from bus.types import UNREADY_AFTER_FAILED_PUBLISH_S, RevokeCallback, Subscription
from schemas.errors import BusUnavailable, ConfigError, RecordTooLarge, TopicMissing
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.kafka")

_IDEMPOTENCE_HINT: Final = (
    "set PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false for brokers without idempotent producers "
    "(for example the Tansu test broker)"
)
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError)
RETRY_BACKOFF_S: Final = 0.1  # before a batch a retry may cure goes again (aiokafka's default)
_CODECS: Final = {
    "none": DefaultRecordBatch.CODEC_NONE,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}


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


def _answer_error(code: int | None) -> BaseException | None:
    """A partition's answer in a produce response as an error (``None``: stored)."""
    if code is None:
        return BusUnavailable("the broker did not answer for a partition")
    return for_code(code)() if code else None


def _fill(records: list[_Waiting], append: Callable[[_Waiting, int], object]) -> int:
    """How many of ``records``, from the first, go in one batch: ``append(record, offset)``
    adds one and returns ``None`` once the batch is full (the builder takes any first
    record); a record refused with a batch for its size goes in a batch of its own."""
    count = 0
    for record in records:
        if record.alone and count:
            break
        if append(record, count) is None:
            break
        count += 1
        if record.alone:
            break
    if not count:  # never seen: the builder takes any first record
        raise RuntimeError("aiokafka's batch builder refused a batch's first record")
    return count


def _add_to_batch(batch: Any, record: _Waiting, _offset: int) -> object:
    """aiokafka's ``BatchBuilder.append`` (it counts the offsets itself), for :func:`_fill`."""
    return batch.append(key=record.key, value=record.value, timestamp=None, headers=record.headers)


def _unsent(records: Iterable[_Waiting]) -> list[_Waiting]:
    return [record for record in records if not record.sent]


class _Waiting:
    """A submitted record and its answer."""

    __slots__ = (
        "alone",
        "deadline",
        "future",
        "headers",
        "key",
        "sent",
        "timeout",
        "topic",
        "value",
    )

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
        self.alone = False  # refused with a batch for its size: goes in a batch of its own


class KafkaBus:
    """A :class:`bus.types.Bus` on a Kafka-protocol cluster."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        group_timing: GroupTiming | None = None,
        own_requests: bool | None = None,
    ) -> None:
        """``own_requests``: produce requests of our own (``None``: whenever the settings
        allow, that is without idempotence and with ``acks`` of 1 or ``all``); ``False``
        sends through aiokafka's producer, as idempotence does (the tests run both)."""
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
        # Without idempotence (and with an answer to wait for), produce requests are our
        # own (bus.kafka.wire), one in flight per broker: docs/performance.md, "A produce
        # request of our own". An idempotent producer's sequence numbers stay aiokafka's.
        allowed = not settings.enable_idempotence and settings.acks != "0"
        if own_requests and not allowed:
            raise ValueError("produce requests of our own need no idempotence and acks 1 or all")
        self._direct = allowed if own_requests is None else own_requests
        self._direct_acks = -1 if settings.acks == "all" else 1
        # How long the broker may wait for its replicas, as aiokafka sets it.
        self._produce_timeout_ms = int(settings.request_timeout_s * 1000)
        self._partition_queues: dict[tuple[str, int], list[_Waiting]] = {}
        self._muted: set[tuple[str, int]] = set()  # a batch in flight, or to go again
        self._brokers: dict[int, asyncio.Task[None]] = {}  # broker id: its sender
        self._partitions: dict[str, list[int]] = {}  # topic: its partitions, in order
        self._wake_handle: asyncio.TimerHandle | None = None
        self._closing = False

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
        self._closing = False
        log.info(
            "bus_started",
            bus="kafka",
            bootstrap=self.settings.kafka_bootstrap,
            acks=self.settings.acks,
            idempotence=self.settings.enable_idempotence,
            produce_requests="own" if self._direct else "aiokafka",
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

    def _senders(self) -> list[asyncio.Task[None]]:
        tasks = list(self._brokers.values())
        return tasks if self._sender is None else [self._sender, *tasks]

    async def _stop_quietly(self, producer: Any) -> None:
        """Stop a producer, bounded: batches expire after ``request_timeout_s`` anyway."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s + 1.0):
                await producer.stop()
        except (TimeoutError, KafkaError) as err:
            log.warning("bus_producer_stop_failed", bus="kafka", error=repr(err))

    async def close(self) -> None:
        """Send what waits, let the producer deliver what it holds, stop. Each step is
        bounded by ``request_timeout_s``: sending what waits (routed, then sent by the
        brokers' senders or handed to aiokafka's producer), then stopping the producer."""
        self._topics.close()
        # What waits to be routed, and what the brokers' senders hold (produce requests
        # of our own), bounded together.
        until = time.monotonic() + self.settings.request_timeout_s
        while (senders := self._senders()) and (left := until - time.monotonic()) > 0:
            await asyncio.wait(senders, timeout=left)
        self._closing = True
        senders = self._senders()
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        if self._wake_handle is not None:
            self._wake_handle.cancel()
            self._wake_handle = None
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
        self._deadlines.add(waiting)
        if (
            self._direct
            and self._sender is None  # nothing older of the key waits to be routed
            and (tp := self._partition_now(topic, key)) is not None
        ):
            self._enqueue(tp, [waiting])
            return future
        self._waiting.append(waiting)
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
                    if self._direct:
                        await self._route_waiting(waiting)
                    else:
                        await self._send(waiting)
                except asyncio.CancelledError:
                    self._fail(_unsent(waiting), BusUnavailable("the Kafka bus is closed"))
                    raise
                except Exception as err:  # a bug: answer the records, go on with the next
                    log.exception("bus_send_failed", bus="kafka")
                    self._fail(_unsent(waiting), err)
        finally:
            self._sender = None

    async def _by_topic(
        self, waiting: list[_Waiting]
    ) -> tuple[Any, dict[str, list[_Waiting]]] | None:
        """The producer and the records not yet answered, by topic; ``None`` (the records
        answered "not stored") when no producer runs."""
        try:
            producer = await self._current_producer()
        except (KafkaError, BusUnavailable) as err:
            self._fail(waiting, err)
            return None
        by_topic: dict[str, list[_Waiting]] = {}
        for record in waiting:
            if not record.future.done():
                by_topic.setdefault(record.topic, []).append(record)
        return producer, by_topic

    async def _send(self, waiting: list[_Waiting]) -> None:
        if (found := await self._by_topic(waiting)) is None:
            return
        producer, by_topic = found
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
                self._missing(records, err)
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
            count = _fill(records, functools.partial(_add_to_batch, batch))
            batch.close()  # nothing else may join it: its records are exactly these
            members, records = records[:count], records[count:]
            delivery = await producer.send_batch(batch, topic, partition=partition)
            for record in members:
                record.sent = True
            sent = _Sent(topic, partition, members, started)
            delivery.add_done_callback(functools.partial(self._delivered, sent))

    def _delivered(self, sent: _Sent, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            error: BaseException | None = BusUnavailable("the delivery was cancelled")
        else:
            error = delivery.exception()
        self._settle(sent, error)

    def _settle(self, sent: _Sent, error: BaseException | None) -> None:
        """Answer a batch's records: stored, too large, or not stored."""
        members = sent.records
        if error is None:
            for record in members:
                if not record.future.done():
                    record.future.set_result(None)
            self._mark_available(time.monotonic() - sent.started)
        elif isinstance(error, _TOO_LARGE) and len(members) > 1:
            # The broker refuses a whole batch for its size: each record once more in a
            # batch of its own, so a small record never pays for a large neighbour.
            unanswered = [record for record in members if not record.future.done()]
            for record in unanswered:
                if self._direct:  # ahead of the others of the partition, each alone
                    record.alone = True
                    record.sent = False
                else:
                    self._background(self._send_alone(record, sent.partition))
            if self._direct:
                tp = (sent.topic, sent.partition)
                self._partition_queues[tp] = unanswered + self._partition_queues.get(tp, [])
        elif isinstance(error, _TOO_LARGE):
            (record,) = members
            if not record.future.done():
                size = _record_size(record.key, record.value, record.headers)
                record.future.set_exception(self._too_large(sent.topic, size, "broker"))
        else:
            self._fail(members, error)
        self._deadlines.settled()

    # -- produce requests of our own (without idempotence) -------------------------

    def _partition_now(
        self, topic: str, key: bytes | None, *, checked: bool = False
    ) -> tuple[str, int] | None:
        """``key``'s partition of ``topic`` from the metadata the client holds; ``None``
        when the topic must be checked (unless ``checked``) or its metadata fetched
        first."""
        producer = self._producer
        if producer is None or not (checked or self._topics.ready_for(topic)):
            return None
        known = producer.client.cluster.partitions_for_topic(topic)
        if not known:
            return None
        partitions = self._partitions.get(topic)
        if partitions is None or len(partitions) != len(known):  # partitions only grow
            partitions = self._partitions[topic] = sorted(known)
        return topic, partition_for(key, partitions, partitions)

    def _enqueue(self, tp: tuple[str, int], records: list[_Waiting]) -> None:
        """Queue ``records`` behind those of their partition, and wake its leader's
        sender."""
        queue = self._partition_queues.get(tp)
        if queue:  # its leader was woken when the first of them came
            queue += records
            return
        self._partition_queues[tp] = records
        if tp not in self._muted:  # else woken when its batch in flight is answered
            self._wake_leader(tp)

    def _wake_leader(self, tp: tuple[str, int]) -> None:
        producer = self._producer
        if producer is None or self._closing:
            return
        node = producer.client.cluster.leader_for_partition(TopicPartition(*tp))
        if node is None or node < 0:  # a leader being elected: look again soon
            self._wake_later()
        elif node not in self._brokers:
            loop = self._loop or asyncio.get_running_loop()
            self._brokers[node] = loop.create_task(self._send_to(node))

    def _wake_all(self) -> None:
        """Wake the leaders of every partition with records waiting (a leader may have
        moved while its records waited)."""
        for tp, queue in list(self._partition_queues.items()):
            queue[:] = [record for record in queue if not record.future.done()]
            if not queue:
                del self._partition_queues[tp]
            elif tp not in self._muted:
                self._wake_leader(tp)

    def _wake_later(self) -> None:
        producer = self._producer
        if self._wake_handle is None and producer is not None and not self._closing:
            producer.client.force_metadata_update()
            loop = self._loop or asyncio.get_running_loop()
            self._wake_handle = loop.call_later(RETRY_BACKOFF_S, self._woken)

    def _woken(self) -> None:
        self._wake_handle = None
        self._wake_all()

    async def _route_waiting(self, waiting: list[_Waiting]) -> None:
        """Queue the records :meth:`submit` could not (the topic to be checked or created,
        its metadata to be fetched). While this runs, :meth:`submit` sends its records
        here too, so a key's records keep their order."""
        if (found := await self._by_topic(waiting)) is None:
            return
        producer, by_topic = found
        unknown: list[_Waiting] = []
        for topic, records in by_topic.items():
            try:
                await self._topics.before_publish(topic)
                await producer.partitions_for(topic)
            except TopicMissing as err:  # the caller's to handle (the intake quarantines)
                self._missing(records, err)
                continue
            except (KafkaError, BusUnavailable) as err:
                self._fail(records, err)
                continue
            unknown += self._queue_routed(topic, records)
        if unknown:  # the metadata went meanwhile: once more, ahead of the newer ones
            await asyncio.sleep(RETRY_BACKOFF_S)
            self._waiting[:0] = unknown

    def _queue_routed(self, topic: str, records: list[_Waiting]) -> list[_Waiting]:
        """Queue ``records`` of a checked ``topic``; those it cannot place yet."""
        by_partition: dict[tuple[str, int], list[_Waiting]] = {}
        unknown: list[_Waiting] = []
        for record in records:
            tp = self._partition_now(topic, record.key, checked=True)
            if tp is None:
                unknown.append(record)
            else:
                by_partition.setdefault(tp, []).append(record)
        for tp, members in by_partition.items():
            self._enqueue(tp, members)
        return unknown

    async def _send_to(self, node: int) -> None:
        """One broker's sender: the records of each partition it leads in one produce
        request (a batch a partition), and the next request once this one is answered,
        as aiokafka's sender keeps one in flight per broker; those arriving meanwhile go
        together. A partition with a batch in flight or waiting to go again is muted
        until it is answered, so a key's records keep their order."""
        linger_s = self.settings.linger_ms / 1000
        try:
            while True:
                if linger_s:
                    await asyncio.sleep(linger_s)
                producer = self._producer
                if producer is None:
                    return
                call, sent = self._request(producer.client.cluster, node)
                if not sent:
                    return
                await self._produce(producer.client, node, call, sent)
        finally:
            del self._brokers[node]
            self._wake_all()  # a partition whose leader moved while this one sent

    def _request(self, cluster: Any, node: int) -> tuple[ProduceCall, list[_Sent]]:
        """A produce request with the first batch of each unmuted partition ``node``
        leads; what does not fit stays at the head of its partition's queue."""
        parts: list[PartitionData] = []
        sent: list[_Sent] = []
        started = time.monotonic()
        for tp in list(self._partition_queues):
            if tp in self._muted:
                continue
            if cluster.leader_for_partition(TopicPartition(*tp)) != node:
                self._wake_leader(tp)  # its leader moved (or is being elected) meanwhile
                continue
            records = [r for r in self._partition_queues.pop(tp) if not r.future.done()]
            if not records:
                continue
            try:
                count, batch = self._direct_batch(records)
            except Exception as err:  # a bug: answer them, go on with the other partitions
                log.exception("bus_send_failed", bus="kafka")
                self._fail(records, err)
                continue
            if count < len(records):
                self._partition_queues[tp] = records[count:]
            members = records[:count]
            for record in members:
                record.sent = True
            self._muted.add(tp)
            parts.append(PartitionData(*tp, batch))
            sent.append(_Sent(*tp, members, started))
        return ProduceCall(self._direct_acks, self._produce_timeout_ms, parts), sent

    def _direct_batch(self, records: list[_Waiting]) -> tuple[int, bytearray]:
        """The first records that fit one batch (``max_batch_bytes``; a record sent
        again after its batch was refused for its size, alone), and the batch's bytes."""
        builder = DefaultRecordBatchBuilder(
            2,  # magic: record batches
            _CODECS[self.settings.compression],
            is_transactional=0,
            producer_id=-1,  # no idempotence: no producer id, no sequence
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=self.settings.max_batch_bytes,
        )
        count = _fill(
            records,
            lambda r, offset: builder.append(
                offset, timestamp=None, key=r.key, value=r.value, headers=r.headers
            ),
        )
        return count, builder.build()

    async def _produce(self, client: Any, node: int, call: ProduceCall, sent: list[_Sent]) -> None:
        """Send one request and answer its records. The batches a retry may cure (a
        leader moving, a lost connection, a request timed out) go again at the head of
        their partition's queue, within their deadlines, once the metadata is fresh and
        ``RETRY_BACKOFF_S`` has passed; their partitions stay muted until then, as
        aiokafka's sender keeps them, so a key's records keep their order."""
        again: list[_Sent] = []
        try:
            try:
                answer: ProduceAnswer = await client.send(node, call)
            except KafkaError as err:
                errors: list[BaseException | None] = [err] * len(sent)
            else:
                codes = {(a.topic, a.partition): a.error_code for a in answer.partitions}
                errors = [_answer_error(codes.get((b.topic, b.partition))) for b in sent]
            refresh = False
            for batch, error in zip(sent, errors, strict=True):
                if error is None:
                    self._settle(batch, None)
                else:
                    refresh |= self._answered(batch, error, again)
            if refresh:
                fresh = client.force_metadata_update()
                await asyncio.wait([fresh], timeout=self.settings.request_timeout_s)
            if again:
                await asyncio.sleep(RETRY_BACKOFF_S)
        except Exception as err:  # a bug: answer the records, never leave them waiting
            log.exception("bus_send_failed", bus="kafka")
            for batch in sent:
                self._fail(batch.records, err)
        finally:
            self._unmute(sent, again)

    def _unmute(self, sent: list[_Sent], again: list[_Sent]) -> None:
        """The partitions of an answered request take records again; the batches to go
        again first, ahead of the records that came meanwhile."""
        for batch in again:
            tp = (batch.topic, batch.partition)
            self._partition_queues[tp] = batch.records + self._partition_queues.get(tp, [])
        for batch in sent:
            tp = (batch.topic, batch.partition)
            self._muted.discard(tp)
            if self._partition_queues.get(tp):  # its leader may be another broker now
                self._wake_leader(tp)

    def _answered(self, sent: _Sent, error: BaseException, again: list[_Sent]) -> bool:
        """Settle a batch that failed, or add it to ``again`` when a retry may cure it;
        True when the metadata should be fetched anew first."""
        if isinstance(error, KafkaError) and error.retriable and not isinstance(error, _TOO_LARGE):
            log.debug("bus_publish_retried", bus="kafka", error=repr(error))
            for record in sent.records:
                record.sent = False
            again.append(sent)
            return bool(error.invalid_metadata)
        self._settle(sent, error)
        return False

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

    def _missing(self, records: Iterable[_Waiting], error: TopicMissing) -> None:
        for record in records:
            if not record.future.done():
                record.future.set_exception(TopicMissing(*error.args))
        self._deadlines.settled()

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
