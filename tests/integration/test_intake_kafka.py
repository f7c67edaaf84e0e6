"""The webhook app on a Kafka bus whose topics may not be created."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from schemas.record import header
from tests.fixtures.app import event_body, signed_headers
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.worker import read_all

pytestmark = pytest.mark.kafka

MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]


async def test_event_whose_topic_may_not_be_created_is_quarantined_not_refused(
    aiohttp_client: Callable[..., Any], make_app: MakeApp, kafka_broker: TansuBroker
) -> None:
    settings = kafka_bus_settings(kafka_broker, auto_create_topics=False)
    admin = make_kafka_bus(settings.model_copy(update={"auto_create_topics": True}))
    await admin.start()
    await admin.ensure_topics([settings.topic_prefix + "quarantine"])
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        app, registry = make_app(bus, topic_prefix=settings.topic_prefix)
        client = await aiohttp_client(app)
        envelope = json.loads(event_body(event_id="evv_1", event_type="voucher.published"))
        body = json.dumps(envelope).encode()

        response = await client.post(
            "/webhooks/voucherify", data=body, headers=signed_headers(body)
        )

        assert response.status == 202
        assert (await response.json())["status"] == "quarantined"
        [kept] = await read_all(admin, settings.topic_prefix + "quarantine", expect=1)
        assert kept.value == body
        assert header(kept.headers, "quarantine-reason") == b"no_topic"
        assert header(kept.headers, "event-id") == b"evv_1"
        assert (
            registry.get_sample_value("pubrelay_webhook_quarantined_total", {"reason": "no_topic"})
            == 1
        )
    finally:
        await bus.close()
        await admin.close()


@pytest.mark.parametrize(
    "body",
    [event_body(event_id="evv_2", event_type="voucher.published"), b"not json at all"],
    ids=["new-event-type", "unroutable-body"],
)
async def test_no_quarantine_topic_either_is_a_503_not_a_500(
    aiohttp_client: Callable[..., Any], make_app: MakeApp, kafka_broker: TansuBroker, body: bytes
) -> None:
    settings = kafka_bus_settings(kafka_broker, auto_create_topics=False)
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        app, _ = make_app(bus, topic_prefix=settings.topic_prefix)
        client = await aiohttp_client(app)

        response = await client.post(
            "/webhooks/voucherify", data=body, headers=signed_headers(body)
        )

        assert response.status == 503
        assert "Retry-After" in response.headers
    finally:
        await bus.close()
