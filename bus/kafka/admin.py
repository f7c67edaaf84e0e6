"""The Kafka bus's topics: listing them, checking and creating them, and re-checking them
after a failure.

Topics are created (or checked) by :meth:`KafkaTopics.ensure`, which the process edge
calls at start-up through ``KafkaBus.ensure_topics``. The bus remembers those topics and
checks them again once, before the first publish after a failure (one shared check, not
one per request): a broker that lost its topics (a memory-storage broker such as Tansu
after a restart, a rebuilt cluster) gets them back with the configured partitions before
new records are sent, instead of records going to a topic the broker does not list.
While the bus is healthy this costs nothing; after an outage it is one metadata request.

The first publish to a topic not yet ensured (a new event type, a dead-letter topic)
ensures it first, so a cluster without broker-side auto-creation does not stall the send
until the timeout.

Topics are created durable (:func:`topic_configs`): ``replication_factor`` replicas and
``min.insync.replicas`` from the settings (so ``acks=all`` means "on that many brokers"),
``max.message.bytes`` large enough for every record the producer may send, and the topics
that wait for a human (quarantine, dead letters) never expire by age (``retention.ms=-1``
unless ``kept_topics_retention_s`` says otherwise). A cluster with fewer live brokers than
``replication_factor`` stops start-up with a message naming the settings. A quarantine or
dead-letter topic that already exists with a finite retention is left as it is, and a
warning names it (it was created by someone else, or by an older pubrelay).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    NoError,
    PolicyViolationError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from bus.config import BusSettings
from bus.kafka._futures import retrieve
from bus.kafka.options import ClientOptions
from schemas.errors import BusUnavailable, ConfigError, TopicMissing
from schemas.topics import is_kept_topic

log = structlog.get_logger("pubrelay.bus.kafka")

# CreateTopics answers, by what they mean for us.
_CREATED = frozenset({NoError.errno, TopicAlreadyExistsError.errno})
_REJECTED_SETTINGS = frozenset(
    {
        InvalidPartitionsError.errno,
        InvalidReplicationFactorError.errno,
        InvalidConfigurationError.errno,
    }
)
_NOT_ALLOWED = frozenset(
    {
        TopicAuthorizationFailedError.errno,
        ClusterAuthorizationFailedError.errno,
        PolicyViolationError.errno,
    }
)


class KafkaTopics:
    """The topics one Kafka bus publishes to.

    Lists them through the producer's metadata (``producer`` returns the bus's current
    producer, ``None`` while it is not started), creates missing ones with an admin
    client, and remembers those it ensured.
    """

    def __init__(
        self,
        settings: BusSettings,
        options: ClientOptions,
        producer: Callable[[], Any],
    ) -> None:
        self._settings = settings
        self._options = options
        self._producer = producer
        self._ensured: set[str] = set()
        self._ensuring: dict[str, asyncio.Task[None]] = {}
        self._recheck_wanted = False
        self._recheck: asyncio.Task[None] | None = None
        self._retention_checked: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()

    def recheck_later(self) -> None:
        """After a failure: check the ensured topics again before the next publish."""
        self._recheck_wanted = bool(self._ensured)

    def close(self) -> None:
        """Stop a re-check (and a retention check) still running."""
        if self._recheck is not None and not self._recheck.done():
            self._recheck.cancel()
        for task in self._background:
            task.cancel()

    def ready_for(self, topic: str) -> bool:
        """True when :meth:`before_publish` has nothing to do for ``topic``."""
        return not self._recheck_wanted and topic in self._ensured

    async def before_publish(self, topic: str) -> None:
        """Re-check the topics after a failure, and ensure ``topic`` on its first publish."""
        if self._recheck_wanted:
            await self._recheck_once()
        if topic not in self._ensured:
            await self._ensure_new(topic)

    async def names(self) -> set[str]:
        """Every topic of the cluster, without asking the broker to auto-create any."""
        return set((await self._cluster()).topics())

    async def _cluster(self) -> Any:
        """The cluster's metadata (topics and live brokers)."""
        producer = self._producer()
        if producer is None:
            raise BusUnavailable("the Kafka bus is not started")
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                return await producer.client.fetch_all_metadata()
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka bus does not answer: {err!r}") from err

    async def ensure(self, topics: Iterable[str]) -> None:
        """Check the topics exist; create the missing ones when ``auto_create_topics``.

        Bounded by ``request_timeout_s`` for the check and again for the creation.
        Raises :class:`TopicMissing` naming the topics when they may not be created,
        :class:`ConfigError` when the cluster rejects the partition or replication
        settings, :class:`BusUnavailable` when the cluster does not answer.
        """
        wanted = sorted(set(topics))
        cluster = await self._cluster()
        existing = set(cluster.topics())
        missing = [t for t in wanted if t not in existing]
        self._check_retention_later([t for t in wanted if t in existing])
        if not missing:
            self._ensured.update(wanted)
            return
        if not self._settings.auto_create_topics:
            raise TopicMissing(
                f"Kafka topics missing: {', '.join(missing)} "
                "(create them, or set PUBRELAY_BUS__AUTO_CREATE_TOPICS=true)"
            )
        self._check_brokers(len(cluster.brokers()), missing)
        await self._create(missing)
        self._ensured.update(wanted)
        log.info("bus_topics_created", bus="kafka", topics=missing)

    async def _ensure_new(self, topic: str) -> None:
        """Ensure a topic on its first publish; concurrent first publishes share one check."""
        task = self._ensuring.get(topic)
        if task is None:
            task = asyncio.create_task(self.ensure([topic]))
            task.add_done_callback(retrieve)
            task.add_done_callback(lambda _: self._ensuring.pop(topic, None))
            self._ensuring[topic] = task
        try:
            await asyncio.shield(task)
        except ConfigError as err:
            raise BusUnavailable(f"the Kafka bus cannot use topic {topic}: {err}") from err
        # TopicMissing passes through: the caller decides (the intake quarantines the event).

    async def _recheck_once(self) -> None:
        """Re-ensure the remembered topics after a failure; concurrent publishes share it."""
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.create_task(self._recheck_now())
            self._recheck.add_done_callback(retrieve)
        try:
            await asyncio.shield(self._recheck)
        except (TopicMissing, ConfigError) as err:
            raise BusUnavailable(f"the Kafka bus cannot use its topics: {err}") from err

    async def _recheck_now(self) -> None:
        await self.ensure(self._ensured)
        self._recheck_wanted = False
        log.info("bus_topics_rechecked", bus="kafka", topics=len(self._ensured))

    def _check_brokers(self, brokers: int, missing: list[str]) -> None:
        """Refuse to create topics with more replicas than the cluster has live brokers."""
        s = self._settings
        if 0 < brokers < s.replication_factor:
            raise ConfigError(
                f"PUBRELAY_BUS__REPLICATION_FACTOR={s.replication_factor}, but the Kafka "
                f"cluster at {s.url} has {brokers} live broker(s), so topics "
                f"{', '.join(missing)} cannot be created; on a single development broker set "
                "PUBRELAY_BUS__REPLICATION_FACTOR=1 and PUBRELAY_BUS__MIN_INSYNC_REPLICAS=1"
            )

    async def _create(self, names: list[str]) -> None:
        s = self._settings
        admin = AIOKafkaAdminClient(**self._options)
        new = [
            NewTopic(n, s.partitions, s.replication_factor, topic_configs=topic_configs(s, n))
            for n in names
        ]
        try:
            async with asyncio.timeout(s.request_timeout_s):
                await admin.start()
                response = await admin.create_topics(
                    new, timeout_ms=int(s.request_timeout_s * 1000)
                )
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"cannot create Kafka topics {names}: {err!r}") from err
        finally:
            with contextlib.suppress(KafkaError, TimeoutError):
                await admin.close()
        _check_created(response.topic_errors)
        self._retention_checked.update(names)

    def _check_retention_later(self, existing: list[str]) -> None:
        """Check once, in the background, that existing quarantine and dead-letter topics
        keep their records as long as configured; never delays a publish."""
        prefix = self._settings.topic_prefix
        kept = [
            t for t in existing if is_kept_topic(prefix, t) and t not in self._retention_checked
        ]
        if not kept:
            return
        self._retention_checked.update(kept)
        task = asyncio.create_task(self._warn_expiring(kept))
        task.add_done_callback(retrieve)
        task.add_done_callback(self._background.discard)
        self._background.add(task)

    async def _warn_expiring(self, topics: list[str]) -> None:
        """Log ``bus_topic_expires`` for each topic whose ``retention.ms`` differs from
        the configured one. Best effort: a cluster that refuses to describe configs (an
        ACL) is logged at debug level and left alone."""
        s = self._settings
        admin = AIOKafkaAdminClient(**self._options)
        # Every config of each topic: a filter by name trips some Kafka-protocol brokers
        # (Tansu cannot decode it) and the answer is small.
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        try:
            async with asyncio.timeout(s.request_timeout_s):
                await admin.start()
                responses = await admin.describe_configs(resources)
        except (TimeoutError, KafkaError) as err:
            log.debug("bus_topic_configs_unknown", bus="kafka", topics=topics, error=repr(err))
            return
        finally:
            with contextlib.suppress(KafkaError, TimeoutError):
                await admin.close()
        wanted = kept_retention_ms(s)
        for response in responses:
            for resource in response.resources:
                error_code, _, _, name, entries = resource[:5]
                actual = next((e[1] for e in entries if e[0] == "retention.ms"), None)
                if error_code != NoError.errno or actual is None or actual == wanted:
                    continue
                log.warning(
                    "bus_topic_expires",
                    bus="kafka",
                    topic=name,
                    retention_ms=actual,
                    wanted_retention_ms=wanted,
                    fix=f"kafka-configs.sh --alter --entity-type topics --entity-name {name} "
                    f"--add-config retention.ms={wanted}",
                )


