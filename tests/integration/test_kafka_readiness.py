"""`/readyz` on Kafka says what a publish meets: a cluster that answers metadata but refuses
every write (a partition short of in-sync replicas) made `/readyz` 200 while each webhook
got 503. :class:`tests.fixtures.kafka_size_limit.SizeLimitProxy` plays the refusing broker
in front of Tansu."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.kafka import producer as kafka_producer
from schemas.topics import quarantine_topic, topic_for
from tests.fixtures.app import event_body, signed_headers
from tests.fixtures.kafka import kafka_bus_settings, make_kafka_bus
from tests.fixtures.kafka_size_limit import NOT_ENOUGH_REPLICAS, SizeLimitProxy

pytestmark = pytest.mark.kafka

MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]
PATH = "/webhooks/voucherify"


async def test_readyz_is_503_while_the_cluster_refuses_writes_and_200_once_it_stores(
    aiohttp_client: Callable[..., Any],
    make_app: MakeApp,
    size_limited_kafka: SizeLimitProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = size_limited_kafka
    settings = kafka_bus_settings(proxy.broker, url=proxy.url, publish_timeout_s=1.5)
    prefix = settings.topic_prefix
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([topic_for(prefix, "customer.publication.succeeded")])
        await bus.ensure_topics([quarantine_topic(prefix)])
        app, _ = make_app(bus, topic_prefix=prefix)
        client = await aiohttp_client(app)
        assert (await client.get("/readyz")).status == 200

        proxy.refuse_all = NOT_ENOUGH_REPLICAS
        body = event_body(event_id="ev_refused")
        assert (await client.post(PATH, data=body, headers=signed_headers(body))).status == 503
        assert (await client.get("/readyz")).status == 503  # metadata still answers

        # Not for good: with no publish at all, ready again after the window.
        monkeypatch.setattr(kafka_producer, "UNREADY_AFTER_FAILED_PUBLISH_S", 0.0)
        assert (await client.get("/readyz")).status == 200
        monkeypatch.undo()

        assert (await client.post(PATH, data=body, headers=signed_headers(body))).status == 503
        assert (await client.get("/readyz")).status == 503
        proxy.refuse_all = None
        stored = event_body(event_id="ev_stored")
        assert (await client.post(PATH, data=stored, headers=signed_headers(stored))).status == 202
        assert (await client.get("/readyz")).status == 200  # at once
    finally:
        await bus.close()
