"""Broker faults on the embedded bus: a dead letter that cannot be stored is not lost."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry

from bus.sqlite import SqliteBus
from handlers.types import Event
from handlers.worker.ledger import Ledger
from handlers.worker.service import Worker
from schemas.errors import HandlerError
from schemas.topics import dlq_topic
from tests.fixtures.worker import (
    ScriptedHandler,
    eventually,
    fast_worker_settings,
    metric,
    outcome,
    publish_event,
    read_all,
    running,
)


def committed_offsets(path: Path, group: str) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT topic, next_offset FROM group_offsets WHERE grp = ?", (group,)
        ).fetchall()
    return {str(t): int(o) for t, o in rows}


async def test_while_the_dead_letter_cannot_be_stored_the_event_stays_uncommitted(
    tmp_path: Path, ledger: Ledger, registry: CollectorRegistry
) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, poll_interval_s=0.05, busy_timeout_s=0.05, publish_timeout_s=1.0)
    await bus.start()
    prefix = "voucherify."
    locked = asyncio.Event()

    async def script(event: Event) -> None:
        if event.id == "ev_bad":
            await locked.wait()  # fail only once the bus is locked
            raise HandlerError("template missing")

    handler = ScriptedHandler(script=script)
    worker = Worker(
        [handler],
        bus=bus,
        ledger=ledger,
        settings=fast_worker_settings(),
        topic_prefix=prefix,
        metrics_registry=registry,
    )
    lock = sqlite3.connect(path, isolation_level=None, timeout=5)

    def dlq_errors() -> float:
        return metric(
            registry,
            "pubrelay_handler_bus_errors_total",
            handler="recorder",
            operation="publish_dlq",
        )

    try:
        async with running(worker):
            await publish_event(bus, prefix, event_id="ev_first", customer_id="c0")
            await eventually(lambda: handler.effects == ["ev_first"], what="the first event")
            await eventually(
                lambda: committed_offsets(path, "pubrelay.recorder") != {}, what="a commit"
            )
            before = committed_offsets(path, "pubrelay.recorder")
            await publish_event(bus, prefix, event_id="ev_bad", customer_id="c1")
            lock.execute("BEGIN IMMEDIATE")  # the bus can no longer write: publishes fail
            locked.set()
            await eventually(lambda: dlq_errors() >= 2, what="failed dead-letter publishes")
            assert outcome(registry, "recorder", "dead_lettered") == 0
            assert committed_offsets(path, "pubrelay.recorder") == before
            lock.execute("ROLLBACK")
            await eventually(
                lambda: outcome(registry, "recorder", "dead_lettered") == 1, what="the dead letter"
            )
            await eventually(
                lambda: metric(registry, "pubrelay_consumer_lag", handler="recorder") == 0,
                what="the commit past the dead letter",
            )
        [record] = await read_all(bus, dlq_topic(prefix, "recorder"), expect=1)
        assert record.key == b"c1"
        assert handler.attempts.count(("ev_bad", 1)) == 1
    finally:
        lock.close()
        await bus.close()
