"""What every handler, built-in or plugin, must honour; and what the runtime does with it.

Failures are injected by :class:`Probe`, a wrapper around the real handler that fails
its first calls on purpose and then delegates; so the suite checks that the runtime
retries, dead-letters and deduplicates around the real handler, and that the real
handler survives repeated starts and stops and handles a genuine event.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry

from bus.types import Bus
from handlers.registry import available
from handlers.types import Event, Handler
from handlers.worker.ledger import Ledger
from handlers.worker.service import Worker
from schemas.errors import HandlerError, RetryLater
from schemas.record import header
from schemas.topics import dlq_topic
from tests.fixtures.worker import (
    EVENT_TYPE,
    eventually,
    fast_worker_settings,
    ledger_key,
    outcome,
    publish_event,
    read_all,
    running,
)


class Probe:
    """Wraps a real handler: counts the calls that reach it; ``fail`` may raise first."""

    def __init__(self, inner: Handler, fail: Callable[[Event], Exception | None] | None = None):
        self.inner = inner
        self.fail = fail
        self.reached: list[tuple[str, int]] = []
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def event_types(self) -> frozenset[str]:
        return self.inner.event_types

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def handle(self, event: Event) -> None:
        self.calls += 1
        if self.fail is not None and (error := self.fail(event)) is not None:
            raise error
        self.reached.append((event.id, event.attempt))
        await self.inner.handle(event)


def worker_for(
    probe: Probe, bus: Bus, ledger: Ledger, registry: CollectorRegistry, prefix: str
) -> Worker:
    assert not probe.event_types or EVENT_TYPE in probe.event_types, (
        f"handler {probe.name!r} does not take {EVENT_TYPE}: add a sample event for one of "
        f"{sorted(probe.event_types)} to the contract suite"
    )
    return Worker(
        [probe],
        bus=bus,
        ledger=ledger,
        settings=fast_worker_settings(group_prefix=prefix),
        topic_prefix=prefix,
        metrics_registry=registry,
    )


def finished(registry: CollectorRegistry, name: str) -> float:
    return outcome(registry, name, "handled") + outcome(registry, name, "skipped")


def test_the_builtin_and_the_example_plugin_are_registered() -> None:
    installed = set(available())
    assert "noop" in installed, 'pyproject.toml needs noop = "handlers.builtin.noop:create"'
    assert "example" in installed, "pip install -e tests/plugins/example_plugin"


async def test_start_and_stop_are_safe_twice_and_in_any_order(
    handler_under_test: Handler,
) -> None:
    handler = handler_under_test
    await handler.stop()
    await handler.start()
    await handler.start()
    await handler.stop()
    await handler.stop()
    await handler.start()
    await handler.stop()


async def test_a_genuine_event_is_handled(
    handler_under_test: Handler,
    bus: Bus,
    ledger: Ledger,
    registry: CollectorRegistry,
    topic_prefix: str,
) -> None:
    probe = Probe(handler_under_test)
    async with running(worker_for(probe, bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="evcus_contract_1", customer_id="cust_1")
        await eventually(lambda: finished(registry, probe.name) == 1, what="one finished event")
    assert outcome(registry, probe.name, "dead_lettered") == 0
    assert probe.reached == [("evcus_contract_1", 1)]


async def test_a_repeated_event_id_reaches_the_handler_once(
    handler_under_test: Handler,
    bus: Bus,
    ledger: Ledger,
    registry: CollectorRegistry,
    topic_prefix: str,
) -> None:
    probe = Probe(handler_under_test)
    async with running(worker_for(probe, bus, ledger, registry, topic_prefix)):
        for delivery in ("whs_first", "whs_retry_by_voucherify"):
            await publish_event(
                bus, topic_prefix, event_id="evcus_same", customer_id="cust_1", delivery_id=delivery
            )
        await eventually(
            lambda: outcome(registry, probe.name, "duplicate") == 1, what="the duplicate"
        )
    assert probe.calls == 1
    assert finished(registry, probe.name) == 1


async def test_a_transient_failure_is_retried_then_the_handler_runs_once(
    handler_under_test: Handler,
    bus: Bus,
    ledger: Ledger,
    registry: CollectorRegistry,
    topic_prefix: str,
) -> None:
    def fail(event: Event) -> Exception | None:
        return RetryLater("injected", delay_s=0.01) if event.attempt < 3 else None

    probe = Probe(handler_under_test, fail)
    async with running(worker_for(probe, bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="evcus_flaky", customer_id="cust_1")
        await eventually(lambda: finished(registry, probe.name) == 1, what="the third attempt")
    assert probe.calls == 3
    assert probe.reached == [("evcus_flaky", 3)]
    assert outcome(registry, probe.name, "retried") == 2


async def test_a_permanent_failure_is_dead_lettered(
    handler_under_test: Handler,
    bus: Bus,
    ledger: Ledger,
    registry: CollectorRegistry,
    topic_prefix: str,
) -> None:
    probe = Probe(handler_under_test, lambda event: HandlerError(f"injected for {event.id}"))
    async with running(worker_for(probe, bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="evcus_doomed", customer_id="cust_1")
        await eventually(
            lambda: outcome(registry, probe.name, "dead_lettered") == 1, what="the dead letter"
        )
    assert probe.calls == 1
    assert probe.reached == []
    [record] = await read_all(bus, dlq_topic(topic_prefix, probe.name), expect=1)
    assert header(record.headers, "event-id") == b"evcus_doomed"
    assert header(record.headers, "dlq-handler") == probe.name.encode()
    assert not await ledger.is_done(probe.name, ledger_key("evcus_doomed"))
