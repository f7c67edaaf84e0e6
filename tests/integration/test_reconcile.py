"""The reconciler on a real embedded bus and store, against the Voucherify contract server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bus.sqlite import SqliteBus
from bus.types import Bus, Message
from handlers.builtin import voucherify_api
from handlers.builtin.voucherify_api import VoucherifySettings
from handlers.config import LedgerSettings
from handlers.reconcile.config import ReconcileSettings
from handlers.reconcile.metrics import ReconcileMetrics
from handlers.reconcile.reconciler import Reconciler, run_periodically
from handlers.reconcile.record import event_id_for
from handlers.reconcile.recorder import ReceivedRecorder
from handlers.reconcile.store import Received, ReceivedStore, SqliteReceivedStore, create_store
from handlers.types import Event
from handlers.worker.ledger import SqliteLedger
from schemas.errors import ApiAuthError, ReconcileBusy, ReconcileWindowTooOld
from schemas.events import parse_event
from schemas.record import HEADER_EVENT_ID, HEADER_ORIGIN, header
from tests.fixtures.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    FakeVoucherify,
    failed_item,
    list_item_from_event,
)
from tests.fixtures.samples import sample_publication_body, sample_publication_event
from tests.fixtures.worker import eventually, make_worker, running

TOPIC = "voucherify.customer.publication.succeeded"


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def event(n: int, created_at: datetime) -> dict[str, Any]:
    return sample_publication_event(
        event_id=f"evcus_{n}",
        delivery_id=f"whs_{n}",
        customer_id=f"cust_{n}",
        email=f"customer{n}@example.com",
        code=f"CODE-{n:04d}",
        channel="Automation",
        created_at=created_at,
    )


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    sqlite_bus = SqliteBus(tmp_path / "bus.sqlite3", poll_interval_s=0.05)
    await sqlite_bus.start()
    try:
        yield sqlite_bus
    finally:
        await sqlite_bus.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ReceivedStore]:
    received = create_store(LedgerSettings(), ReconcileSettings(), tmp_path)
    await received.open()
    try:
        yield received
    finally:
        await received.close()


def reconciler(fake: FakeVoucherify, store: ReceivedStore, bus: Bus, **settings: Any) -> Reconciler:
    api = VoucherifySettings(
        api_url=fake.url, app_id=APP_ID, app_token=APP_TOKEN, request_interval_s=0
    )
    return Reconciler(
        api=api,
        settings=ReconcileSettings(**settings),
        store=store,
        bus=bus,
        topic_prefix="voucherify.",
    )


async def injected(bus: Bus) -> list[Message]:
    sub = bus.subscribe("test-reader", [TOPIC])
    await sub.start()
    try:
        found: list[Message] = []
        for _ in range(5):
            batch = await sub.fetch(max_records=1000, timeout_s=0.1)
            found += batch
        return found
    finally:
        await sub.close()


async def test_only_publications_never_received_are_injected_and_only_once(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    base = now() - timedelta(hours=5)
    events = [event(n, base + timedelta(minutes=n)) for n in range(250)]
    fake_voucherify.publications = [list_item_from_event(e) for e in events]
    fake_voucherify.publications.append(
        failed_item("pub_failed", "cust_x", (base + timedelta(minutes=3)).isoformat())
    )
    lost = {7, 120, 249}
    await store.record(
        [
            Received(e["data"]["publication"]["id"], 0.0, "webhook")
            for n, e in enumerate(events)
            if n not in lost
        ]
    )
    registry = CollectorRegistry()
    first = reconciler(fake_voucherify, store, bus)
    first.metrics = ReconcileMetrics(registry)

    summary = await first.run_once()
    again = await reconciler(fake_voucherify, store, bus).run_once()

    assert (summary.pages, summary.seen, summary.failures, summary.injected) == (3, 251, 1, 3)
    assert (again.injected, len(again.missing)) == (0, 0)
    records = await injected(bus)
    assert [header(r.headers, HEADER_EVENT_ID) for r in records] == [
        event_id_for(events[n]["data"]["publication"]["id"]).encode() for n in sorted(lost)
    ]
    assert all(header(r.headers, HEADER_ORIGIN) == b"reconciliation" for r in records)
    assert [r.key for r in records] == [f"cust_{n}".encode() for n in sorted(lost)]
    parsed = parse_event(records[0].value)
    assert parsed.data.voucher.code == "CODE-0007"
    assert parsed.data.customer_email == "customer7@example.com"
    assert parsed.data.channel == "Automation"
    assert registry.get_sample_value("pubrelay_reconcile_missing_total") == 3
    assert registry.get_sample_value("pubrelay_reconcile_runs_total", {"outcome": "success"}) == 1


async def test_an_installation_no_webhook_reached_yet_is_not_silent_since_1970(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    """PubrelayWebhookSilentWhileApiPublishes pages when the API's newest publication is 3 h
    newer than the webhook's: before the first webhook the webhook's gauge stayed at 0, so
    a fresh installation whose API listed a day-old publication paged at once. It now
    reads the time reconciliation first looked, and a webhook's publication moves it on."""
    created = now() - timedelta(hours=24)
    fake_voucherify.publications = [list_item_from_event(event(1, created))]
    registry = CollectorRegistry()
    run = reconciler(fake_voucherify, store, bus)
    run.metrics = ReconcileMetrics(registry)
    looked = time.time()

    await run.run_once()

    def gauge(name: str) -> float:
        value = registry.get_sample_value(f"pubrelay_reconcile_{name}_timestamp_seconds")
        assert value is not None
        return value

    assert gauge("api_newest_publication") == created.timestamp()
    first_look = gauge("webhook_newest_publication")
    assert looked <= first_look <= time.time()
    assert gauge("api_newest_publication") - first_look < 0  # the alert's expression: quiet

    await store.record([Received("pub_by_webhook", 0.0, "webhook")])  # no creation time
    await run.run_once()
    assert gauge("webhook_newest_publication") > first_look


