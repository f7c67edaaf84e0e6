"""Retention on the embedded bus costs one small chunk per transaction, whatever the log's size.

What it deletes is pinned by the bus contract suite
(``test_sqlite_retention_keeps_unconsumed_records_and_dead_letters``); here, how: the bus's
writer process runs a pass's steps (``RetentionPass.step``) between publish batches, and
the same steps run here on a traced connection (observation only), then each statement's
query plan is asked of SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from bus.sqlite import SqliteBus
from bus.sqlite.connection import connect
from bus.sqlite.retention import RetentionPass
from bus.sqlite.schema import SCHEMA, encode_headers
from bus.types import TopicPartition
from tests.fixtures.bus_groups import seen_meanwhile
from tests.fixtures.worker import eventually

CHUNK = 200
BACKLOG = 5 * CHUNK
FULL_SCAN = re.compile(r"\bSCAN (TABLE )?log\b")


def add_expired_backlog(path: Path) -> int:
    """``BACKLOG`` records of topic ``p.events`` published a day ago; the last one's id."""
    day_ago_ms = int((time.time() - 86_400) * 1000)
    row = ("p.events", b"customer", b"old", encode_headers(()), day_ago_ms)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO log (topic, key, value, headers, ts_ms) VALUES (?, ?, ?, ?, ?)",
            [row] * BACKLOG,
        )
        (last,) = conn.execute("SELECT MAX(id) FROM log").fetchone()
        conn.execute("COMMIT")
    return int(last)


def count(path: Path, topic: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM log WHERE topic = ?", (topic,)).fetchone()
    return int(n)


def passed_over(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "bus_retention_passed_silent_group"]


def changes_per_transaction(traced: list[tuple[str, int]]) -> list[int]:
    """Rows changed by each ``BEGIN IMMEDIATE`` ... ``COMMIT`` of the traced connection."""
    out: list[int] = []
    began: int | None = None
    for sql, total_changes in traced:
        if sql == "BEGIN IMMEDIATE":
            began = total_changes
        elif sql == "COMMIT" and began is not None:
            out.append(total_changes - began)
            began = None
    return out


async def test_an_expired_backlog_goes_while_publishes_go_on(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, retention_s=1.0, retention_chunk_rows=CHUNK)  # a pass every second
    await bus.start()
    try:
        reader = bus.subscribe("g", ["p.events"])
        await reader.start()
        await reader.commit({TopicPartition("p.events", 0): BACKLOG + 1})  # all handled
        await reader.close()
        assert add_expired_backlog(path) == BACKLOG  # ids 1..BACKLOG
        await bus.publish("p.events", b"fresh")  # handled by nobody yet: kept

        published = 0
        deadline = time.monotonic() + 20
        while count(path, "p.events") > 1 and time.monotonic() < deadline:
            await bus.publish("p.other", b"publishes go on meanwhile", timeout_s=5)
            published += 1
            await asyncio.sleep(0.01)
    finally:
        await bus.close()

    assert count(path, "p.events") == 1  # the backlog went, the unhandled record stayed
    assert count(path, "p.other") == published > 0


def test_a_pass_deletes_in_small_index_driven_transactions(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    with contextlib.closing(connect(path, 30.0)) as conn:
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT INTO group_offsets (grp, topic, next_offset, seen_ms) VALUES (?, ?, ?, ?)",
            ("g", "p.events", BACKLOG + 1, int(time.time() * 1000)),
        )
    assert add_expired_backlog(path) == BACKLOG
    traced: list[tuple[str, int]] = []
    with contextlib.closing(connect(path, 30.0)) as conn:  # as the writer process opens it
        conn.set_trace_callback(lambda sql: traced.append((sql, conn.total_changes)))
        retention = RetentionPass(int(time.time() * 1000) - 3_600_000, CHUNK)
        while not retention.done:
            retention.step(conn)

    assert retention.deleted == BACKLOG
    per_transaction = changes_per_transaction(traced)
    assert sum(per_transaction) == BACKLOG
    assert max(per_transaction) <= CHUNK, sorted(per_transaction)[-5:]

    statements = {
        sql for sql, _ in traced if sql.lstrip().upper().startswith(("SELECT", "WITH", "DELETE"))
    }
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plans = {sql: conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall() for sql in statements}
    assert any(sql.startswith("DELETE") for sql in plans)
    scans = {sql: plan for sql, plan in plans.items() if any(FULL_SCAN.search(r[3]) for r in plan)}
    assert not scans, scans


async def test_an_expired_record_stays_until_every_group_of_its_topic_is_past_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, retention_s=0.5, retention_chunk_rows=CHUNK)  # a pass every 0.5 s
    await bus.start()
    try:
        # The groups first, so no pass can see the topic unread; the records get ids 1...
        readers = []
        for group, past in (("fast", BACKLOG + 1), ("slow", 301)):  # "slow" handled 300
            reader = bus.subscribe(group, ["p.events"])
            await reader.start()
            await reader.commit({TopicPartition("p.events", 0): past})
            readers.append(reader)
        assert add_expired_backlog(path) == BACKLOG
        async with seen_meanwhile(*readers):  # their workers running
            await asyncio.sleep(1.2)  # two passes at least
        for reader in readers:
            await reader.close()
    finally:
        await bus.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (lowest,) = conn.execute("SELECT MIN(id) FROM log WHERE topic = 'p.events'").fetchone()
    assert count(path, "p.events") == BACKLOG - 300
    assert lowest == 301


