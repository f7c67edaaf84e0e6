"""What only the Kafka bus does: topic administration, start-up checks, broker outages, rebalances.

Against Tansu (memory storage) a restarted broker starts empty, and it accepts records for
a topic it no longer lists, which no consumer then sees. Re-ensuring topics after an
outage therefore belongs to the bus itself: :class:`KafkaBus` checks the topics it was
asked to ensure once before the first publish after a failure, so the process needs
neither a restart nor a new bus object.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2

from bus.config import BusSettings
from bus.kafka import KafkaBus
from bus.types import Message, Subscription, TopicPartition
from schemas.errors import BusUnavailable, ConfigError, TopicMissing
from tests.fixtures.kafka import (
    PRODUCE_PATHS,
    TansuBroker,
    free_port,
    kafka_bus_settings,
    make_kafka_bus,
)
from tests.fixtures.kafka_size_limit import NOT_ENOUGH_REPLICAS, SizeLimitProxy

pytestmark = pytest.mark.kafka


@pytest.fixture
async def kafka_bus(kafka_settings: BusSettings) -> AsyncIterator[KafkaBus]:
    bus = make_kafka_bus(kafka_settings)
    await bus.start()
    yield bus
    await bus.close()


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        listed = set(await admin.list_topics())
        present = [t for t in topics if t in listed]
        described = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


async def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every value on ``topic``, read by a plain aiokafka consumer without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [KafkaTopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        batches = await consumer.getmany(timeout_ms=1000)
    finally:
        await consumer.stop()
    return [r.value for records in batches.values() for r in records]


@pytest.mark.parametrize("compression", ["gzip", "snappy", "lz4", "zstd"])
@PRODUCE_PATHS
async def test_each_compression_the_settings_offer_stores_records_read_back_whole(
    kafka_broker: TansuBroker, compression: str, own_requests: bool | None
) -> None:
    settings = kafka_bus_settings(kafka_broker, compression=compression)
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    topic = f"{settings.topic_prefix}compressed"
    values = [f"record {n} ".encode() * 200 for n in range(20)]
    try:
        await bus.ensure_topics([topic])
        await asyncio.gather(*(bus.publish(topic, v, key=b"k") for v in values))
    finally:
        await bus.close()
    assert sorted(await read_topic(kafka_broker.bootstrap, topic)) == sorted(values)


async def test_ensure_topics_creates_missing_topics_with_configured_partitions(
    kafka_broker: TansuBroker,
) -> None:
    settings = kafka_bus_settings(kafka_broker, partitions=2)
    topics = [settings.topic_prefix + "created-a", settings.topic_prefix + "created-b"]
    assert await partition_counts(kafka_broker.bootstrap, topics) == {}
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics(topics)
    finally:
        await bus.close()

    assert await partition_counts(kafka_broker.bootstrap, topics) == dict.fromkeys(topics, 2)


async def test_ensure_topics_without_auto_create_raises_topic_missing_naming_the_topic(
    kafka_broker: TansuBroker, kafka_bus: KafkaBus
) -> None:
    existing = kafka_bus.settings.topic_prefix + "exists"
    await kafka_bus.ensure_topics([existing])
    strict = make_kafka_bus(kafka_bus.settings.model_copy(update={"auto_create_topics": False}))
    await strict.start()
    missing = kafka_bus.settings.topic_prefix + "never-created"
    try:
        await strict.ensure_topics([existing])  # present: fine
        with pytest.raises(TopicMissing, match=missing):
            await strict.ensure_topics([existing, missing])
    finally:
        await strict.close()

    assert await partition_counts(kafka_broker.bootstrap, [missing]) == {}


async def test_idempotent_producer_against_tansu_fails_fast_with_the_setting_to_change(
    kafka_settings: BusSettings,
) -> None:
    bus = KafkaBus(kafka_settings.model_copy(update={"enable_idempotence": True}))
    started = time.monotonic()

    with pytest.raises(ConfigError, match="PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false"):
        await bus.start()

    assert time.monotonic() - started < kafka_settings.request_timeout_s + 1.0
    with pytest.raises(BusUnavailable):  # nothing half-started is left behind
        await bus.publish(kafka_settings.topic_prefix + "x", b"v")


async def test_unreachable_broker_fails_start_with_bus_unavailable() -> None:
    settings = BusSettings(url=f"kafka://127.0.0.1:{free_port()}", enable_idempotence=False)
    bus = KafkaBus(settings)

    with pytest.raises(BusUnavailable, match=r"127\.0\.0\.1"):
        await bus.start()


async def fetch_until(subscription: Subscription, value: bytes, timeout_s: float) -> list[bytes]:
    """Fetch like a worker loop does (back off on ``BusUnavailable``) until ``value`` arrives."""
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while value not in seen and time.monotonic() < deadline:
        try:
            seen += [m.value for m in await subscription.fetch(timeout_s=0.5)]
        except BusUnavailable:
            await asyncio.sleep(0.2)
    return seen


@PRODUCE_PATHS
async def test_publish_fails_while_the_broker_is_down_and_recovers_on_the_same_bus(
    fresh_kafka_broker: TansuBroker, own_requests: bool | None
) -> None:
    broker = fresh_kafka_broker
    settings = kafka_bus_settings(broker, publish_timeout_s=1.0, request_timeout_s=2.0)
    topic = settings.topic_prefix + "outage"
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    subscription = bus.subscribe(settings.topic_prefix + "workers", [topic])
    try:
        await bus.ensure_topics([topic])
        await bus.publish(topic, b"before", key=b"cust_1")
        await subscription.start()
        assert b"before" in await fetch_until(subscription, b"before", 15.0)

        broker.kill()
        for _ in range(2):  # the bus keeps answering, each time within its timeout
            started = time.monotonic()
            with pytest.raises(BusUnavailable):
                await bus.publish(topic, b"while-down", key=b"cust_1")
            assert time.monotonic() - started < 2.0
        with pytest.raises(BusUnavailable):
            await bus.ping()
        # A consumer loop survives the outage: fetch returns nothing or BusUnavailable.
        assert b"before" not in await fetch_until(subscription, b"never", 1.0)

        broker.start()  # same port, empty memory storage
        deadline = time.monotonic() + 20.0
        attempts = 0
        while True:
            attempts += 1
            try:
                await bus.publish(topic, b"after", key=b"cust_1")
                break
            except BusUnavailable:
                assert time.monotonic() < deadline, "the bus did not recover"
                await asyncio.sleep(0.2)
        await bus.ping()
        # The bus re-created the topic it had ensured before sending "after".
        assert topic in await partition_counts(broker.bootstrap, [topic])

        # The same subscription object gets records again once the group re-formed.
        assert b"after" in await fetch_until(subscription, b"after", 20.0)
    finally:
        await subscription.close()
        await bus.close()

    assert b"after" in await read_topic(broker.bootstrap, topic)
    assert attempts < 50


async def test_partitions_moving_to_a_new_member_let_the_old_one_commit_first(
    kafka_bus: KafkaBus,
) -> None:
    topic = kafka_bus.settings.topic_prefix + "rebalance"
    group = kafka_bus.settings.topic_prefix + "workers"
    await kafka_bus.ensure_topics([topic])
    for i in range(9):
        await kafka_bus.publish(topic, b"v%d" % i, key=b"cust_%d" % i)

    finished: dict[TopicPartition, int] = {}
    revoked: list[TopicPartition] = []
    first: Subscription | None = None

    async def commit_finished(partitions: Collection[TopicPartition]) -> None:
        revoked.extend(partitions)
        assert first is not None
        await first.commit({tp: finished[tp] for tp in partitions if tp in finished})

    first = kafka_bus.subscribe(group, [topic], on_revoke=commit_finished)
    second = kafka_bus.subscribe(group, [topic])
    await first.start()
    try:
        deadline = time.monotonic() + 15.0
        while len(finished) < 3 or sum(finished.values()) < 9:
            assert time.monotonic() < deadline, "the first member did not get every record"
            for record in await first.fetch(timeout_s=0.5):
                finished[record.tp] = record.offset + 1  # "handled", not committed yet

        await second.start()
        redelivered: list[Message] = []
        # The second member reports partitions only once its group join has settled
        # (a fetch completed); until then both members keep fetching.
        while not await second.lag():
            assert time.monotonic() < deadline + 15.0, "no rebalance"
            await first.fetch(timeout_s=0.2)  # the first member keeps working meanwhile
            redelivered += await second.fetch(timeout_s=0.2)

        assert revoked, "the first member was not told before losing partitions"
        assert {tp.topic for tp in revoked} == {topic}
        # Finished work was committed on revoke, so the new member gets nothing again.
        assert sum((await second.lag()).values()) == 0
        redelivered += await second.fetch(timeout_s=1.0)
        assert redelivered == []
    finally:
        await second.close()
        await first.close()


async def read_records(bootstrap: str, topic: str, count: int) -> list[Any]:
    """``count`` records of ``topic`` (all partitions, from the start), bounded to 10 s."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [KafkaTopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + 10.0
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            records += [r for part in batches.values() for r in part]
    finally:
        await consumer.stop()
    return records


