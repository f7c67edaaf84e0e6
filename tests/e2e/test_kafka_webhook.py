"""`pubrelay webhook` as its own process on a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from bus.config import BusSettings
from bus.types import Message
from consumer.signature import sign
from schemas.record import header
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import Launcher
from tests.fixtures.samples import sample_publication_body

pytestmark = pytest.mark.kafka

SECRET = "kafka-e2e-secret"
EVENT_TOPIC = "customer.publication.succeeded"
CREATED_AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def webhook_env(settings: BusSettings) -> dict[str, str]:
    return {
        "PUBRELAY_BUS__URL": settings.url,
        "PUBRELAY_BUS__TOPIC_PREFIX": settings.topic_prefix,
        "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
        "PUBRELAY_BUS__REPLICATION_FACTOR": "1",
        "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
        "PUBRELAY_BUS__PUBLISH_TIMEOUT_S": "2",
        "PUBRELAY_BUS__REQUEST_TIMEOUT_S": "2",
        "PUBRELAY_BUS__PARTITIONS": "3",
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
    }


def body_for(n: int) -> bytes:
    return sample_publication_body(
        event_id=f"evcus_k{n}",
        delivery_id=f"whs_k{n}",
        customer_id=f"cust_{n % 40}",
        email=f"customer{n}@example.com",
        code=f"CODE-{n}",
        created_at=CREATED_AT,
    )


async def post(session: aiohttp.ClientSession, url: str, n: int) -> int:
    body = body_for(n)
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, body)}
    try:
        async with session.post(url, data=body, headers=headers) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def read_all(settings: BusSettings, expect: int, timeout_s: float = 30) -> list[Message]:
    bus = make_kafka_bus(settings)
    await bus.start()
    sub = bus.subscribe("e2e-reader", [settings.topic_prefix + EVENT_TOPIC])
    await sub.start()
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            out.extend(await sub.fetch(max_records=1000, timeout_s=1.0))
    finally:
        await sub.close()
        await bus.close()
    return out


def test_500_deliveries_are_all_on_their_topic_with_key_and_headers(
    run_pubrelay: Launcher, kafka_broker: TansuBroker
) -> None:
    settings = kafka_bus_settings(kafka_broker)
    webhook = run_pubrelay(["webhook"], env=webhook_env(settings))
    webhook.wait_ready()
    url = f"{webhook.url}/webhooks/voucherify"

    async def scenario() -> tuple[list[int], list[Message]]:
        limit = asyncio.Semaphore(32)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

            async def one(n: int) -> int:
                async with limit:
                    return await post(session, url, n)

            statuses = await asyncio.gather(*(one(n) for n in range(500)))
        return list(statuses), await read_all(settings, expect=500)

    statuses, records = asyncio.run(scenario())

    assert statuses == [202] * 500
    by_event = {header(r.headers, "event-id"): r for r in records}
    assert len(records) == 500
    assert set(by_event) == {f"evcus_k{n}".encode() for n in range(500)}
    for n in (0, 1, 250, 499):
        record = by_event[f"evcus_k{n}".encode()]
        assert record.key == f"cust_{n % 40}".encode()
        assert record.value == body_for(n)
        assert header(record.headers, "delivery-id") == f"whs_k{n}".encode()
        assert header(record.headers, "event-type") == EVENT_TOPIC.encode()
        assert header(record.headers, "received-at") is not None
    # Per-customer order: one customer's events sit in one partition, in sending order
    # (sending was concurrent, so compare only those sent one after the other).
    assert len({r.partition for r in records if r.key == b"cust_7"}) == 1


def test_broker_killed_mid_load_gives_503s_and_acceptance_resumes_by_itself(
    run_pubrelay: Launcher, fresh_kafka_broker: TansuBroker
) -> None:
    settings = kafka_bus_settings(fresh_kafka_broker)
    webhook = run_pubrelay(["webhook"], env=webhook_env(settings))
    webhook.wait_ready()
    url = f"{webhook.url}/webhooks/voucherify"

    async def scenario() -> dict[str, Any]:
        statuses: list[tuple[float, int, int]] = []
        started = time.monotonic()
        killed_at = restarted_at = 0.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            n = 0
            while n < 2000 and time.monotonic() - started < 60:
                now = time.monotonic() - started
                if not killed_at and n == 50:
                    fresh_kafka_broker.kill()
                    killed_at = now
                if killed_at and not restarted_at and now - killed_at > 4:
                    await asyncio.to_thread(fresh_kafka_broker.start)
                    restarted_at = time.monotonic() - started
                sent_at = time.monotonic() - started
                batch = await asyncio.gather(*(post(session, url, n + i) for i in range(10)))
                statuses += [(sent_at, n + i, s) for i, s in enumerate(batch)]
                n += 10
                await asyncio.sleep(0.05)  # refusals are fast: pace the senders
                accepted_after = [s for t, _, s in statuses if restarted_at and t > restarted_at]
                if accepted_after.count(202) >= 50:
                    break
        return {"statuses": statuses, "killed_at": killed_at, "restarted_at": restarted_at}

    result = asyncio.run(scenario())
    statuses = result["statuses"]
    during = [s for t, _, s in statuses if result["killed_at"] <= t < result["restarted_at"]]
    after = [(n, s) for t, n, s in statuses if t >= result["restarted_at"]]

    assert webhook.proc.poll() is None, "the webhook process must survive the outage"
    assert result["restarted_at"] > 0
    assert during
    assert set(during) == {503}  # a dead broker stores nothing, so nothing may get 2xx
    assert [s for _, s in after].count(202) >= 50, "acceptance did not resume"
    accepted_after = {f"evcus_k{n}".encode() for n, s in after if s == 202}
    stored = asyncio.run(read_all(settings, expect=len(accepted_after)))
    assert accepted_after <= {header(r.headers, "event-id") for r in stored}


def test_serve_on_kafka_takes_events_in_and_runs_the_handlers(
    run_pubrelay: Launcher, kafka_broker: TansuBroker
) -> None:
    settings = kafka_bus_settings(kafka_broker)
    env = {
        **webhook_env(settings),
        "PUBRELAY_HANDLERS__ENABLED": '["metrics"]',
        "PUBRELAY_WORKER__GROUP_PREFIX": settings.topic_prefix,  # a group of its own
    }
    server = run_pubrelay(["serve"], env=env)
    server.wait_ready()

    async def scenario() -> float:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            url = f"{server.url}/webhooks/voucherify"
            statuses = await asyncio.gather(*(post(session, url, n) for n in range(20)))
            assert statuses == [202] * 20
            deadline = time.monotonic() + 60
            total = 0.0
            while time.monotonic() < deadline:
                async with session.get(f"{server.url}/metrics") as response:
                    text = await response.text()
                total = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("pubrelay_publications_total{")
                )
                if total >= 20:
                    break
                await asyncio.sleep(0.2)
            return total

    assert asyncio.run(scenario()) == 20
    assert server.terminate() == 0
