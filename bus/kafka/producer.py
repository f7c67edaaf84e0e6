"""The Kafka bus: any Kafka-protocol cluster through aiokafka.

Publishing: one producer per process, started in :meth:`KafkaBus.start`. ``publish`` is
``send`` + wait for the acknowledgement (``acks=all`` by default), bounded by
``publish_timeout_s``; every failure becomes :class:`~schemas.errors.BusUnavailable`, so
the web layer answers 503 and Voucherify retries. Batches are large (``max_batch_bytes``,
1 MiB by default) because aiokafka keeps one request in flight per broker: with its 16 KiB
default a batch holds three or four webhook bodies and concurrent senders queue behind it
(see ``perf-notes.md``).

A timed-out publish cannot be withdrawn on Kafka: the batch holding it may still be
delivered until it expires (``request_timeout_s``). The caller was told "not stored", so
Voucherify retries and the record can appear twice; the handlers' idempotency ledger
absorbs that (delivery is at least once everywhere).

Recovery: the aiokafka producer reconnects by itself when a broker comes back (checked
against a killed and restarted broker), so the same :class:`KafkaBus` keeps serving. The
one failure it cannot recover from is a dead sender task (aiokafka's "unexpected error in
sender routine"), after which every send fails; the bus then replaces the producer once,
under a lock, so concurrent publishes never race to build several.

Topics are created (or checked) by :meth:`KafkaBus.ensure_topics`, which the process edge
calls at start-up. The bus remembers those topics and checks them again once, before the
first publish after a failure (one shared check, not one per request): a broker that
lost its topics (a memory-storage broker such as Tansu after a restart, a rebuilt
cluster) gets them back with the configured partitions before new records are sent,
instead of records going to a topic the broker does not list. While the bus is healthy
this costs nothing; after an outage it is one metadata request.

Consuming: :class:`KafkaSubscription` is one consumer-group member with manual commits
(``enable_auto_commit=False``, ``auto_offset_reset="earliest"``); before partitions are
revoked it awaits the caller's ``on_revoke`` so finished work is committed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    UnsupportedCodecError,
)
from aiokafka.helpers import create_ssl_context

from bus.config import BusSettings
from bus.types import Message, RevokeCallback, Subscription, TopicPartition
from schemas.errors import BusUnavailable, ConfigError, TopicMissing
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.kafka")

_IDEMPOTENCE_HINT: Final = (
    "set PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false for brokers without idempotent producers "
    "(for example the Tansu test broker)"
)
# Kafka error codes answered by CreateTopics that we treat specially.
_TOPIC_ALREADY_EXISTS: Final = 36
_INVALID_PARTITIONS: Final = 37
_INVALID_REPLICATION_FACTOR: Final = 38
_TOPIC_AUTHORIZATION_FAILED: Final = 29
_CLUSTER_AUTHORIZATION_FAILED: Final = 31
_POLICY_VIOLATION: Final = 44


@dataclass(frozen=True, slots=True)
class GroupTiming:
    """Consumer-group timers.

    The defaults are aiokafka's, safe for production: a member that blocks its event
    loop for a few seconds is not expelled. Tests against Tansu shorten them, because a
    group join there waits for the rebalance timeout and a re-join for the old member's
    session to expire.
    """

    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int | None = None
    max_poll_interval_ms: int = 300_000


def _acks(value: str) -> str | int:
    return "all" if value == "all" else int(value)


def _ssl_context(settings: BusSettings) -> ssl.SSLContext | None:
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"PUBRELAY_BUS__SSL_*: cannot build the TLS context for the Kafka bus: {err}"
        ) from err
    return context


def _client_options(settings: BusSettings) -> dict[str, Any]:
    """Connection options shared by the producer, the consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
        "ssl_context": _ssl_context(settings),
    }
    if settings.security_protocol.startswith("SASL_"):
        if settings.sasl_mechanism is None or settings.sasl_username is None:
            raise ConfigError(
                "PUBRELAY_BUS__SASL_MECHANISM and PUBRELAY_BUS__SASL_USERNAME are required "
                f"with PUBRELAY_BUS__SECURITY_PROTOCOL={settings.security_protocol}"
            )
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def _sender_dead(producer: Any) -> bool:
    """True when the producer's background sender has stopped, so every send would fail.

    aiokafka exposes no public flag for this; the attribute path is checked defensively.
    """
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return isinstance(task, asyncio.Task) and task.done()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


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
        self._options = _client_options(settings)
        self._producer: Any = None
        self._replacement: asyncio.Task[Any] | None = None
        self._ensured: set[str] = set()
        self._ensuring: dict[str, asyncio.Task[None]] = {}
        self._recheck_topics = False
        self._recheck: asyncio.Task[None] | None = None
        self._available = True

    # -- lifecycle ------------------------------------------------------------------

    def _new_producer(self) -> Any:
        s = self.settings
        try:
            return AIOKafkaProducer(
                **self._options,
                acks=_acks(s.acks),
                enable_idempotence=s.enable_idempotence,
                compression_type=None if s.compression == "none" else s.compression,
                linger_ms=s.linger_ms,
                max_batch_size=s.max_batch_bytes,
                max_request_size=max(s.max_batch_bytes, 1024 * 1024),
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
        )

    async def _stop_quietly(self, producer: Any) -> None:
        """Stop a producer, bounded: batches expire after ``request_timeout_s`` anyway."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s + 1.0):
                await producer.stop()
        except (TimeoutError, KafkaError) as err:
            log.warning("bus_producer_stop_failed", bus="kafka", error=repr(err))

    async def close(self) -> None:
        if self._recheck is not None and not self._recheck.done():
            self._recheck.cancel()
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
            self._replacement.add_done_callback(_retrieve)
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
                if self._recheck_topics:
                    await self._recheck_topics_once()
                if topic not in self._ensured:
                    await self._ensure_new_topic(topic)
                delivery = await producer.send(topic, value, key=key, headers=list(headers))
                await asyncio.shield(delivery)
        except (TimeoutError, KafkaError, BusUnavailable) as err:
            if delivery is not None and not delivery.done():
                delivery.add_done_callback(_retrieve)
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

    async def _ensure_new_topic(self, topic: str) -> None:
        """First publish to a topic (a new event type, a dead-letter topic): make sure it
        exists, so a cluster without broker-side auto-creation does not stall the send
        until the timeout. Concurrent first publishes share one check."""
        task = self._ensuring.get(topic)
        if task is None:
            task = asyncio.create_task(self.ensure_topics([topic]))
            task.add_done_callback(_retrieve)
            task.add_done_callback(lambda _: self._ensuring.pop(topic, None))
            self._ensuring[topic] = task
        try:
            await asyncio.shield(task)
        except ConfigError as err:
            raise BusUnavailable(f"the Kafka bus cannot use topic {topic}: {err}") from err
        # TopicMissing passes through: the caller decides (the intake quarantines the event).

    async def _recheck_topics_once(self) -> None:
        """Re-ensure the remembered topics after a failure; concurrent publishes share it."""
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.create_task(self._recheck_topics_now())
            self._recheck.add_done_callback(_retrieve)
        try:
            await asyncio.shield(self._recheck)
        except (TopicMissing, ConfigError) as err:
            raise BusUnavailable(f"the Kafka bus cannot use its topics: {err}") from err

    async def _recheck_topics_now(self) -> None:
        await self.ensure_topics(self._ensured)
        self._recheck_topics = False
        log.info("bus_topics_rechecked", bus="kafka", topics=len(self._ensured))

    def _mark_unavailable(self, err: BaseException) -> None:
        """Log the transition to unavailable once, not once per failed request."""
        self._recheck_topics = bool(self._ensured)
        if self._available:
            self._available = False
            log.warning("bus_unavailable", bus="kafka", error=repr(err))
        else:
            log.debug("bus_publish_failed", bus="kafka", error=repr(err))

    def _mark_available(self, elapsed_s: float) -> None:
        if not self._available:
            self._available = True
            log.info("bus_recovered", bus="kafka", publish_s=round(elapsed_s, 3))

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> Subscription:
        return KafkaSubscription(self, group, topics, on_revoke)

    # -- administration -------------------------------------------------------------

    async def _topic_names(self) -> set[str]:
        """Every topic of the cluster, without asking the broker to auto-create any."""
        producer = self._producer
        if producer is None:
            raise BusUnavailable("the Kafka bus is not started")
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                cluster = await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka bus does not answer: {err!r}") from err
        return set(cluster.topics())

    async def ping(self) -> None:
        try:
            await self._topic_names()
        except BusUnavailable:
            self._recheck_topics = bool(self._ensured)
            raise

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Check the topics exist; create the missing ones when ``auto_create_topics``.

        Bounded by ``request_timeout_s`` for the check and again for the creation.
        Raises :class:`TopicMissing` naming the topics when they may not be created,
        :class:`ConfigError` when the cluster rejects the partition or replication
        settings, :class:`BusUnavailable` when the cluster does not answer.
        """
        wanted = sorted(set(topics))
        existing = await self._topic_names()
        missing = [t for t in wanted if t not in existing]
        if not missing:
            self._ensured.update(wanted)
            return
        if not self.settings.auto_create_topics:
            raise TopicMissing(
                f"Kafka topics missing: {', '.join(missing)} "
                "(create them, or set PUBRELAY_BUS__AUTO_CREATE_TOPICS=true)"
            )
        await self._create_topics(missing)
        self._ensured.update(wanted)
        log.info("bus_topics_created", bus="kafka", topics=missing)

    async def _create_topics(self, names: list[str]) -> None:
        s = self.settings
        admin = AIOKafkaAdminClient(**self._options)
        try:
            async with asyncio.timeout(s.request_timeout_s):
                await admin.start()
                response = await admin.create_topics(
                    [NewTopic(n, s.partitions, s.replication_factor) for n in names],
                    timeout_ms=int(s.request_timeout_s * 1000),
                )
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"cannot create Kafka topics {names}: {err!r}") from err
        finally:
            with contextlib.suppress(KafkaError, TimeoutError):
                await admin.close()
        _check_created(response.topic_errors)


