"""Two `pubrelay worker` processes in one consumer group on a real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bus.config import BusSettings
from schemas.record import HEADER_DELIVERY_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import Launcher, PubrelayProcess
from tests.fixtures.samples import sample_publication_body

pytestmark = pytest.mark.kafka

EVENT_TYPE = "customer.publication.succeeded"
CREATED_AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


async def publish(settings: BusSettings, numbers: range) -> None:
    bus = make_kafka_bus(settings)
    await bus.start()
    try:
        topic = settings.topic_prefix + EVENT_TYPE
        await bus.ensure_topics([topic])
        for n in numbers:
            body = sample_publication_body(
                event_id=f"ev_{n}",
                delivery_id=f"whs_{n}",
                customer_id=f"cust_{n % 50}",
                email=None,
                code=f"C{n}",
                created_at=CREATED_AT,
            )
            await bus.publish(
                topic,
                body,
                key=f"cust_{n % 50}".encode(),
                headers=(
                    (HEADER_EVENT_ID, f"ev_{n}".encode()),
                    (HEADER_EVENT_TYPE, EVENT_TYPE.encode()),
                    (HEADER_DELIVERY_ID, f"whs_{n}".encode()),
                ),
            )
    finally:
        await bus.close()


def handled(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines() if line]


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_two_workers_split_partitions_and_the_survivor_takes_over(
    run_pubrelay: Launcher, kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    settings = kafka_bus_settings(kafka_broker, partitions=6)
    files = {name: tmp_path / name / "example-plugin.jsonl" for name in ("a", "b")}

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
                "PUBRELAY_BUS__PARTITIONS": "6",
                "PUBRELAY_HANDLERS__ENABLED": '["example"]',
                "PUBRELAY_LEDGER__URL": f"sqlite:///{tmp_path / 'shared-ledger.sqlite3'}",
                "PUBRELAY_WORKER__COMMIT_INTERVAL_S": "0.2",
            },
        )
        process.wait_ready()
        return process

    asyncio.run(publish(settings, range(1)))  # creates the topic with 6 partitions
    worker_a = start_worker("a")
    worker_b = start_worker("b")
    asyncio.run(publish(settings, range(1, 300)))
    wait_until(
        lambda: len(set(handled(files["a"])) | set(handled(files["b"]))) == 300,
        90,
        "the first 300 events",
    )
    assert handled(files["a"]), "worker a got no partition"
    assert handled(files["b"]), "worker b got no partition"

    worker_a.kill()  # SIGKILL: no goodbye to the group, no final commit
    asyncio.run(publish(settings, range(300, 600)))
    wait_until(
        lambda: len(set(handled(files["a"])) | set(handled(files["b"]))) == 600,
        120,
        "worker b to take over worker a's partitions",
    )

    assert worker_b.proc.poll() is None
    everything = handled(files["a"]) + handled(files["b"])
    assert set(everything) == {f"ev_{n}" for n in range(600)}  # no event lost
    repeated = [event for event, count in Counter(everything).items() if count > 1]
    assert repeated == [], "the shared ledger must stop effects from repeating"
