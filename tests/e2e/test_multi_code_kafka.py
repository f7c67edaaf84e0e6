"""Multi-code publications across two `pubrelay worker` processes on a Kafka-protocol broker.

A publication's two events travel on two topics; the two workers of one consumer group may
each own one of them. Whatever the order and whichever worker gets which, each customer
gets one e-mail listing every code once (the publication claimed in the shared ledger).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.config import BusSettings
from schemas.record import HEADER_DELIVERY_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import Launcher, PubrelayProcess
from tests.fixtures.samples import sample_multi_code_events
from tests.fixtures.smtp import SmtpServer

pytestmark = pytest.mark.kafka

CUSTOMERS = 16
TYPES = ("publication.succeeded", "customer.publication.succeeded")


def codes_of(n: int) -> list[str]:
    return [f"KAFKA-{n}-{k}" for k in (1, 2, 3)]


def records() -> list[dict[str, Any]]:
    """Both events of each customer's publication; even customers' customer event first."""
    ordered: list[dict[str, Any]] = []
    for n in range(CUSTOMERS):
        pair = sample_multi_code_events(
            publication_event_id=f"evpub_{n}",
            customer_event_id=f"evcus_{n}",
            customer_id=f"cust_{n}",
            email=f"customer{n}@example.com",
            codes=codes_of(n),
        )
        ordered.extend(reversed(pair) if n % 2 == 0 else pair)
    return ordered


async def publish(settings: BusSettings, events: list[dict[str, Any]]) -> None:
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        await bus.ensure_topics([settings.topic_prefix + t for t in TYPES])
        for event in events:
            event_type = event["event"]["type"]
            await bus.publish(
                settings.topic_prefix + event_type,
                json.dumps(event, separators=(",", ":")).encode(),
                key=event["data"]["customer"]["id"].encode(),
                headers=(
                    (HEADER_EVENT_ID, event["event"]["id"].encode()),
                    (HEADER_EVENT_TYPE, event_type.encode()),
                    (HEADER_DELIVERY_ID, event["id"].encode()),
                ),
            )
    finally:
        await bus.close()


def finished(process: PubrelayProcess) -> float:
    """Events the e-mail handler of ``process`` finished (handled, skipped, duplicate)."""
    with urllib.request.urlopen(f"{process.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pubrelay_handler_events_total"
        and sample.labels.get("handler") == "email"
        and sample.labels.get("outcome") in ("handled", "skipped", "duplicate")
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


def test_two_workers_mail_each_multi_code_publication_once_with_every_code(
    run_pubrelay: Launcher, kafka_broker: TansuBroker, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    settings = kafka_bus_settings(kafka_broker, partitions=4)

    def start_worker(name: str) -> PubrelayProcess:
        process = run_pubrelay(
            ["worker"],
            env={
                "PUBRELAY_DATA_DIR": str(tmp_path / name),
                "PUBRELAY_BUS__URL": settings.url,
                "PUBRELAY_BUS__TOPIC_PREFIX": settings.topic_prefix,
                "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
                "PUBRELAY_BUS__REPLICATION_FACTOR": "1",
                "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
                "PUBRELAY_BUS__PARTITIONS": "4",
                "PUBRELAY_HANDLERS__ENABLED": '["email"]',
                "PUBRELAY_EMAIL__SMTP_URL": smtp_server.url,
                "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
                "PUBRELAY_EMAIL__SIBLING_HOLD_S": "4",
                "PUBRELAY_LEDGER__URL": f"sqlite:///{tmp_path / 'shared-ledger.sqlite3'}",
                "PUBRELAY_WORKER__COMMIT_INTERVAL_S": "0.2",
                "PUBRELAY_WORKER__RETRY_BASE_DELAY_S": "0.1",
            },
        )
        process.wait_ready()
        return process

    asyncio.run(publish(settings, []))  # both topics, 4 partitions each
    workers = [start_worker("a"), start_worker("b")]
    asyncio.run(publish(settings, records()))
    wait_until(
        lambda: sum(finished(w) for w in workers) >= 2 * CUSTOMERS,
        90,
        "both events of every publication",
    )

    mail: dict[str, list[list[str]]] = {}
    for received in smtp_server.mailbox:
        part = received.message.get_body(preferencelist=("plain",))
        assert part is not None
        codes = re.findall(r"KAFKA-\d+-\d", part.get_content())
        mail.setdefault(received.rcpt_tos[0], []).append(codes)
    assert mail == {f"customer{n}@example.com": [codes_of(n)] for n in range(CUSTOMERS)}
    assert all(finished(w) > 0 for w in workers), "one worker got no partition"
    for worker in workers:
        assert worker.terminate() == 0