def _check_created(topic_errors: Sequence[tuple[Any, ...]]) -> None:
    """Turn CreateTopics error codes into our errors (an existing topic is fine)."""
    for item in topic_errors:
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else None
        if code in (0, _TOPIC_ALREADY_EXISTS):
            continue
        detail = f"{name}: error {code} {message or ''}".strip()
        if code in (_INVALID_PARTITIONS, _INVALID_REPLICATION_FACTOR):
            raise ConfigError(
                "the Kafka cluster rejected PUBRELAY_BUS__PARTITIONS / "
                f"PUBRELAY_BUS__REPLICATION_FACTOR for topic {detail}"
            )
        if code in (_TOPIC_AUTHORIZATION_FAILED, _CLUSTER_AUTHORIZATION_FAILED, _POLICY_VIOLATION):
            raise TopicMissing(f"Kafka topic may not be created: {detail}")
        raise BusUnavailable(f"Kafka topic could not be created: {detail}")


# -- consuming ----------------------------------------------------------------------


def _ours(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition) -> Any:
    return KafkaTopicPartition(tp.topic, tp.partition)


class _RevokeListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Lets the worker commit finished work before partitions move to another member."""

    def __init__(self, group: str, on_revoke: RevokeCallback | None) -> None:
        self._group = group
        self._on_revoke = on_revoke

    async def on_partitions_revoked(self, revoked: Collection[Any]) -> None:
        if not revoked:
            return
        log.info("bus_partitions_revoked", bus="kafka", group=self._group, count=len(revoked))
        if self._on_revoke is not None:
            try:
                await self._on_revoke([_ours(tp) for tp in revoked])
            except Exception:
                log.exception("bus_revoke_callback_failed", bus="kafka", group=self._group)

    async def on_partitions_assigned(self, assigned: Collection[Any]) -> None:
        log.info("bus_partitions_assigned", bus="kafka", group=self._group, count=len(assigned))


class KafkaSubscription:
    """A consumer-group member on :class:`KafkaBus` (a :class:`bus.types.Subscription`)."""

    def __init__(
        self,
        bus: KafkaBus,
        group: str,
        topics: Sequence[str],
        on_revoke: RevokeCallback | None = None,
    ) -> None:
        self.group = group
        self.topics = list(dict.fromkeys(topics))
        self._settings = bus.settings
        self._options = bus._options
        self._timing = bus.group_timing
        self._on_revoke = on_revoke
        self._consumer: Any = None
        # True until a fetch completes: while the group (re)balances, the assignment aiokafka
        # reports is not yet one to read from, so lag() reports none.
        self._joining = True

    async def start(self) -> None:
        if self._consumer is not None:
            return
        t = self._timing
        # The coordinator holds a JoinGroup until every member rejoined (up to the rebalance
        # timeout); a shorter request timeout would abort every join of a busy group.
        # Same rule as the Java client: rebalance timeout + 5 s at least.
        rebalance_ms = t.rebalance_timeout_ms or t.session_timeout_ms
        options = {
            **self._options,
            "request_timeout_ms": max(self._options["request_timeout_ms"], rebalance_ms + 5_000),
        }
        consumer = AIOKafkaConsumer(
            **options,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=t.session_timeout_ms,
            heartbeat_interval_ms=t.heartbeat_interval_ms,
            rebalance_timeout_ms=t.rebalance_timeout_ms,
            max_poll_interval_ms=t.max_poll_interval_ms,
        )
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                await consumer.start()
            consumer.subscribe(self.topics, listener=_RevokeListener(self.group, self._on_revoke))
        except (TimeoutError, KafkaError) as err:
            with contextlib.suppress(KafkaError, TimeoutError):
                async with asyncio.timeout(self._settings.request_timeout_s):
                    await consumer.stop()
            raise BusUnavailable(f"cannot start a Kafka consumer: {err!r}") from err
        self._consumer = consumer
        log.info("bus_subscribed", bus="kafka", group=self.group, topics=self.topics)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                await consumer.stop()
        except (TimeoutError, KafkaError) as err:
            log.warning("bus_consumer_stop_failed", bus="kafka", group=self.group, error=repr(err))

    def _require(self) -> Any:
        if self._consumer is None:
            raise BusUnavailable("the Kafka subscription is not started")
        return self._consumer

    async def fetch(self, *, max_records: int = 500, timeout_s: float = 1.0) -> list[Message]:
        """Records after the last fetched ones; broker errors become ``BusUnavailable``."""
        consumer = self._require()
        try:
            # getmany first waits, without any bound, for a group assignment while a
            # rebalance runs (forever if the broker died mid-join): bound it by what a join
            # may take, so the worker sees its stop signal and `pubrelay replay` its deadline.
            t = self._timing
            join_s = (t.rebalance_timeout_ms or t.session_timeout_ms) / 1000
            async with asyncio.timeout(timeout_s + join_s):
                batches = await consumer.getmany(
                    timeout_ms=int(timeout_s * 1000), max_records=max_records
                )
        except TimeoutError:
            self._joining = True  # still waiting for the group to settle
            return []
        except KafkaError as err:
            raise BusUnavailable(f"the Kafka consumer cannot fetch: {err!r}") from err
        self._joining = False
        return [
            Message(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
                value=record.value if record.value is not None else b"",
                headers=tuple((k, v if v is not None else b"") for k, v in record.headers),
                timestamp_ms=record.timestamp,
            )
            for records in batches.values()
            for record in records
        ]

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit offsets of partitions still assigned to this member.

        Offsets of partitions already revoked are dropped (logged): their records are
        delivered again to the new owner, which the idempotency ledger absorbs.
        """
        consumer = self._require()
        assigned = consumer.assignment()
        wanted = {_theirs(tp): offset for tp, offset in offsets.items()}
        kept = {tp: offset for tp, offset in wanted.items() if tp in assigned}
        if len(kept) < len(wanted):
            log.info(
                "bus_commit_skipped_unassigned",
                bus="kafka",
                group=self.group,
                partitions=len(wanted) - len(kept),
            )
        if not kept:
            return
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                await consumer.commit(kept)
        except IllegalStateError as err:  # revoked between the check and the commit
            log.info("bus_commit_skipped_unassigned", bus="kafka", group=self.group, error=str(err))
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka consumer cannot commit: {err!r}") from err

    async def lag(self) -> Mapping[TopicPartition, int]:
        """End offset minus committed offset per assigned partition.

        The end offset comes from a ListOffsets request. The Tansu test broker reports
        end offsets up to a batch low, so the lag read against it is low too.
        """
        consumer = self._require()
        assigned = [] if self._joining else list(consumer.assignment())
        if not assigned:
            return {}
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                ends = await consumer.end_offsets(assigned)
                starts = await consumer.beginning_offsets(assigned)
                out: dict[TopicPartition, int] = {}
                for tp in assigned:
                    committed = await consumer.committed(tp)
                    done = starts[tp] if committed is None else committed
                    out[_ours(tp)] = max(0, ends[tp] - done)
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka consumer cannot read its lag: {err!r}") from err
        return out