async def test_the_second_run_reads_back_only_to_the_watermark_minus_the_overlap(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    base = now() - timedelta(days=2)
    fake_voucherify.publications = [
        list_item_from_event(event(n, base + timedelta(minutes=n))) for n in range(300)
    ]
    await reconciler(fake_voucherify, store, bus).run_once()
    pages_first = len(fake_voucherify.requests)
    later = base + timedelta(minutes=400)
    fake_voucherify.publications.append(list_item_from_event(event(999, later)))

    second = await reconciler(fake_voucherify, store, bus, overlap_s=600).run_once()

    assert pages_first == 3
    assert second.pages == 1
    assert second.injected == 1
    assert second.since == base + timedelta(minutes=299) - timedelta(seconds=600)


async def test_a_multi_code_publication_becomes_one_event_listing_every_code(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    fake_voucherify.publications = [
        list_item_from_event(event(1, now() - timedelta(hours=1)), codes=["M-1", "M-2", "M-3"])
    ]
    await reconciler(fake_voucherify, store, bus).run_once()
    (record,) = await injected(bus)
    parsed = parse_event(record.value)
    assert parsed.data.voucher.code == "M-1"
    assert parsed.data.publication.vouchers == ["M-1", "M-2", "M-3"]


async def test_a_dry_run_lists_the_missing_and_injects_nothing(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    fake_voucherify.publications = [
        list_item_from_event(event(n, now() - timedelta(hours=n + 1))) for n in range(3)
    ]
    summary = await reconciler(fake_voucherify, store, bus).run_once(dry_run=True)
    assert len(summary.missing) == 3
    assert summary.injected == 0
    assert await injected(bus) == []
    assert await store.watermark() is None


async def test_a_held_lease_makes_a_second_runner_busy(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    assert await store.acquire_lease("other-runner", 300)
    with pytest.raises(ReconcileBusy):
        await reconciler(fake_voucherify, store, bus).run_once()
    assert fake_voucherify.requests == []
    await store.release_lease("other-runner")
    await reconciler(fake_voucherify, store, bus).run_once()
    assert len(fake_voucherify.requests) == 1


async def test_a_window_deeper_than_the_last_page_stops_with_a_clear_message(
    fake_voucherify: FakeVoucherify,
    store: ReceivedStore,
    bus: Bus,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(voucherify_api, "MAX_PAGE", 2)
    base = now() - timedelta(hours=10)
    fake_voucherify.publications = [
        list_item_from_event(event(n, base + timedelta(seconds=n))) for n in range(250)
    ]
    summary = await reconciler(fake_voucherify, store, bus).run_once()
    assert not summary.complete
    assert "deeper than the API lists" in summary.line()
    assert summary.injected == 200
    newest = base + timedelta(seconds=249)
    assert await store.watermark() == newest.timestamp()  # nothing older can be read


async def test_the_request_budget_bounds_a_run(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    base = now() - timedelta(hours=10)
    fake_voucherify.publications = [
        list_item_from_event(event(n, base + timedelta(seconds=n))) for n in range(450)
    ]
    summary = await reconciler(fake_voucherify, store, bus, max_requests=2).run_once()
    assert len(fake_voucherify.requests) == 2
    assert "request budget of 2" in (summary.stopped or "")
    assert "run one with a larger budget" in (summary.stopped or "")
    assert await store.watermark() is None


async def test_refused_credentials_fail_the_run_and_release_the_lease(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    run = reconciler(fake_voucherify, store, bus)
    run.api_settings = run.api_settings.model_copy(update={"app_token": SecretStr("wrong")})
    with pytest.raises(ApiAuthError):
        await run.run_once()
    assert await store.acquire_lease("next-runner", 60)


async def test_the_recorder_records_webhook_and_injected_publications(
    store: ReceivedStore,
) -> None:
    created = now() - timedelta(hours=1)
    body = sample_publication_body(
        event_id="evcus_1",
        delivery_id="whs_1",
        customer_id="c",
        email=None,
        code="X",
        created_at=created,
    )
    pub_id = json.loads(body)["data"]["publication"]["id"]
    recorder = ReceivedRecorder(store)
    await recorder.handle(
        Event(
            id="evcus_1",
            type="customer.publication.succeeded",
            raw=body,
            headers=(),
            key=b"c",
            attempt=1,
            topic=TOPIC,
            partition=0,
            offset=0,
        )
    )
    assert await store.missing({pub_id, "pub_other"}) == {"pub_other"}
    assert await store.newest_webhook() == created.timestamp()


async def test_the_redis_store_keeps_ids_and_one_lease(redis_server: str) -> None:
    store = create_store(
        LedgerSettings(url=redis_server),
        ReconcileSettings(redis_key_prefix=f"test:{now().timestamp()}:"),
        Path("unused"),
    )
    await store.open()
    try:
        await store.record([Received("pub_a", 10.0, "webhook"), Received("pub_b", 5.0, "webhook")])
        assert await store.missing({"pub_a", "pub_b", "pub_c"}) == {"pub_c"}
        assert await store.newest_webhook() == 10.0
        assert await store.acquire_lease("one", 60)
        assert not await store.acquire_lease("two", 60)
        assert await store.acquire_lease("one", 60)
        await store.release_lease("two")
        assert not await store.acquire_lease("two", 60)
        await store.release_lease("one")
        assert await store.acquire_lease("two", 60)
        await store.set_watermark(123.5)
        assert await store.watermark() == 123.5
    finally:
        await store.close()


async def test_publications_younger_than_the_minimum_age_wait_for_the_next_run(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    old, young = now() - timedelta(hours=1), now() - timedelta(minutes=1)
    fake_voucherify.publications = [
        list_item_from_event(event(1, old)),
        list_item_from_event(event(2, young)),
    ]
    summary = await reconciler(fake_voucherify, store, bus, min_age_s=600).run_once()
    assert summary.injected == 1
    assert await store.watermark() == old.timestamp()
    later = await reconciler(fake_voucherify, store, bus, min_age_s=0).run_once()
    assert later.injected == 1


async def test_periodic_runs_stop_promptly_and_release_the_lease_when_stopped(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    fake_voucherify.fail_next(429, retry_after="3600")
    stop = asyncio.Event()
    periodic = asyncio.create_task(
        run_periodically(reconciler(fake_voucherify, store, bus), 3600, stop)
    )
    for _ in range(100):
        if fake_voucherify.requests:
            break
        await asyncio.sleep(0.05)
    assert fake_voucherify.requests, "the first periodic run never asked the API"
    stop.set()
    await asyncio.wait_for(periodic, timeout=10)
    assert await store.acquire_lease("next-runner", 60)


async def test_the_sqlite_store_forgets_ids_older_than_the_retention(tmp_path: Path) -> None:
    store = SqliteReceivedStore(tmp_path / "reconcile.sqlite3", retention_s=0.05)
    await store.open()
    try:
        await store.record([Received("pub_old", 1.0, "webhook")])
        await asyncio.sleep(0.2)
        await store.purge()
        await store.record([Received("pub_new", 2.0, "webhook")])
        assert await store.missing({"pub_old", "pub_new"}) == {"pub_old"}
    finally:
        await store.close()


async def test_a_publication_listed_with_a_null_result_is_a_success_only_with_its_codes(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    # The spec lets every kind of item carry "result": null.
    base = now() - timedelta(hours=2)
    succeeded = list_item_from_event(event(1, base))
    succeeded["result"] = None
    failed = failed_item("pub_failed_null", "cust_x", (base + timedelta(minutes=1)).isoformat())
    failed["result"] = None
    failed["vouchers"] = ["CODE-X"]  # a code, but a failure_code: a failure
    no_code = list_item_from_event(event(2, base + timedelta(minutes=2)), codes=[])
    no_code["result"], no_code["vouchers"] = None, [None, ""]  # no usable code
    fake_voucherify.publications = [succeeded, failed, no_code]

    summary = await reconciler(fake_voucherify, store, bus).run_once()

    assert (summary.seen, summary.failures, summary.injected) == (3, 2, 1)
    [record] = await injected(bus)
    assert header(record.headers, HEADER_EVENT_ID) == event_id_for(succeeded["id"]).encode()


async def test_an_unreadable_item_is_left_out_and_counted_not_the_end_of_every_run(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    base = now() - timedelta(hours=5)
    items = [list_item_from_event(event(n, base + timedelta(minutes=n))) for n in range(250)]
    items[240]["created_at"] = None  # nullable in the spec; listed on the first page
    fake_voucherify.publications = items

    summary = await reconciler(fake_voucherify, store, bus).run_once()

    assert summary.complete
    assert (summary.pages, summary.unreadable, summary.injected) == (3, 1, 249)
    assert "1 unreadable" in summary.line()


async def test_a_publication_the_listing_shows_twice_is_counted_and_injected_once(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    """Publications created while the run pages push the older ones down a page."""
    base = now() - timedelta(hours=5)
    items = [list_item_from_event(event(n, base + timedelta(minutes=n))) for n in range(150)]
    fake_voucherify.publications = items
    fresh = now() + timedelta(minutes=1)  # too young to be checked this run

    def five_created() -> None:
        fake_voucherify.publications += [
            list_item_from_event(event(1000 + n, fresh)) for n in range(5)
        ]

    fake_voucherify.after_page[1] = five_created
    summary = await reconciler(fake_voucherify, store, bus).run_once()

    assert (summary.seen, summary.injected) == (150, 150)
    records = await injected(bus)
    assert len({header(r.headers, HEADER_EVENT_ID) for r in records}) == len(records) == 150


async def test_a_window_older_than_the_store_remembers_is_refused_or_shortened(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus
) -> None:
    """Publications that arrived by webhook before the store's retention read as missing:
    each would be delivered again (and e-mailed again, past the ledger's memory)."""
    retention: dict[str, Any] = {"retention_s": 3 * 3600, "lookback_s": 3600, "overlap_s": 600}
    old = now() - timedelta(hours=5)
    fake_voucherify.publications = [
        list_item_from_event(event(n, old + timedelta(minutes=n))) for n in range(3)
    ]

    with pytest.raises(ReconcileWindowTooOld, match="PUBRELAY_RECONCILE__RETENTION_S"):
        await reconciler(fake_voucherify, store, bus, **retention).run_once(
            since=now() - timedelta(hours=6)
        )
    await store.set_watermark((now() - timedelta(hours=6)).timestamp())  # no run for hours
    with structlog.testing.capture_logs() as logs:
        summary = await reconciler(fake_voucherify, store, bus, **retention).run_once()

    assert summary.since >= now() - timedelta(hours=3, seconds=5)
    assert (summary.seen, summary.injected) == (0, 0)  # the old ones are not told apart
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
        "reconcile_window_shortened"
    ]
    assert await injected(bus) == []


async def test_a_worker_reconciles_first_once_its_recorder_caught_up_with_the_bus(
    fake_voucherify: FakeVoucherify, store: ReceivedStore, bus: Bus, tmp_path: Path
) -> None:
    """Publications received while the worker was away wait on the bus: a run before the
    recorder has read them takes them for missing (and fires FoundMissing)."""
    base = now() - timedelta(hours=1)
    events = [event(n, base + timedelta(minutes=n)) for n in range(60)]
    fake_voucherify.publications = [list_item_from_event(e) for e in events]
    for e in events:  # came by webhook, while no worker ran
        await bus.publish(TOPIC, json.dumps(e).encode(), key=e["data"]["customer"]["id"].encode())
    registry = CollectorRegistry()
    run = reconciler(fake_voucherify, store, bus)
    run.metrics = ReconcileMetrics(registry)
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=3600)
    await ledger.open()
    try:
        worker = make_worker(ReceivedRecorder(store), bus, ledger, registry, "voucherify.")
        worker.reconciler, worker.reconcile_interval_s = run, 3600
        async with running(worker):
            await eventually(
                lambda: (
                    registry.get_sample_value(
                        "pubrelay_reconcile_runs_total", {"outcome": "success"}
                    )
                    == 1
                ),
                what="the first run",
            )
    finally:
        await ledger.close()

    assert registry.get_sample_value("pubrelay_reconcile_missing_total") == 0
    assert len(await injected(bus)) == 60  # the webhook's only
