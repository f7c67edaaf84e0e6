"""The worker when things go wrong inside it: odd handler failures, revokes, stop mid-retry.

Each test pins one way a customer's lane used to stop, wait too long, run twice or run out
of order; all run on a real bus (the revoke tests on the embedded one, which never revokes
by itself: a thin subclass hands the worker's revoke callback to the test, as Kafka would
call it in a rebalance).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.typing import EventDict, WrappedLogger

from bus.sqlite import SqliteBus
from bus.types import Bus, RevokeCallback, Subscription, TopicPartition
from handlers.types import Event
from handlers.worker.dead_letters import DeadLetter
from handlers.worker.ledger import Ledger, SqliteLedger
from handlers.worker.service import Worker
from schemas.errors import HandlerError, RetryLater
from schemas.record import header
from schemas.topics import dlq_topic, topic_for
from tests.fixtures.worker import (
    EVENT_TYPE,
    ScriptedHandler,
    eventually,
    fast_worker_settings,
    make_worker,
    metric,
    outcome,
    publish_event,
    read_all,
    running,
)

_json = msgspec.json.Encoder(enc_hook=str)


def _serialisable(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Fail a log call the way the production JSON renderer (msgspec) would."""
    _json.encode(event_dict)
    return event_dict


async def assert_nothing_redelivered(bus: Bus, ledger: Ledger, prefix: str) -> None:
    """A restart in the same group gets only a new event: everything before was committed."""
    again = ScriptedHandler()
    async with running(make_worker(again, bus, ledger, CollectorRegistry(), prefix)):
        await publish_event(bus, prefix, event_id="ev_marker", customer_id="cust_Z")
        await eventually(lambda: again.effects == ["ev_marker"], what="the marker event")
    assert dict(again.calls) == {"ev_marker": 1}


async def publish_and_queue(
    bus: Bus, prefix: str, handler: ScriptedHandler, event_ids: list[str], queued: asyncio.Event
) -> None:
    """Publish one customer's events; set ``queued`` once all wait behind the first's call."""
    await publish_event(bus, prefix, event_id=event_ids[0], customer_id="cust_A")
    await eventually(lambda: handler.calls[event_ids[0]] == 1, timeout_s=10, what="first call")
    for event_id in event_ids[1:]:
        await publish_event(bus, prefix, event_id=event_id, customer_id="cust_A")
    await asyncio.sleep(0.3)  # fetched (fetch_timeout_s is 0.05 s) into the busy lane
    queued.set()


# -- an error escaping the handling of one event must not end the customer's lane ----------


