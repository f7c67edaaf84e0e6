"""A worker process killed with SIGKILL mid-stream and restarted loses and repeats nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bus.sqlite import SqliteBus
from bus.types import Bus
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.worker import EVENT_TYPE, publish_event

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "voucherify."
CONCURRENCY = 8


def start_worker(tmp_path: Path, run: int, where: str, prefix: str) -> subprocess.Popen[bytes]:
    with (tmp_path / f"worker-{run}.log").open("wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fixtures.worker_main",
                where,
                str(tmp_path / "ledger.sqlite3"),
                str(tmp_path),
                prefix,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def publish(bus: Bus, prefix: str, numbers: range) -> None:
    for n in numbers:
        await publish_event(bus, prefix, event_id=f"evcus_{n:04d}", customer_id=f"c{n % 25:02d}")


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def crash_bus(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Bus, str, str]:
    """The bus the test publishes on, where the worker process finds it, and the prefix."""
    if request.param == "sqlite":
        path = tmp_path / "bus.sqlite3"
        return SqliteBus(path, poll_interval_s=0.05), str(path), PREFIX
    broker: TansuBroker = request.getfixturevalue("kafka_broker")
    settings = kafka_bus_settings(broker, partitions=3)
    return make_kafka_bus(settings), settings.url, settings.topic_prefix


async def test_sigkill_mid_stream_then_restart_loses_nothing_and_calls_again_only_in_flight(
    tmp_path: Path, crash_bus: tuple[Bus, str, str]
) -> None:
    """The handler's target de-duplicates by event id, as real ones do by their natural key
    (so its effects log holds each event once whatever the worker does); what the worker
    itself answers for is that every event arrives, in order per customer, and that only
    the calls in flight at the kill are made again (``calls.log``: every call)."""
    bus, where, prefix = crash_bus
    await bus.start()
    await bus.ensure_topics([prefix + EVENT_TYPE])
    effects = tmp_path / "effects.log"
    first = start_worker(tmp_path, 1, where, prefix)
    try:
        await publish(bus, prefix, range(400))
        await wait_for(lambda: len(lines(effects)) >= 150, "150 effects before the kill")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        killed_at = len(lines(effects))
        assert killed_at < 400, "the kill came too late to be mid-stream"
        await publish(bus, prefix, range(400, 500))  # more arrives while the worker is down
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=10)

    second = start_worker(tmp_path, 2, where, prefix)
    try:
        await wait_for(lambda: len(lines(effects)) >= 500, "all 500 effects after the restart")
        await asyncio.sleep(0.5)  # anything repeated would show up now
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=15) == 0, (tmp_path / "worker-2.log").read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=10)
        await bus.close()

    done = [line.split() for line in lines(effects)]
    ids = [event_id for _, event_id in done]
    assert len(ids) == len(set(ids)), "the target took an effect twice"
    assert set(ids) == {f"evcus_{n:04d}" for n in range(500)}, "an event was lost"
    by_customer: dict[str, list[str]] = {}
    for customer, event_id in done:
        by_customer.setdefault(customer, []).append(event_id)
    for customer, seq in by_customer.items():
        assert seq == sorted(seq), f"customer {customer} out of order"
    # The ledger and the commits kept re-calls to the events in flight at the kill.
    calls = lines(tmp_path / "calls.log")
    assert set(calls) == set(ids)
    assert len(calls) - len(set(calls)) <= CONCURRENCY * 2
