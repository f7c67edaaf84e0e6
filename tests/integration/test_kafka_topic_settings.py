"""Topics pubrelay creates on Kafka are durable, and kept topics never expire.

Checked as the broker reports them (DescribeConfigs). Tansu stores and reports the
topic configs a CreateTopics request carries (it does not act on them: one node, memory
storage), which is what is asserted here: the request pubrelay builds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.errors import ConfigError
from schemas.topics import dlq_topic, quarantine_topic, topic_for
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus

pytestmark = pytest.mark.kafka

EVENT_TYPE = "customer.publication.succeeded"


async def reported_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's configs as the broker describes them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
        )
    finally:
        await admin.close()
    return {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}
        for response in responses
        for resource in response.resources
    }


async def described_partitions(bootstrap: str, topics: list[str]) -> dict[str, list[Any]]:
    """Each topic's partitions as the broker describes them (leader, replicas, in sync)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return {topic["topic"]: topic["partitions"] for topic in described}


async def test_created_topics_are_replicated_and_quarantine_and_dead_letters_never_expire(
    kafka_broker: TansuBroker,
) -> None:
    settings = kafka_bus_settings(kafka_broker)
    prefix = settings.topic_prefix
    event, quarantine = topic_for(prefix, EVENT_TYPE), quarantine_topic(prefix)
    dead_letters = dlq_topic(prefix, "email")
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([event, quarantine])
        await bus.publish(dead_letters, b"failed event")  # created on its first publish
    finally:
        await bus.close()

    configs = await reported_configs(kafka_broker.bootstrap, [event, quarantine, dead_letters])

    partitions = await described_partitions(
        kafka_broker.bootstrap, [event, quarantine, dead_letters]
    )
    for topic in (event, quarantine, dead_letters):
        assert len(partitions[topic]) == settings.partitions, topic
        for partition in partitions[topic]:
            assert len(partition["replicas"]) == settings.replication_factor, (topic, partition)
        assert configs[topic]["min.insync.replicas"] == "1", topic
        assert configs[topic]["max.message.bytes"] == str(settings.max_record_bytes), topic
    for kept in (quarantine, dead_letters):
        assert configs[kept]["retention.ms"] == "-1", kept
        assert configs[kept]["retention.bytes"] == "-1", kept
    assert "retention.ms" not in configs[event]  # events follow the cluster's retention


async def test_retention_of_kept_topics_is_configurable(kafka_broker: TansuBroker) -> None:
    settings = kafka_bus_settings(kafka_broker, kept_topics_retention_s=90 * 86400)
    quarantine = quarantine_topic(settings.topic_prefix)
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([quarantine])
    finally:
        await bus.close()

    configs = await reported_configs(kafka_broker.bootstrap, [quarantine])

    assert configs[quarantine]["retention.ms"] == str(90 * 86400 * 1000)


async def test_default_replication_on_a_single_broker_stops_start_naming_the_settings(
    kafka_broker: TansuBroker,
) -> None:
    # The defaults suit a 3-broker cluster; Tansu is one broker (and would accept them).
    settings = kafka_bus_settings(kafka_broker, replication_factor=3, min_insync_replicas=2)
    topic = topic_for(settings.topic_prefix, EVENT_TYPE)
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        with pytest.raises(ConfigError) as refused:
            await bus.ensure_topics([topic])
        assert topic not in await bus._topics.names()
    finally:
        await bus.close()

    message = str(refused.value)
    assert "PUBRELAY_BUS__REPLICATION_FACTOR=3" in message
    assert "1 live broker" in message
    assert "PUBRELAY_BUS__REPLICATION_FACTOR=1 and PUBRELAY_BUS__MIN_INSYNC_REPLICAS=1" in message


async def test_an_existing_quarantine_topic_that_expires_is_named_in_a_warning(
    kafka_broker: TansuBroker,
) -> None:
    settings = kafka_bus_settings(kafka_broker)
    quarantine = quarantine_topic(settings.topic_prefix)
    week_ms = str(7 * 86400 * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:  # as an older pubrelay, or a cluster's auto-creation, left it
        await admin.create_topics(
            [NewTopic(quarantine, 1, 1, topic_configs={"retention.ms": week_ms})]
        )
    finally:
        await admin.close()
    bus = make_kafka_bus(settings)
    with structlog.testing.capture_logs() as logs:
        await bus.start()
        try:
            await bus.ensure_topics([quarantine])
            deadline = time.monotonic() + 5
            while not any(e["event"] == "bus_topic_expires" for e in logs):
                assert time.monotonic() < deadline, "no bus_topic_expires warning"
                await asyncio.sleep(0.05)
        finally:
            await bus.close()

    [warning] = [e for e in logs if e["event"] == "bus_topic_expires"]
    assert warning["log_level"] == "warning"
    assert warning["topic"] == quarantine
    assert warning["retention_ms"] == week_ms
    assert f"--entity-name {quarantine} --add-config retention.ms=-1" in warning["fix"]
    assert (await reported_configs(kafka_broker.bootstrap, [quarantine]))[quarantine][
        "retention.ms"
    ] == week_ms  # left as it is: changing a topic's retention is the operator's call


async def test_unsafe_acks_with_the_opt_in_are_logged_loudly_at_start(
    kafka_broker: TansuBroker,
) -> None:
    settings = kafka_bus_settings(kafka_broker, acks="1", allow_unsafe_acks=True)
    bus = make_kafka_bus(settings)
    with structlog.testing.capture_logs() as logs:
        await bus.start()
        await bus.close()

    [warning] = [e for e in logs if e["event"] == "bus_unsafe_acks"]
    assert warning["log_level"] == "warning"
    assert "PUBRELAY_BUS__ALLOW_UNSAFE_ACKS" in warning["message"]