async def test_a_group_not_seen_for_the_retention_no_longer_holds_records(
    tmp_path: Path,
) -> None:
    """A handler disabled (its group never seen again) kept every record from its last
    commit on, until the disk was full; as on Kafka, it now holds nothing past the
    retention, and the log says what it had not read."""
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, retention_s=0.5, retention_chunk_rows=CHUNK)
    await bus.start()
    try:
        live = bus.subscribe("pubrelay.email", ["p.events"])
        await live.start()
        await live.commit({TopicPartition("p.events", 0): BACKLOG + 1})
        gone = bus.subscribe("pubrelay.crm", ["p.events"])  # disabled after 100 records
        await gone.start()
        await gone.commit({TopicPartition("p.events", 0): 101})
        await gone.close()
        assert add_expired_backlog(path) == BACKLOG
        with structlog.testing.capture_logs() as logs:
            async with seen_meanwhile(live):  # its worker running
                await eventually(
                    lambda: not count(path, "p.events") and bool(passed_over(logs)),
                    timeout_s=10,
                    what="the backlog deleted and the silent group logged",
                )
        await live.close()
    finally:
        await bus.close()

    assert count(path, "p.events") == 0
    passed = passed_over(logs)
    assert [(line["group"], line["topic"]) for line in passed] == [("pubrelay.crm", "p.events")]
    assert sum(line["records"] for line in passed) == BACKLOG - 100
    assert passed[0]["log_level"] == "warning"


async def test_a_silent_group_still_marks_what_was_released_from_quarantine(
    tmp_path: Path,
) -> None:
    """Quarantine waits for a person: what its release group has not taken stays, however
    long ago that group last committed."""
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, retention_s=0.2)
    await bus.start()
    try:
        for n in range(4):
            await bus.publish("p.quarantine", f"q{n}".encode())
        release = bus.subscribe("pubrelay.release", ["p.quarantine"])
        await release.start()
        await release.commit({TopicPartition("p.quarantine", 0): 3})  # q0 and q1 released
        await release.close()
        deadline = time.monotonic() + 10
        while count(path, "p.quarantine") > 2 and time.monotonic() < deadline:
            await bus.publish("p.trigger", b"publishes go on meanwhile")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # more passes, the release group silent all along
    finally:
        await bus.close()

    with contextlib.closing(sqlite3.connect(path)) as conn:
        left = [v for (v,) in conn.execute("SELECT value FROM log WHERE topic = 'p.quarantine'")]
    assert left == [b"q2", b"q3"]


async def test_quarantine_and_dead_letters_go_after_the_kept_topics_retention_if_one_is_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, retention_s=3600, kept_topics_retention_s=0.3)
    await bus.start()
    try:
        for topic in ("p.quarantine", "p.dlq.email", "p.events"):
            await bus.publish(topic, b"old")
        deadline = time.monotonic() + 10
        while count(path, "p.quarantine") + count(path, "p.dlq.email") and (
            time.monotonic() < deadline
        ):
            await bus.publish("p.trigger", b"publishes go on meanwhile")
            await asyncio.sleep(0.1)
    finally:
        await bus.close()

    assert (count(path, "p.quarantine"), count(path, "p.dlq.email")) == (0, 0)
    assert count(path, "p.events") == 1  # within the bus's own retention