async def test_a_lone_surrogate_in_a_handler_error_is_dead_lettered_and_the_lane_goes_on(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """A CRM error quoting a customer name decoded from JSON ``"Ren\\ud83d"``."""

    queued = asyncio.Event()

    async def reject_name(event: Event) -> None:
        if event.id == "ev1":
            await queued.wait()  # the customer's later events wait in the same lane
            raise HandlerError("CRM rejected name Ren\ud83d")

    handler = ScriptedHandler(script=reject_name)
    worker = make_worker(handler, bus, ledger, registry, topic_prefix, max_buffered=3)
    with structlog.testing.capture_logs(processors=[_serialisable]) as logs:
        async with running(worker):
            await publish_and_queue(bus, topic_prefix, handler, ["ev1", "ev2", "ev3"], queued)
            await eventually(
                lambda: handler.by_customer.get("cust_A") == ["ev2", "ev3"],
                timeout_s=5,
                what="the customer's later events",
            )
            # The buffer (3 records) is free again: other customers' events still arrive.
            for n in range(4, 9):
                await publish_event(bus, topic_prefix, event_id=f"ev{n}", customer_id=f"c{n}")
            await eventually(lambda: len(handler.effects) == 7, timeout_s=5, what="7 effects")
    assert outcome(registry, "recorder", "dead_lettered") == 1
    [record] = await read_all(bus, dlq_topic(topic_prefix, "recorder"), expect=1)
    assert header(record.headers, "event-id") == b"ev1"
    assert header(record.headers, "dlq-error") == b"HandlerError: CRM rejected name Ren\\ud83d"
    [dead] = [e for e in logs if e["event"] == "event_dead_lettered"]
    assert dead["error"] == "CRM rejected name Ren\\ud83d"
    assert "exc_info" not in dead  # a handler's own refusal: no traceback to read
    await assert_nothing_redelivered(bus, ledger, topic_prefix)


async def test_a_handler_bug_is_dead_lettered_with_its_traceback_in_the_log(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """A plugin's ``ValueError``: the line said only its class and text, even at debug."""

    async def buggy(event: Event) -> None:
        raise ValueError(f"cannot parse {event.id}")

    handler = ScriptedHandler(script=buggy)
    with structlog.testing.capture_logs(processors=[_serialisable]) as logs:
        async with running(make_worker(handler, bus, ledger, registry, topic_prefix)):
            await publish_event(bus, topic_prefix, event_id="ev1", customer_id="cust_A")
            await eventually(
                lambda: outcome(registry, "recorder", "dead_lettered") == 1, what="a dead letter"
            )
    [dead] = [e for e in logs if e["event"] == "event_dead_lettered"]
    assert dead["error"] == "cannot parse ev1"
    assert isinstance(dead["exc_info"], ValueError)
    rendered = structlog.processors.format_exc_info(None, "error", dict(dead))["exception"]
    assert "in buggy" in rendered  # the frame that raised
    assert 'raise ValueError(f"cannot parse {event.id}")' in rendered


async def test_a_cancelled_error_from_the_handler_is_retried_like_a_transient_failure(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """A handler awaiting a shared future some library cancelled (say a closed session)."""

    queued = asyncio.Event()

    async def cancelled_once(event: Event) -> None:
        if event.id == "ev1" and event.attempt == 1:
            await queued.wait()
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.cancel()
            await future

    handler = ScriptedHandler(script=cancelled_once)
    async with running(make_worker(handler, bus, ledger, registry, topic_prefix)):
        await publish_and_queue(bus, topic_prefix, handler, ["ev1", "ev2"], queued)
        await eventually(lambda: len(handler.effects) == 2, timeout_s=5, what="both effects")
    assert handler.effects == ["ev1", "ev2"]
    assert [a for e, a in handler.attempts if e == "ev1"] == [1, 2]
    assert outcome(registry, "recorder", "retried") == 1
    await assert_nothing_redelivered(bus, ledger, topic_prefix)


async def test_an_unexpected_error_is_logged_and_the_event_tried_again_in_order(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """An untyped plugin passes a ``Retry-After`` header string as ``delay_s``."""
    retry_after: Any = "soon"
    queued = asyncio.Event()

    async def bad_delay_once(event: Event) -> None:
        if event.id == "ev1" and len(handler.attempts) == 1:
            await queued.wait()
            raise RetryLater("upstream says 429", delay_s=retry_after)

    handler = ScriptedHandler(script=bad_delay_once)
    with structlog.testing.capture_logs(processors=[_serialisable]) as logs:
        async with running(make_worker(handler, bus, ledger, registry, topic_prefix)):
            await publish_and_queue(bus, topic_prefix, handler, ["ev1", "ev2"], queued)
            await eventually(lambda: len(handler.effects) == 2, timeout_s=5, what="both effects")
    assert handler.effects == ["ev1", "ev2"]
    assert handler.calls["ev1"] == 2
    [failed] = [e for e in logs if e["event"] == "worker_lane_failed"]
    assert failed["error_type"] == "TypeError"
    assert failed["log_level"] == "error"
    assert isinstance(failed["exc_info"], TypeError)
    await assert_nothing_redelivered(bus, ledger, topic_prefix)


async def test_a_hung_handler_call_times_out_and_is_retried(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    async def hang_once(event: Event) -> None:
        if event.id == "ev1" and event.attempt == 1:
            await asyncio.sleep(30)

    handler = ScriptedHandler(script=hang_once)
    worker = make_worker(handler, bus, ledger, registry, topic_prefix, handler_timeout_s=0.2)
    async with running(worker):
        for n in (1, 2):
            await publish_event(bus, topic_prefix, event_id=f"ev{n}", customer_id="cust_A")
        await eventually(lambda: len(handler.effects) == 2, timeout_s=5, what="both effects")
    assert handler.effects == ["ev1", "ev2"]
    assert [a for e, a in handler.attempts if e == "ev1"] == [1, 2]
    assert outcome(registry, "recorder", "retried") == 1


# -- stop while a customer's event waits for its retry ---------------------------------------


async def test_a_stop_during_a_retry_back_off_keeps_the_customers_order_after_restart(
    bus: Bus, ledger: Ledger, topic_prefix: str
) -> None:
    """SIGTERM while e1 waits to be retried: e2 must not be handled before e1 is."""

    async def busy_upstream(event: Event) -> None:
        if event.id == "e1":
            raise RetryLater("CRM 429", delay_s=30)

    first = ScriptedHandler(script=busy_upstream)
    # A long fetch: the stop arrives while the fetch loop still waits for records.
    worker = make_worker(
        first,
        bus,
        ledger,
        CollectorRegistry(),
        topic_prefix,
        fetch_timeout_s=1.0,
        retry_max_delay_s=60.0,
    )
    async with running(worker):
        for event_id in ("e1", "e2"):
            await publish_event(bus, topic_prefix, event_id=event_id, customer_id="cust_A")
        await eventually(lambda: first.calls["e1"] == 1, timeout_s=10, what="e1's first call")
        await asyncio.sleep(0.2)  # e1 is now in its back-off
    assert first.effects == []
    assert "e2" not in first.calls

    second = ScriptedHandler()
    async with running(make_worker(second, bus, ledger, CollectorRegistry(), topic_prefix)):
        await eventually(lambda: len(second.effects) == 2, timeout_s=10, what="both effects")
    assert second.by_customer["cust_A"] == ["e1", "e2"]


# -- revoke (a rebalance) --------------------------------------------------------------------


class RevokingBus(SqliteBus):
    """The embedded bus, plus :meth:`revoke`: call the subscriber's revoke callback."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, poll_interval_s=0.05)
        self.on_revoke: RevokeCallback | None = None

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> Subscription:
        self.on_revoke = on_revoke
        return super().subscribe(group, topics, on_revoke=on_revoke)

    async def revoke(self, tps: Collection[TopicPartition]) -> float:
        """Revoke ``tps`` as a rebalance would; how long the subscriber took."""
        assert self.on_revoke is not None, "nobody subscribed"
        started = time.monotonic()
        await self.on_revoke(tps)
        return time.monotonic() - started


@pytest.fixture
async def revoking_bus(tmp_path: Path) -> AsyncIterator[RevokingBus]:
    bus = RevokingBus(tmp_path / "bus.sqlite3")
    await bus.start()
    yield bus
    await bus.close()


async def test_a_revoke_ends_a_retry_back_off_at_once_and_the_event_is_left_to_the_new_owner(
    revoking_bus: RevokingBus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    async def busy_upstream(event: Event) -> None:
        if event.attempt == 1:
            raise RetryLater("CRM 429", delay_s=1.5)

    bus = revoking_bus
    handler = ScriptedHandler(script=busy_upstream)
    worker = make_worker(
        handler, bus, ledger, registry, topic_prefix, shutdown_timeout_s=5.0, retry_max_delay_s=60.0
    )
    async with running(worker):
        await publish_event(bus, topic_prefix, event_id="ev1", customer_id="cust_A")
        await eventually(lambda: handler.calls["ev1"] == 1, timeout_s=5, what="the first call")
        took = await bus.revoke([TopicPartition(topic_for(topic_prefix, EVENT_TYPE), 0)])
        assert took < 0.5, f"the revoke waited {took:.2f}s for a sleeping back-off"
        await asyncio.sleep(2.0)  # past the back-off: this member must not call it again
    assert dict(handler.calls) == {"ev1": 1}
    assert handler.effects == []

    new_owner = ScriptedHandler()
    async with running(make_worker(new_owner, bus, ledger, CollectorRegistry(), topic_prefix)):
        await eventually(lambda: new_owner.effects == ["ev1"], timeout_s=5, what="ev1 handled")


async def test_a_revoke_waits_for_a_running_handler_call_no_longer_than_revoke_timeout(
    revoking_bus: RevokingBus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    release = asyncio.Event()

    async def slow(event: Event) -> None:
        await release.wait()

    bus = revoking_bus
    handler = ScriptedHandler(script=slow)
    worker = make_worker(
        handler, bus, ledger, registry, topic_prefix, shutdown_timeout_s=10.0, revoke_timeout_s=0.3
    )
    async with running(worker):
        await publish_event(bus, topic_prefix, event_id="ev1", customer_id="cust_A")
        await eventually(lambda: handler.calls["ev1"] == 1, timeout_s=5, what="the call")
        took = await bus.revoke([TopicPartition(topic_for(topic_prefix, EVENT_TYPE), 0)])
        release.set()
        assert 0.25 < took < 1.5, f"the revoke took {took:.2f}s"
        await eventually(lambda: handler.effects == ["ev1"], timeout_s=5, what="the effect")


async def test_a_call_running_past_the_revoke_deadline_is_not_run_again_by_the_new_owner(
    revoking_bus: RevokingBus, tmp_path: Path, topic_prefix: str
) -> None:
    """The old member lets the partition go after ``revoke_timeout_s`` while its call still
    runs; the new member gets the uncommitted record. The shared ledger's claim (kept alive
    by the old member's renewals past its 3 s life) makes the new member wait, not repeat."""
    release = asyncio.Event()

    async def slow(event: Event) -> None:
        await release.wait()

    bus = revoking_bus
    path = tmp_path / "shared-ledger.sqlite3"
    ledger_a = SqliteLedger(path, retention_s=3600, claim_ttl_s=3.0)
    ledger_b = SqliteLedger(path, retention_s=3600, claim_ttl_s=3.0)
    await ledger_a.open()
    await ledger_b.open()
    old_owner, new_owner = ScriptedHandler(script=slow), ScriptedHandler()
    registry_b = CollectorRegistry()
    old = make_worker(
        old_owner, bus, ledger_a, CollectorRegistry(), topic_prefix, revoke_timeout_s=0.3
    )
    try:
        async with running(old):
            await publish_event(bus, topic_prefix, event_id="ev1", customer_id="cust_A")
            await eventually(lambda: old_owner.calls["ev1"] == 1, timeout_s=5, what="the call")
            await bus.revoke([TopicPartition(topic_for(topic_prefix, EVENT_TYPE), 0)])
            # The embedded bus serves one member per group: the new owner reads the same
            # uncommitted record through a group of its own.
            new = Worker(
                [new_owner],
                bus=bus,
                ledger=ledger_b,
                settings=fast_worker_settings(group_prefix=f"{topic_prefix}new."),
                topic_prefix=topic_prefix,
                metrics_registry=registry_b,
            )
            async with running(new):
                await eventually(
                    lambda: (
                        metric(registry_b, "pubrelay_handler_claim_waits_total", handler="recorder")
                        == 1
                    ),
                    timeout_s=5,
                    what="the new owner to find the event claimed",
                )
                await asyncio.sleep(4.0)  # past the claim's 3 s life: renewals keep it
                assert dict(new_owner.calls) == {}
                release.set()
                await eventually(
                    lambda: outcome(registry_b, "recorder", "duplicate") == 1,
                    timeout_s=5,
                    what="the new owner to see the effect done",
                )
    finally:
        await ledger_a.close()
        await ledger_b.close()
    assert old_owner.effects == ["ev1"]
    assert dict(new_owner.calls) == {}


async def test_attempts_count_across_deliveries_so_an_event_that_kills_its_worker_ends_in_the_dlq(
    one_partition_bus: SqliteBus, ledger: Ledger, topic_prefix: str
) -> None:
    """Each delivery's call hangs until the worker is stopped (as a crash or an OOM would end
    it); the attempt still counts, so the fourth delivery dead-letters the event unheard."""
    never = asyncio.Event()

    async def hangs(event: Event) -> None:
        await never.wait()

    bus = one_partition_bus
    handler = ScriptedHandler(script=hangs)
    await publish_event(bus, topic_prefix, event_id="ev_poison", customer_id="cust_A")
    for delivery in range(1, 4):
        worker = make_worker(
            handler, bus, ledger, CollectorRegistry(), topic_prefix, shutdown_timeout_s=0.2
        )
        async with running(worker):
            await eventually(
                lambda n=delivery: handler.calls["ev_poison"] == n,  # type: ignore[misc]
                timeout_s=5,
                what=f"delivery {delivery}'s call",
            )
    registry = CollectorRegistry()
    async with running(make_worker(handler, bus, ledger, registry, topic_prefix)):
        await eventually(
            lambda: outcome(registry, "recorder", "dead_lettered") == 1,
            timeout_s=5,
            what="the dead letter",
        )
    assert dict(handler.calls) == {"ev_poison": 3}  # max_attempts = 3 in all, not per delivery
    [record] = await read_all(bus, dlq_topic(topic_prefix, "recorder"), expect=1)
    dead = DeadLetter.from_message(record)
    assert dead.attempts == 3
    assert dead.error is not None
    assert "3 attempts were made in earlier deliveries" in dead.error


# -- one event stuck in a long retry must not let the worker run ahead without bound ------


@pytest.fixture
async def one_partition_bus(tmp_path: Path) -> AsyncIterator[SqliteBus]:
    """The embedded bus: one partition per topic, so every record queues behind the first."""
    bus = SqliteBus(tmp_path / "bus.sqlite3", poll_interval_s=0.05)
    await bus.start()
    yield bus
    await bus.close()


async def test_an_event_stuck_in_a_long_retry_holds_back_at_most_max_buffered_records(
    one_partition_bus: SqliteBus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """Records finished behind the stuck one cannot be committed: they count as buffered."""
    bus = one_partition_bus

    async def stuck_first(event: Event) -> None:
        if event.id == "stuck":
            raise RetryLater("CRM rate limit", delay_s=60)

    others = 1000
    await publish_event(bus, topic_prefix, event_id="stuck", customer_id="cust_stuck")
    for n in range(others):
        await publish_event(bus, topic_prefix, event_id=f"ev{n}", customer_id=f"c{n}")
    handler = ScriptedHandler(script=stuck_first)
    worker = make_worker(
        handler, bus, ledger, registry, topic_prefix, max_buffered=100, retry_max_delay_s=60
    )

    def gauge(name: str) -> float:
        return registry.get_sample_value(name, {"handler": "recorder"}) or 0.0

    age = "pubrelay_handler_oldest_uncommitted_age_seconds"
    assert registry.get_sample_value(age, {"handler": "recorder"}) == 0  # pre-created
    async with running(worker):
        await eventually(
            lambda: outcome(registry, "recorder", "handled") >= 99 and gauge(age) > 0,
            timeout_s=10,
            what="the buffer full behind the stuck event",
        )
        await asyncio.sleep(0.5)  # ten fetch timeouts: time enough to run far ahead
        assert outcome(registry, "recorder", "handled") == 99  # 100 held, the stuck one first
        assert handler.calls["stuck"] == 1
        assert gauge("pubrelay_consumer_lag") == others + 1  # nothing committable yet
        assert gauge(age) > 0
