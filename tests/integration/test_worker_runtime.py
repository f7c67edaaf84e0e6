"""The worker on a real bus: exactly-once effects, order, retries, dead letters, replay."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from bus.pending import SMALL_BATCH_RECORDS
from bus.sqlite import SqliteBus
from bus.types import Bus
from handlers.config import HandlersSettings, LedgerSettings
from handlers.types import Event
from handlers.worker.dead_letters import DeadLetter, dead_letter_headers
from handlers.worker.ledger import Ledger
from handlers.worker.replay import list_dead_letters, replay
from handlers.worker.service import run_worker
from schemas.errors import HandlerError, PluginError, RetryLater, SkipEvent
from schemas.record import HEADER_EVENT_ID, header
from schemas.topics import dlq_topic, retry_topic, topic_for
from tests.fixtures.worker import (
    EVENT_TYPE,
    BusFactory,
    ScriptedHandler,
    event_record,
    eventually,
    fast_worker_settings,
    ledger_key,
    make_worker,
    metric,
    outcome,
    publish_event,
    read_all,
    running,
)


async def test_each_effect_happens_once_despite_redelivered_duplicates(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """1,000 events, 100 re-delivered (same event id, new delivery id): 1,000 effects."""
    rng = random.Random(7)
    events = [(f"evcus_{n:05d}", f"cust_{n % 40:03d}") for n in range(1000)]
    redelivered = rng.sample(events, 100)
    stream = events + redelivered
    # Re-deliveries land after their original, interleaved with the rest of the stream.
    order = sorted(
        range(len(stream)),
        key=lambda i: i if i < 1000 else events.index(stream[i]) + rng.randint(1, 300),
    )
    handler = ScriptedHandler()
    worker = make_worker([handler], bus, ledger, registry, topic_prefix)
    async with running(worker):
        for i in order:
            event_id, customer = stream[i]
            await publish_event(bus, topic_prefix, event_id=event_id, customer_id=customer)
        await eventually(
            lambda: (
                outcome(registry, "recorder", "handled")
                + outcome(registry, "recorder", "duplicate")
                >= 1100
            ),
            what="1,100 records handled or recognised as duplicates",
        )
    assert len(handler.effects) == 1000
    assert set(handler.effects) == {e for e, _ in events}
    assert max(handler.calls.values()) == 1
    assert outcome(registry, "recorder", "handled") == 1000
    assert outcome(registry, "recorder", "duplicate") == 100
    # per customer, effects follow the publication order of the first deliveries
    published: dict[str, list[str]] = {}
    for i in order:
        event_id, customer = stream[i]
        seen = published.setdefault(customer, [])
        if event_id not in seen:
            seen.append(event_id)
    assert handler.by_customer == published
    assert metric(registry, "pubrelay_handler_in_flight", handler="recorder") == 0
    assert metric(registry, "pubrelay_handler_duration_seconds_count", handler="recorder") == 1000
    assert metric(registry, "pubrelay_handler_event_age_seconds_count", handler="recorder") == 1000


async def test_everything_handled_is_committed_so_a_restart_redelivers_nothing(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    first = ScriptedHandler()
    async with running(make_worker([first], bus, ledger, registry, topic_prefix)):
        for n in range(20):
            await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id=f"c{n % 3}")
        await eventually(lambda: len(first.effects) == 20, what="20 effects")
    assert first.lifecycle == ["start", "stop"]
    again = ScriptedHandler()
    registry2 = CollectorRegistry()
    async with running(make_worker([again], bus, ledger, registry2, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_last", customer_id="c1")
        await eventually(lambda: again.effects == ["ev_last"], what="the new event")
        await eventually(
            lambda: metric(registry2, "pubrelay_consumer_lag", handler="recorder") == 0,
            what="everything committed",
        )
    assert again.calls == {"ev_last": 1}
    assert outcome(registry2, "recorder", "duplicate") == 0


async def test_transient_failures_are_retried_and_the_third_attempt_succeeds(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    async def flaky(event: Event) -> None:
        if event.id == "ev_flaky" and event.attempt < 3:
            raise RetryLater("upstream says 429") if event.attempt == 1 else ConnectionResetError()

    handler = ScriptedHandler(script=flaky)
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_flaky", customer_id="c1")
        await publish_event(bus, topic_prefix, event_id="ev_other", customer_id="c2")
        await eventually(lambda: "ev_flaky" in handler.effects, what="the flaky event's effect")
    assert [a for e, a in handler.attempts if e == "ev_flaky"] == [1, 2, 3]
    assert handler.effects.count("ev_flaky") == 1
    assert outcome(registry, "recorder", "retried") == 2
    assert outcome(registry, "recorder", "handled") == 2
    assert outcome(registry, "recorder", "dead_lettered") == 0


async def test_a_retrying_customer_waits_but_other_customers_do_not(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    release = asyncio.Event()

    async def script(event: Event) -> None:
        if event.id == "ev_a1" and not release.is_set():
            raise RetryLater("not yet", delay_s=0.02)

    handler = ScriptedHandler(script=script)
    worker = make_worker([handler], bus, ledger, registry, topic_prefix, max_attempts=1000)
    async with running(worker):
        await publish_event(bus, topic_prefix, event_id="ev_a1", customer_id="a")
        await publish_event(bus, topic_prefix, event_id="ev_a2", customer_id="a")
        for n in range(10):
            await publish_event(bus, topic_prefix, event_id=f"ev_b{n}", customer_id=f"b{n}")
        await eventually(lambda: len(handler.effects) == 10, what="the other customers")
        assert "ev_a2" not in handler.calls  # same customer: strictly after ev_a1
        release.set()
        await eventually(lambda: len(handler.effects) == 12, what="customer a")
    assert handler.by_customer["a"] == ["ev_a1", "ev_a2"]


async def test_a_slow_handler_does_not_delay_another(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    gate = asyncio.Event()

    async def blocked(event: Event) -> None:
        del event
        await gate.wait()

    slow = ScriptedHandler(name="slow", script=blocked)
    fast = ScriptedHandler(name="fast")
    async with running(make_worker([slow, fast], bus, ledger, registry, topic_prefix)):
        for n in range(30):
            await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id=f"c{n}")
        await eventually(lambda: len(fast.effects) == 30, what="the fast handler")
        assert slow.effects == []
        gate.set()
        await eventually(lambda: len(slow.effects) == 30, what="the slow handler")


async def test_concurrency_is_bounded(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    running_now = 0
    peak = 0

    async def script(event: Event) -> None:
        nonlocal running_now, peak
        del event
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.02)
        running_now -= 1

    handler = ScriptedHandler(script=script)
    worker = make_worker([handler], bus, ledger, registry, topic_prefix, concurrency=4)
    async with running(worker):
        for n in range(40):
            await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id=f"c{n}")
        await eventually(lambda: len(handler.effects) == 40, what="40 effects")
    assert peak == 4


async def test_a_failing_event_is_dead_lettered_and_replay_brings_it_back_once_fixed(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    broken = True

    async def script(event: Event) -> None:
        if event.id == "ev_bad" and broken:
            raise ConnectionRefusedError("crm down")

    handler = ScriptedHandler(script=script)
    other = ScriptedHandler(name="other")
    async with running(make_worker([handler, other], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_bad", customer_id="c1")
        await publish_event(bus, topic_prefix, event_id="ev_good", customer_id="c1")
        await eventually(lambda: "ev_good" in handler.effects, what="the next event")
        await eventually(lambda: len(other.effects) == 2, what="the other handler")
    assert outcome(registry, "recorder", "dead_lettered") == 1
    assert [a for e, a in handler.attempts if e == "ev_bad"] == [1, 2, 3]

    [record] = await read_all(bus, dlq_topic(topic_prefix, "recorder"), expect=1)
    assert record.key == b"c1"
    assert header(record.headers, "event-id") == b"ev_bad"
    assert header(record.headers, "dlq-error-type") == b"builtins.ConnectionRefusedError"
    assert header(record.headers, "dlq-error") == b"ConnectionRefusedError: crm down"
    assert header(record.headers, "dlq-attempts") == b"3"
    assert header(record.headers, "dlq-handler") == b"recorder"
    assert (
        header(record.headers, "dlq-source-topic")
        == (topic_prefix + "customer.publication.succeeded").encode()
    )
    first = header(record.headers, "dlq-first-failed-at")
    last = header(record.headers, "dlq-last-failed-at")
    assert first is not None
    assert last is not None
    assert first <= last

    # A re-join of the replay group takes seconds on Tansu: the deadline must allow it.
    letters = await list_dead_letters(
        bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix, timeout_s=15
    )
    assert [d.event_id for d in letters] == ["ev_bad"]
    assert letters[0].attempts == 3
    assert letters[0].error_type == "builtins.ConnectionRefusedError"
    assert letters[0].message.value == record.value

    dry = await replay(
        bus,
        "recorder",
        topic_prefix=topic_prefix,
        group_prefix=topic_prefix,
        dry_run=True,
        timeout_s=15,
    )
    assert (dry.matched, dry.replayed) == (1, 0)
    assert (
        len(
            await list_dead_letters(
                bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix
            )
        )
        == 1
    )

    broken = False
    registry2 = CollectorRegistry()
    async with running(make_worker([handler, other], bus, ledger, registry2, topic_prefix)):
        seen: list[str | None] = []
        summary = await replay(
            bus,
            "recorder",
            topic_prefix=topic_prefix,
            group_prefix=topic_prefix,
            progress=lambda d: seen.append(d.event_id),
        )
        assert (summary.matched, summary.replayed) == (1, 1)
        assert seen == ["ev_bad"]
        await eventually(lambda: "ev_bad" in handler.effects, what="the replayed event")
        await asyncio.sleep(0.2)
    assert handler.effects.count("ev_bad") == 1
    assert other.calls["ev_bad"] == 1  # only the failing handler ran it again
    assert outcome(registry2, "recorder", "handled") == 1
    [replayed] = await read_all(bus, retry_topic(topic_prefix, "recorder"), expect=1)
    assert not [k for k, _ in replayed.headers if k.startswith("dlq-")]
    assert replayed.value == record.value
    assert (
        await list_dead_letters(
            bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix
        )
        == []
    )
    again = await replay(bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix)
    assert again.replayed == 0


async def test_a_body_the_model_rejects_goes_straight_to_the_dead_letter_topic(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    handler = ScriptedHandler()
    body = b'{"id":"whs_1","event":{"id":"ev_broken","type":"customer.publication.succeeded"}}'
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_broken", customer_id="c1", body=body)
        await publish_event(bus, topic_prefix, event_id="ev_fine", customer_id="c1")
        await eventually(lambda: handler.effects == ["ev_fine"], what="the next event")
    assert handler.attempts[0] == ("ev_broken", 1)
    assert outcome(registry, "recorder", "retried") == 0
    [record] = await read_all(bus, dlq_topic(topic_prefix, "recorder"), expect=1)
    assert record.value == body
    assert (
        header(record.headers, "dlq-error-type") == b"pydantic_core._pydantic_core.ValidationError"
    )
    assert header(record.headers, "dlq-attempts") == b"1"


async def test_a_replay_sends_what_waited_when_it_began_though_each_fails_again_at_once(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """More dead letters than one fetch, each dead-lettered again as soon as it is
    replayed (a permanent error): the replay, reading a fetch at a time, sends each
    once and leaves the new dead letters for a later run."""

    async def script(event: Event) -> None:
        raise HandlerError(f"still broken for {event.id}")

    handler = ScriptedHandler(script=script)
    ids = [f"ev_again_{n:02}" for n in range(SMALL_BATCH_RECORDS + 8)]
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        for event_id in ids:
            await publish_event(bus, topic_prefix, event_id=event_id, customer_id=event_id)
        await eventually(
            lambda: outcome(registry, "recorder", "dead_lettered") == len(ids),
            what="every event dead-lettered",
        )
        summary = await asyncio.wait_for(  # one that kept reading new ones would not end
            replay(
                bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix, timeout_s=15
            ),
            60,
        )
        assert summary.replayed == len(ids)
        assert sorted(summary.event_ids) == ids
        await eventually(
            lambda: outcome(registry, "recorder", "dead_lettered") == 2 * len(ids),
            what="every replayed event dead-lettered again",
        )
    assert sorted(handler.calls) == ids
    assert set(handler.calls.values()) == {2}
    waiting = await list_dead_letters(
        bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix, timeout_s=15
    )
    assert sorted(d.event_id or "" for d in waiting) == ids


async def test_a_replay_whose_second_reading_ends_early_says_so_and_keeps_what_it_sent(
    tmp_path: Path, topic_prefix: str
) -> None:
    """Dead letters gone between the two readings (the embedded bus's retention, say):
    the replay sends what it still finds, commits it, and names the partition it could
    not finish, in its summary and in a warning."""
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, poll_interval_s=0.05)
    await bus.start()
    try:
        dlq = dlq_topic(topic_prefix, "recorder")
        ids = [f"ev_gone_{n:02}" for n in range(SMALL_BATCH_RECORDS + 5)]
        for event_id in ids:
            value, key, headers = event_record(event_id=event_id, customer_id=event_id)
            letter = dead_letter_headers(
                headers,
                error="HandlerError: broken",
                error_type="schemas.errors.HandlerError",
                attempts=1,
                first_failed_at="2026-12-04T00:00:00+00:00",
                last_failed_at="2026-12-04T00:00:00+00:00",
                handler="recorder",
                source_topic=topic_for(topic_prefix, EVENT_TYPE),
            )
            await bus.publish(dlq, value, key=key, headers=letter)
        kept = ids[:SMALL_BATCH_RECORDS]

        def expire_the_rest(letter: DeadLetter) -> None:
            if letter.event_id == ids[0]:  # the first fetch of the second reading is in
                with closing(sqlite3.connect(path, timeout=5)) as conn, conn:
                    conn.execute("DELETE FROM log WHERE topic = ?", (dlq,))

        with capture_logs() as logs:
            summary = await asyncio.wait_for(
                replay(
                    bus,
                    "recorder",
                    topic_prefix=topic_prefix,
                    group_prefix=topic_prefix,
                    progress=expire_the_rest,
                    timeout_s=5,
                    idle_timeout_s=0.3,
                ),
                30,
            )
        assert summary.event_ids == kept
        assert summary.replayed == len(kept)
        assert summary.incomplete == [f"{dlq}[0]"]
        [warning] = [line for line in logs if line["event"] == "replay_incomplete"]
        assert warning["partitions"] == [f"{dlq}[0]"]
        replayed = await read_all(bus, retry_topic(topic_prefix, "recorder"), expect=len(kept))
        assert [header(r.headers, HEADER_EVENT_ID) for r in replayed] == [i.encode() for i in kept]
        again = await replay(bus, "recorder", topic_prefix=topic_prefix, group_prefix=topic_prefix)
        assert (again.read, again.replayed, again.incomplete) == (0, 0, [])
    finally:
        await bus.close()


async def test_a_permanent_handler_error_is_not_retried(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    async def script(event: Event) -> None:
        raise HandlerError(f"no such template for {event.id}")

    handler = ScriptedHandler(script=script)
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_1", customer_id="c1")
        await eventually(
            lambda: outcome(registry, "recorder", "dead_lettered") == 1, what="the dead letter"
        )
    assert handler.attempts == [("ev_1", 1)]
    [record] = await read_all(bus, dlq_topic(topic_prefix, "recorder"), expect=1)
    assert header(record.headers, "dlq-error") == b"HandlerError: no such template for ev_1"


async def test_skipped_events_are_counted_and_not_handled_again(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    async def script(event: Event) -> None:
        raise SkipEvent(f"customer of {event.id} opted out")

    handler = ScriptedHandler(script=script)
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_1", customer_id="c1")
        await publish_event(bus, topic_prefix, event_id="ev_1", customer_id="c1")
        await eventually(
            lambda: outcome(registry, "recorder", "duplicate") == 1, what="the re-delivery"
        )
    assert handler.calls == {"ev_1": 1}
    assert outcome(registry, "recorder", "skipped") == 1
    assert await ledger.is_done("recorder", ledger_key("ev_1"))


async def test_events_of_other_types_are_committed_without_calling_the_handler(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    handler = ScriptedHandler(event_types=frozenset({"customer.publication.succeeded"}))
    retry = retry_topic(topic_prefix, "recorder")
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(
            bus,
            topic_prefix,
            event_id="ev_other",
            customer_id="c1",
            event_type="publication.succeeded",
            topic=retry,
        )
        await publish_event(bus, topic_prefix, event_id="ev_mine", customer_id="c1")
        await eventually(lambda: handler.effects == ["ev_mine"], what="the handled event")
        # Records fetched after the stop are left for the next run: wait for this one first.
        await eventually(
            lambda: outcome(registry, "recorder", "ignored") == 1, what="the other type ignored"
        )
        await eventually(
            lambda: metric(registry, "pubrelay_consumer_lag", handler="recorder") == 0,
            what="everything committed",
        )
    assert "ev_other" not in handler.calls
    assert outcome(registry, "recorder", "ignored") == 1


async def test_handlers_stop_in_reverse_start_order_after_in_flight_events_finish(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    order: list[str] = []
    started = asyncio.Event()

    async def slow(event: Event) -> None:
        del event
        started.set()
        await asyncio.sleep(0.3)

    first = ScriptedHandler(name="first", script=slow, lifecycle_log=order)
    second = ScriptedHandler(name="second", lifecycle_log=order)
    async with running(make_worker([first, second], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_1", customer_id="c1")
        await started.wait()
    # stop was set while ev_1 ran: it finished and was recorded before the handlers stopped
    assert first.effects == ["ev_1"]
    assert await ledger.is_done("first", ledger_key("ev_1"))
    assert order == ["start:first", "start:second", "stop:second", "stop:first"]


async def test_a_new_bus_client_resumes_from_the_committed_offsets(
    bus_factory: BusFactory, ledger: Ledger, topic_prefix: str
) -> None:
    bus = await bus_factory()
    handler = ScriptedHandler()
    registry = CollectorRegistry()
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        for n in range(5):
            await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id="c")
        await eventually(lambda: len(handler.effects) == 5, what="5 effects")
    other_client = await bus_factory()
    for n in range(5, 8):
        await publish_event(other_client, topic_prefix, event_id=f"ev_{n}", customer_id="c")
    registry2 = CollectorRegistry()
    async with running(make_worker([handler], other_client, ledger, registry2, topic_prefix)):
        await eventually(lambda: len(handler.effects) == 8, what="3 more effects")
        await asyncio.sleep(0.1)
    assert handler.effects == [f"ev_{n}" for n in range(8)]
    assert outcome(registry2, "recorder", "duplicate") == 0


async def test_a_handler_that_cannot_start_stops_start_up_and_the_started_ones_are_stopped(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    class Unstartable(ScriptedHandler):
        async def start(self) -> None:
            raise ConnectionRefusedError("smtp relay down")

    order: list[str] = []
    first = ScriptedHandler(name="first", lifecycle_log=order)
    broken = Unstartable(name="broken", lifecycle_log=order)
    worker = make_worker([first, broken], bus, ledger, registry, topic_prefix)
    with pytest.raises(PluginError, match="handler 'broken' failed to start"):
        await worker.run_until_stopped(asyncio.Event())
    assert order == ["start:first", "stop:first"]


async def test_run_worker_loads_the_enabled_plugins_and_runs_them(
    bus: Bus, registry: CollectorRegistry, topic_prefix: str, tmp_path: Path
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            bus=bus,
            handlers=HandlersSettings(enabled=["example"]),
            worker=fast_worker_settings(group_prefix=topic_prefix),
            ledger=LedgerSettings(),
            data_dir=tmp_path,
            topic_prefix=topic_prefix,
            metrics_registry=registry,
            stop=stop,
            env={"PUBRELAY_EXAMPLE__FILE_NAME": "out.jsonl"},
        )
    )
    try:
        for delivery in ("whs_1", "whs_2"):
            await publish_event(
                bus, topic_prefix, event_id="evcus_1", customer_id="cust_1", delivery_id=delivery
            )
        await eventually(lambda: outcome(registry, "example", "duplicate") == 1, what="dedupe")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(line)["event_id"] for line in lines] == ["evcus_1"]
    assert (tmp_path / "ledger.sqlite3").exists()
    assert outcome(registry, "example", "handled") == 1


async def test_an_unknown_plugin_stops_run_worker_before_consuming(
    bus: Bus, registry: CollectorRegistry, tmp_path: Path
) -> None:
    with pytest.raises(PluginError, match="unknown handler plugin 'nope'"):
        await run_worker(
            bus=bus,
            handlers=HandlersSettings(enabled=["nope"]),
            worker=fast_worker_settings(),
            ledger=LedgerSettings(),
            data_dir=tmp_path,
            topic_prefix="voucherify.",
            metrics_registry=registry,
            stop=asyncio.Event(),
        )


async def test_a_retry_out_of_order_lets_the_customer_s_later_events_go_first(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """`RetryLater(keep_order=False)`: the event waits out of its lane (the e-mail handler's
    hold for a publication's sibling event, which comes later for the same customer)."""

    async def script(event: Event) -> None:
        if event.id == "ev_a1" and event.attempt == 1:
            raise RetryLater("waiting for ev_a2", delay_s=0.5, keep_order=False)

    handler = ScriptedHandler(script=script)
    async with running(make_worker([handler], bus, ledger, registry, topic_prefix)):
        await publish_event(bus, topic_prefix, event_id="ev_a1", customer_id="a")
        await publish_event(bus, topic_prefix, event_id="ev_a2", customer_id="a")
        await eventually(lambda: len(handler.effects) == 2, what="both events of customer a")
    assert handler.by_customer["a"] == ["ev_a2", "ev_a1"]
    assert [a for e, a in handler.attempts if e == "ev_a1"] == [1, 2]
    assert outcome(registry, "recorder", "retried") == 1
    assert outcome(registry, "recorder", "handled") == 2


async def test_deliveries_of_one_event_without_a_key_run_one_after_the_other(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """Records without a key each get a lane of their own: three deliveries of one event
    wait for each other in the worker, so the slow first call is the only one, the others
    are duplicates, and none waited on the ledger's claim (a wait polls every 0.5 s)."""
    first_call_may_end = asyncio.Event()

    async def slow(event: Event) -> None:
        await first_call_may_end.wait()

    handler = ScriptedHandler(script=slow)
    worker = make_worker([handler], bus, ledger, registry, topic_prefix)
    async with running(worker):
        for _ in range(3):
            value, _key, headers = event_record(event_id="ev_nokey", customer_id="c1")
            await bus.publish(topic_for(topic_prefix, EVENT_TYPE), value, key=None, headers=headers)
        await eventually(lambda: handler.calls["ev_nokey"] == 1, what="the first call")
        await asyncio.sleep(0.3)  # the two other deliveries fetched, waiting on the first
        assert handler.calls["ev_nokey"] == 1
        first_call_may_end.set()
        await eventually(
            lambda: outcome(registry, "recorder", "duplicate") == 2, what="two duplicates"
        )
    assert handler.calls["ev_nokey"] == 1
    assert outcome(registry, "recorder", "handled") == 1
    assert metric(registry, "pubrelay_handler_claim_waits_total", handler="recorder") == 0