def kept_retention_ms(settings: BusSettings) -> str:
    """``retention.ms`` of quarantine and dead-letter topics: ``-1`` (never) by default."""
    retention = settings.kept_topics_retention_s
    return "-1" if retention is None else str(retention * 1000)


def topic_configs(settings: BusSettings, topic: str) -> dict[str, str]:
    """The topic-level configuration of a topic pubrelay creates."""
    configs = {
        "min.insync.replicas": str(settings.min_insync_replicas),
        # Every batch the producer builds fits: one record up to max_record_bytes, or
        # several up to max_batch_bytes.
        "max.message.bytes": str(max(settings.max_record_bytes, settings.max_batch_bytes)),
    }
    if is_kept_topic(settings.topic_prefix, topic):
        configs["retention.ms"] = kept_retention_ms(settings)
        configs["retention.bytes"] = "-1"
    return configs


def _check_created(topic_errors: Sequence[tuple[Any, ...]]) -> None:
    """Turn CreateTopics error codes into our errors (an existing topic is fine)."""
    for item in topic_errors:
        name, code = item[0], item[1]
        message = item[2] if len(item) > 2 else None
        if code in _CREATED:
            continue
        detail = f"{name}: error {code} {message or ''}".strip()
        if code in _REJECTED_SETTINGS:
            raise ConfigError(
                "the Kafka cluster rejected PUBRELAY_BUS__PARTITIONS, REPLICATION_FACTOR, "
                "MIN_INSYNC_REPLICAS, MAX_RECORD_BYTES or KEPT_TOPICS_RETENTION_S "
                f"for topic {detail}"
            )
        if code in _NOT_ALLOWED:
            raise TopicMissing(f"Kafka topic may not be created: {detail}")
        raise BusUnavailable(f"Kafka topic could not be created: {detail}")