@PRODUCE_PATHS
async def test_records_submitted_together_land_on_their_keys_partitions_in_order(
    kafka_broker: TansuBroker, own_requests: bool | None
) -> None:
    # Small batches: one loop turn's records of a partition need several.
    settings = kafka_bus_settings(kafka_broker, partitions=4, max_batch_bytes=8 * 1024)
    topic = settings.topic_prefix + "together"
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    keys = [b"cust_%d" % n for n in range(7)]
    try:
        await bus.ensure_topics([topic])
        answers = [
            bus.submit(topic, b"%s-%03d-" % (key, i) + b"x" * 900, key=key)
            for i in range(40)
            for key in keys
        ]
        await asyncio.gather(*answers)
    finally:
        await bus.close()

    records = await read_records(kafka_broker.bootstrap, topic, 280)
    assert len(records) == 280
    for key in keys:
        mine = [r for r in records if r.key == key]
        assert [r.value[: len(key) + 4] for r in mine] == [b"%s-%03d" % (key, i) for i in range(40)]
        # The Java client's mapping (aiokafka's murmur2, independent of bus.kafka.partitioner).
        assert {r.partition for r in mine} == {(murmur2(key) & 0x7FFFFFFF) % 4}


@PRODUCE_PATHS
async def test_records_waiting_when_the_bus_closes_are_answered_not_left_hanging(
    fresh_kafka_broker: TansuBroker, own_requests: bool | None
) -> None:
    settings = kafka_bus_settings(fresh_kafka_broker, publish_timeout_s=9.0, request_timeout_s=1.0)
    topic = settings.topic_prefix + "closing"
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    await bus.ensure_topics([topic])
    fresh_kafka_broker.kill()
    # The first batch goes to the producer; the second waits for the first to be taken
    # by a request that cannot be made, and is still the bus's own when it closes.
    answers = [bus.submit(topic, b"v%d" % n, key=b"k") for n in range(5)]
    await asyncio.sleep(0.1)
    answers += [bus.submit(topic, b"w%d" % n, key=b"k") for n in range(5)]
    started = time.monotonic()

    await bus.close()

    assert time.monotonic() - started < 8.0  # bounded by request_timeout_s, not 9 s
    for answer in answers:
        assert answer.done()
        assert isinstance(answer.exception(), BusUnavailable)


