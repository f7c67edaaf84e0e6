"""The event index, in SQLite and in Redis: what the recorder writes is found by search and
shown in order, the overview counts each handler's latest outcome, the queue in front of
it is bounded, and nothing outlives the retention."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from bus.types import Message
from handlers.config import LedgerSettings
from pubrelay.console.config import ConsoleSettings
from pubrelay.console.index import EventIndex, create_index
from pubrelay.console.recorder import IndexRecorder
from pubrelay.console.redis_index import RedisEventIndex
from pubrelay.console.sqlite_index import SqliteEventIndex
from tests.fixtures.app import event_body

IndexFactory = Callable[[float], EventIndex]


@pytest.fixture(params=["sqlite", "redis"])
def make_index(request: pytest.FixtureRequest, tmp_path: Path) -> IndexFactory:
    """An index of the kind under test, not opened, with the given retention."""

    def make(retention_s: float) -> EventIndex:
        if request.param == "sqlite":
            return SqliteEventIndex(tmp_path / "index.sqlite3", retention_s=retention_s)
        url = request.getfixturevalue("redis_server")
        prefix = f"test:{uuid.uuid4().hex[:8]}:"
        return RedisEventIndex(url, key_prefix=prefix, retention_s=retention_s)

    return make


def headers(event_id: str, delivery_id: str) -> tuple[tuple[str, bytes], ...]:
    return (
        ("event-id", event_id.encode()),
        ("event-type", b"customer.publication.succeeded"),
        ("delivery-id", delivery_id.encode()),
    )


async def test_deliveries_and_outcomes_are_found_and_told_in_order(
    make_index: IndexFactory,
) -> None:
    index = make_index(3600)
    await index.open()
    if isinstance(index, SqliteEventIndex):
        assert stat.S_IMODE(index.path.stat().st_mode) == 0o600
    recorder = IndexRecorder(index, queue_max=100)
    body = event_body(event_id="evt_ix_1", delivery_id="whs_ix_1", customer_id="cust_ix")
    other_process = IndexRecorder(index, queue_max=100)
    # Voucherify delivered it twice, the second time to another process
    for delivery, receiver in (("whs_ix_1", recorder), ("whs_ix_2", other_process)):
        receiver.received(
            topic="voucherify.customer.publication.succeeded",
            headers=headers("evt_ix_1", delivery),
            body=event_body(event_id="evt_ix_1", delivery_id=delivery, customer_id="cust_ix"),
            status=202,
            outcome="accepted",
        )
        await receiver.flush()
    message = Message("voucherify.customer.publication.succeeded", 0, 7, b"cust_ix", body, (), 0)
    recorder.attempted("email", message, event_id="evt_ix_1", outcome="retrying", attempt=1,
                       detail="smtp: 451 try later")  # fmt: skip
    recorder.attempted("email", message, event_id="evt_ix_1", outcome="done", attempt=2)
    await recorder.flush()
    for query in ("evt_ix_1", "WHS_IX_2", "CUST_IX"):
        assert [r.event_id for r in await index.search(query)] == ["evt_ix_1"], query
    timeline = await index.timeline("evt_ix_1")
    assert timeline is not None
    assert [d.delivery_id for d in timeline.deliveries] == ["whs_ix_1", "whs_ix_2"]
    assert [(a.outcome, a.attempt, a.detail) for a in timeline.attempts] == [
        ("retrying", 1, "smtp: 451 try later"),
        ("done", 2, ""),
    ]
    assert timeline.attempts[0].offset == 7
    assert timeline.event.handlers == {"email": "done"}
    assert timeline.event.body == body  # the first delivery's, in both kinds of index
    counts = await index.counts(time.time() - 60)
    assert counts.intake == {"accepted": 2}
    assert counts.handlers == {"email": {"done": 1}}  # the latest outcome only
    assert counts.oldest_retrying == {}
    series = await index.series(time.time() - 3600, 4)
    assert sum(series["accepted"]) == 2
    await index.close()


async def test_a_full_queue_drops_new_entries_and_counts_them(make_index: IndexFactory) -> None:
    index = make_index(3600)
    await index.open()
    recorder = IndexRecorder(index, queue_max=3)
    for n in range(5):
        recorder.received(topic="t", headers=headers(f"evt_q_{n}", f"whs_q_{n}"), body=b"{}",
                          status=202, outcome="accepted")  # fmt: skip
    assert recorder.dropped == 2
    await recorder.flush()
    assert len(await index.recent()) == 3
    await index.close()


async def test_an_event_whose_first_write_failed_is_written_with_its_next_entry(
    tmp_path: Path,
) -> None:
    """A write the index refused (a full disk) loses that batch, not the event: before,
    the recorder took the event as written and its later entries had no event row to
    show them (the timeline was empty for good)."""
    index = SqliteEventIndex(tmp_path / "index.sqlite3", retention_s=3600)
    await index.open()
    with sqlite3.connect(index.path) as db:
        db.executescript(
            """
            CREATE TABLE refuse (x);
            INSERT INTO refuse VALUES (1);
            CREATE TRIGGER refuse BEFORE INSERT ON deliveries WHEN EXISTS (SELECT 1 FROM refuse)
            BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
            """
        )
    recorder = IndexRecorder(index, queue_max=10)
    body = event_body(event_id="evt_full", delivery_id="whs_full", customer_id="cust_full")
    recorder.received(topic="voucherify.customer.publication.succeeded",
                      headers=headers("evt_full", "whs_full"), body=body, status=202,
                      outcome="accepted")  # fmt: skip
    await recorder.flush()
    assert await index.timeline("evt_full") is None
    with sqlite3.connect(index.path) as db:
        db.execute("DELETE FROM refuse")
    message = Message("voucherify.customer.publication.succeeded", 0, 3, b"cust_full", body, (), 0)
    recorder.attempted("email", message, event_id="evt_full", outcome="done", attempt=1)
    await recorder.flush()
    timeline = await index.timeline("evt_full")
    assert timeline is not None
    assert timeline.event.handlers == {"email": "done"}
    assert [r.event_id for r in await index.search("cust_full")] == ["evt_full"]
    await index.close()


async def test_the_queue_holds_bodies_up_to_its_byte_bound(make_index: IndexFactory) -> None:
    """Large bodies fill it before its count does; written, they make room again."""
    index = make_index(3600)
    await index.open()
    recorder = IndexRecorder(index, queue_max=100, queue_bytes_max=3 * 1024 * 1024)
    large = event_body(event_id="evt_b") + b" " * (1024 * 1024 - 10_000)
    for n in range(5):
        recorder.received(topic="t", headers=headers(f"evt_b_{n}", f"whs_b_{n}"), body=large,
                          status=202, outcome="accepted")  # fmt: skip
    assert recorder.dropped == 2
    await recorder.flush()
    assert len(await index.recent()) == 3
    recorder.received(topic="t", headers=headers("evt_b_5", "whs_b_5"), body=large,
                      status=202, outcome="accepted")  # fmt: skip
    assert recorder.dropped == 2  # room again after the write
    await index.close()


async def test_nothing_outlives_the_retention(make_index: IndexFactory) -> None:
    index = make_index(1)
    await index.open()
    recorder = IndexRecorder(index, queue_max=10)
    recorder.received(topic="t", headers=headers("evt_old", "whs_old"), body=b"{}", status=202,
                      outcome="accepted")  # fmt: skip
    await recorder.flush()
    assert await index.search("evt_old")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and await index.search("evt_old"):
        await asyncio.sleep(0.2)
        recorder.received(topic="t", headers=headers("evt_new", "whs_new"), body=b"{}",
                          status=202, outcome="accepted")  # fmt: skip
        await recorder.flush()  # each write purges once the retention has passed
    assert await index.search("evt_old") == []
    timeline = await index.timeline("evt_old")
    assert timeline is None
    await index.close()


async def test_a_logout_is_remembered_until_the_session_would_have_expired(
    make_index: IndexFactory,
) -> None:
    index = make_index(3600)
    await index.open()
    now = time.time()
    await index.end_session("0123456789abcdef", now + 1.5)
    await index.end_session("fedcba9876543210", now + 3600)
    assert await index.session_ended("0123456789abcdef")
    assert not await index.session_ended("00000000000000ff")  # never logged out
    await asyncio.sleep(max(0.0, now + 2.5 - time.time()))  # Redis: a TTL in whole seconds
    assert not await index.session_ended("0123456789abcdef")  # past its expiry: let go
    assert await index.session_ended("fedcba9876543210")
    await index.close()


def test_the_index_sits_beside_the_ledger(tmp_path: Path) -> None:
    console = ConsoleSettings()
    redis = create_index(console, LedgerSettings(url="redis://127.0.0.1:1/0"), tmp_path)
    assert isinstance(redis, RedisEventIndex)
    default = create_index(console, LedgerSettings(), tmp_path)
    assert isinstance(default, SqliteEventIndex)
    assert default.path == tmp_path / "index.sqlite3"
    named = ConsoleSettings(index_url=f"sqlite:///{tmp_path}/elsewhere.sqlite3")
    chosen = create_index(named, LedgerSettings(url="redis://127.0.0.1:1/0"), tmp_path)
    assert isinstance(chosen, SqliteEventIndex)
    assert chosen.path == tmp_path / "elsewhere.sqlite3"


async def test_a_file_whose_tables_a_later_version_widened_is_still_written(
    tmp_path: Path,
) -> None:
    index = SqliteEventIndex(tmp_path / "index.sqlite3", retention_s=3600)
    await index.open()
    await index.close()
    with sqlite3.connect(index.path) as conn:
        for table in ("events", "terms", "deliveries", "attempts", "handler_state"):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN later TEXT NOT NULL DEFAULT ''")
    conn.close()

    index = SqliteEventIndex(index.path, retention_s=3600)
    await index.open()
    recorder = IndexRecorder(index, queue_max=10)
    body = event_body(event_id="evt_wide", delivery_id="whs_wide", customer_id="cust_wide")
    recorder.received(
        topic="voucherify.customer.publication.succeeded",
        headers=headers("evt_wide", "whs_wide"),
        body=body,
        status=202,
        outcome="accepted",
    )
    message = Message("voucherify.customer.publication.succeeded", 0, 3, b"cust_wide", body, (), 0)
    recorder.attempted("email", message, event_id="evt_wide", outcome="done", attempt=1)
    await recorder.flush()
    timeline = await index.timeline("evt_wide")
    await index.close()

    assert timeline is not None
    assert [d.delivery_id for d in timeline.deliveries] == ["whs_wide"]
    assert timeline.event.handlers == {"email": "done"}
