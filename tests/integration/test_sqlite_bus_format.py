"""The embedded bus's file carries its format version: a file an older pubrelay wrote is
brought up to date when opened, one a newer pubrelay wrote is refused, naming both."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from bus.sqlite import SqliteBus
from bus.sqlite.schema import FORMAT_VERSION
from bus.types import TopicPartition
from schemas.errors import BusUnavailable

# The file as pubrelay wrote it before its groups were timed (format 0).
FORMAT_0 = """
CREATE TABLE log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE INDEX log_topic_id ON log (topic, id);
CREATE TABLE group_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
INSERT INTO log (topic, key, value, headers, ts_ms) VALUES ('p.events', NULL, x'61', x'90', 1);
INSERT INTO group_offsets VALUES ('pubrelay.email', 'p.events', 1);
"""


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


async def test_a_file_of_the_format_before_is_brought_up_to_date_keeping_its_groups(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(FORMAT_0)
    before = int(time.time() * 1000)

    bus = SqliteBus(path)
    await bus.start()
    try:
        reader = bus.subscribe("pubrelay.email", ["p.events"])
        await reader.start()
        [message] = await reader.fetch(timeout_s=1.0)  # from its committed offset on
        await reader.close()
    finally:
        await bus.close()

    assert message.value == b"a"
    assert query(path, "PRAGMA user_version") == [(FORMAT_VERSION,)]
    [(group, offset, seen_ms)] = query(path, "SELECT grp, next_offset, seen_ms FROM group_offsets")
    assert (group, offset) == ("pubrelay.email", 1)
    assert isinstance(seen_ms, int)
    assert seen_ms >= before  # seen as of the upgrade: not passed over at once


async def test_a_group_is_seen_when_it_commits_and_when_its_worker_reports_lag(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path)
    await bus.start()
    try:
        reader = bus.subscribe("pubrelay.email", ["p.events"])
        await reader.start()
        await reader.commit({TopicPartition("p.events", 0): 1})
        [(committed_seen,)] = query(path, "SELECT seen_ms FROM group_offsets")
        await asyncio.sleep(0.01)
        await reader.lag()
        [(reported_seen,)] = query(path, "SELECT seen_ms FROM group_offsets")
        await reader.close()
    finally:
        await bus.close()

    assert isinstance(committed_seen, int)
    assert isinstance(reported_seen, int)
    assert reported_seen > committed_seen


async def test_a_file_a_newer_pubrelay_wrote_is_refused_naming_it_and_both_formats(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")

    bus = SqliteBus(path)
    with pytest.raises(BusUnavailable) as raised:
        await bus.start()
    await bus.close()

    message = str(raised.value)
    assert str(path) in message
    assert f"format {FORMAT_VERSION + 1}" in message
    assert f"up to format {FORMAT_VERSION}" in message


async def test_a_lag_report_marks_only_the_topics_the_group_still_reads(tmp_path: Path) -> None:
    """A handler whose event types were narrowed: the topic it dropped is no longer seen,
    so retention stops keeping its records for it."""
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path)
    await bus.start()
    try:
        before = bus.subscribe("pubrelay.metrics", ["p.a", "p.b"])
        await before.start()
        await before.commit({TopicPartition("p.a", 0): 1, TopicPartition("p.b", 0): 1})
        await before.close()
        [(committed_b,)] = query(path, "SELECT seen_ms FROM group_offsets WHERE topic = 'p.b'")
        await asyncio.sleep(0.01)
        narrowed = bus.subscribe("pubrelay.metrics", ["p.a"])
        await narrowed.start()
        await narrowed.lag()
        await narrowed.close()
    finally:
        await bus.close()

    seen = {
        str(topic): int(str(ms))
        for topic, ms in query(path, "SELECT topic, seen_ms FROM group_offsets")
    }
    assert seen["p.a"] > int(str(committed_b))  # still read: seen
    assert seen["p.b"] == committed_b  # dropped: not seen since