@PRODUCE_PATHS
async def test_a_record_answered_while_earlier_batches_waited_is_left_out_of_its_batch(
    fresh_kafka_broker: TansuBroker, own_requests: bool | None
) -> None:
    """A record whose deadline passed before it reached a batch was answered "not
    stored" (the intake's 503): the bus must not store it afterwards, or the delivery
    Voucherify makes again would put the event on the log twice."""
    settings = kafka_bus_settings(fresh_kafka_broker, publish_timeout_s=9.0, request_timeout_s=6.0)
    topic = settings.topic_prefix + "left-out"
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    pid = fresh_kafka_broker.pid
    assert pid is not None
    try:
        await bus.ensure_topics([topic])
        await bus.publish(topic, b"before", key=b"k")  # the topic and its leader are known
        os.kill(pid, signal.SIGSTOP)  # the broker takes requests and answers none
        try:
            # a: in a produce request; b: the producer's, waiting for a's request to end;
            # c: in a batch that waits for b's to be taken; d: still the bus's own.
            stored = []
            for value in (b"a", b"b", b"c"):
                stored.append(bus.submit(topic, value, key=b"k"))
                await asyncio.sleep(0.2)
            late = bus.submit(topic, b"d", key=b"k", timeout_s=0.3)
            with pytest.raises(BusUnavailable):
                await asyncio.wait_for(late, 5.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*stored), 10.0)
        await bus.publish(topic, b"after", key=b"k")
    finally:
        await bus.close()

    assert await read_topic(fresh_kafka_broker.bootstrap, topic) == [
        b"before",
        b"a",
        b"b",
        b"c",
        b"after",
    ]


@PRODUCE_PATHS
async def test_records_sent_again_after_a_refusal_keep_their_order(
    size_limited_kafka: SizeLimitProxy, own_requests: bool | None
) -> None:
    """A batch the broker refused with a retriable error goes again ahead of the records
    of its partition that came meanwhile, as aiokafka puts a batch back."""
    proxy = size_limited_kafka
    settings = kafka_bus_settings(proxy.broker, url=proxy.url, publish_timeout_s=9.0)
    topic = settings.topic_prefix + "refused"
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    try:
        await bus.ensure_topics([topic])
        await bus.publish(topic, b"before", key=b"k")  # the topic and its leader are known
        proxy.refuse_all = NOT_ENOUGH_REPLICAS
        answers = []
        for n in range(6):  # the first refused and sent again while the others come
            answers.append(bus.submit(topic, b"v%d" % n, key=b"k"))
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.3)
        refused = proxy.refused
        proxy.refuse_all = None
        await asyncio.wait_for(asyncio.gather(*answers), 10.0)
    finally:
        await bus.close()

    assert refused >= 2  # sent again at least once while refused
    records = await read_records(proxy.broker.bootstrap, topic, 7)
    assert [r.value for r in records] == [b"before"] + [b"v%d" % n for n in range(6)]
