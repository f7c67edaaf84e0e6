"""A body the Kafka bus can never store gets 413, not an endless 503.

Kafka refuses a record over the producer's ``max_request_size`` (pubrelay's
``PUBRELAY_BUS__MAX_RECORD_BYTES``) or a batch over the broker's ``message.max.bytes``.
Both are permanent: answering 503 would only make Voucherify retry for a day and then
disable the webhook. Tansu enforces no size limit, so the broker's refusal is played by
:class:`tests.fixtures.kafka_size_limit.SizeLimitProxy` in front of it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTopicPartition
from prometheus_client import CollectorRegistry

from pubrelay.settings import Settings
from schemas.topics import quarantine_topic, topic_for
from tests.fixtures.app import SECRET, event_body, signed_headers
from tests.fixtures.kafka import PRODUCE_PATHS, TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.kafka_size_limit import MAX_MESSAGE_BYTES, SizeLimitProxy

pytestmark = pytest.mark.kafka

MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]
PATH = "/webhooks/voucherify"
EVENT_TYPE = "customer.publication.succeeded"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The app's settings (``make_app``), with time for a batch to linger and be resent."""
    return Settings(data_dir=tmp_path, webhook={"secrets": [SECRET]}, bus={"publish_timeout_s": 3})


def padded_body(size: int, *, event_id: str, customer_id: str = "cust_1") -> bytes:
    """A signed-able event body of about ``size`` bytes (a long customer metadata note)."""
    envelope = json.loads(event_body(event_id=event_id, customer_id=customer_id))
    envelope["data"]["customer"]["metadata"] = {"note": ""}
    filler = size - len(json.dumps(envelope, separators=(",", ":")))
    envelope["data"]["customer"]["metadata"]["note"] = "n" * max(filler, 0)
    return json.dumps(envelope, separators=(",", ":")).encode()


async def stored_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every value on ``topic``, read without a consumer group (no join to wait for)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [KafkaTopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        values: list[bytes] = []
        for _ in range(3):
            batches = await consumer.getmany(timeout_ms=300)
            values += [r.value for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    return values


def outcome_count(registry: CollectorRegistry, outcome: str) -> float | None:
    return registry.get_sample_value("pubrelay_webhook_requests_total", {"outcome": outcome})


async def test_body_over_the_producers_record_limit_is_a_413_and_nothing_is_stored(
    aiohttp_client: Callable[..., Any], make_app: MakeApp, kafka_broker: TansuBroker
) -> None:
    settings = kafka_bus_settings(kafka_broker, max_record_bytes=64 * 1024)
    topic = topic_for(settings.topic_prefix, EVENT_TYPE)
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([topic, quarantine_topic(settings.topic_prefix)])
        app, registry = make_app(bus, topic_prefix=settings.topic_prefix)
        client = await aiohttp_client(app)
        big = padded_body(200_000, event_id="ev_big")
        small = event_body(event_id="ev_small")

        with structlog.testing.capture_logs() as logs:
            refused = await client.post(PATH, data=big, headers=signed_headers(big))
        accepted = await client.post(PATH, data=small, headers=signed_headers(small))

        assert refused.status == 413
        assert (await refused.json())["status"] == "record_too_large"
        assert "Retry-After" not in refused.headers
        assert accepted.status == 202  # the refusal did not make the bus "unavailable"
        assert await stored_values(kafka_broker.bootstrap, topic) == [small]
        assert (
            await stored_values(kafka_broker.bootstrap, quarantine_topic(settings.topic_prefix))
            == []
        )
        assert outcome_count(registry, "record_too_large") == 1
        assert outcome_count(registry, "unavailable") == 0
        [line] = [e for e in logs if e["event"] == "webhook_request"]
        assert line["status"] == 413
        assert line["event_id"] == "ev_big"
        assert "PUBRELAY_BUS__MAX_RECORD_BYTES" in line["error"]
        [bus_line] = [e for e in logs if e["event"] == "bus_record_too_large"]
        assert bus_line["refused_by"] == "producer"
        assert bus_line["record_bytes"] > 200_000
    finally:
        await bus.close()


@PRODUCE_PATHS
async def test_body_the_broker_refuses_is_a_413_and_small_events_beside_it_are_stored(
    aiohttp_client: Callable[..., Any],
    make_app: MakeApp,
    size_limited_kafka: SizeLimitProxy,
    own_requests: bool | None,
) -> None:
    proxy = size_limited_kafka
    # A long linger puts concurrent events of one customer into one batch.
    settings = kafka_bus_settings(proxy.broker, url=proxy.url, linger_ms=50)
    topic = topic_for(settings.topic_prefix, EVENT_TYPE)
    bus = make_kafka_bus(settings, own_requests=own_requests)
    await bus.start()
    try:
        await bus.ensure_topics([topic, quarantine_topic(settings.topic_prefix)])
        app, registry = make_app(bus, topic_prefix=settings.topic_prefix)
        client = await aiohttp_client(app)
        big = padded_body(MAX_MESSAGE_BYTES + 50_000, event_id="ev_big")
        # Each fits the broker's limit alone; together their batch does not.
        pair = [padded_body(60_000, event_id=f"ev_half_{n}", customer_id="cust_2") for n in (1, 2)]

        refused = await client.post(PATH, data=big, headers=signed_headers(big))
        answers = await asyncio.gather(
            *(client.post(PATH, data=b, headers=signed_headers(b)) for b in pair)
        )

        assert refused.status == 413
        assert (await refused.json())["status"] == "record_too_large"
        assert [a.status for a in answers] == [202, 202]
        # The large body in a batch of its own (refused once: no neighbour to blame), and
        # the pair's shared batch once; then each of the pair alone, stored.
        assert proxy.refused == 2
        assert sorted(await stored_values(proxy.bootstrap, topic)) == sorted(pair)
        assert outcome_count(registry, "record_too_large") == 1
        assert outcome_count(registry, "accepted") == 2
    finally:
        await bus.close()
