"""`make bench` section "retention": how long a retention pass holds the embedded bus's
write lock on a log of millions of records, before and after chunked deletion.

A log of ``BENCH_RETENTION_ROWS`` records (``BENCH_RETENTION_VALUE_BYTES`` each, one topic,
its consumer group past all of them) spread over a week is built once with
``executemany``; each case runs on a fresh copy. "Steady state" is the pass of a bus at
10 events/s: about a minute of records has expired since the last pass. "Backlog" is the
first pass after a long stop: a tenth of the log has expired. Before: the single
``DELETE`` this change replaced, in one transaction (as it ran inside a publish batch).
After: :class:`bus.sqlite.retention.RetentionPass`, one chunk per transaction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Final

from bus.sqlite.connection import connect
from bus.sqlite.retention import RetentionPass
from bus.sqlite.schema import SCHEMA, encode_headers
from tests.bench.results import record

ROWS = int(os.environ.get("BENCH_RETENTION_ROWS", "2000000"))
VALUE_BYTES = int(os.environ.get("BENCH_RETENTION_VALUE_BYTES", "512"))
TOPIC: Final = "voucherify.customer.publication.succeeded"
WEEK_MS: Final = 7 * 24 * 3600 * 1000

BEFORE_SQL: Final = """
DELETE FROM log WHERE ts_ms < ? AND (
    id < (SELECT MIN(g.next_offset) FROM group_offsets g WHERE g.topic = log.topic)
    OR (
        NOT EXISTS (SELECT 1 FROM group_offsets g WHERE g.topic = log.topic)
        AND topic NOT LIKE '%quarantine' AND topic NOT LIKE '%dlq.%'
    )
)
"""


def build(path: Path, now_ms: int) -> None:
    """``ROWS`` records, the oldest a week old, the newest now, all handled. Written
    without a journal (it is only a fixture), then switched to the bus's WAL mode."""
    value = os.urandom(VALUE_BYTES)
    headers = encode_headers((("event-id", b"evcus_0"),))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        batch = 50_000
        for start in range(0, ROWS, batch):
            conn.executemany(
                "INSERT INTO log (topic, key, value, headers, ts_ms) VALUES (?, ?, ?, ?, ?)",
                (
                    (TOPIC, b"cust_1", value, headers, now_ms - WEEK_MS + i * WEEK_MS // ROWS)
                    for i in range(start, min(ROWS, start + batch))
                ),
            )
        conn.execute(
            "INSERT INTO group_offsets (grp, topic, next_offset, seen_ms) VALUES (?, ?, ?, ?)",
            ("pubrelay.email", TOPIC, ROWS + 1, now_ms),  # a worker running: seen now
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")


def warm_up(conn: sqlite3.Connection) -> None:
    """A first write, as a running bus has made: the WAL file exists, the index is cached."""
    conn.execute(
        "INSERT INTO group_offsets (grp, topic, next_offset) VALUES ('warm-up', 'none', 0)"
    )
    conn.execute("DELETE FROM group_offsets WHERE grp = 'warm-up'")
    conn.execute("SELECT COUNT(*) FROM log INDEXED BY log_topic_id").fetchone()


def before(path: Path, cutoff_ms: int) -> tuple[int, float]:
    with contextlib.closing(connect(path, busy_timeout_s=30)) as conn:
        warm_up(conn)
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute(BEFORE_SQL, (cutoff_ms,)).rowcount
        conn.execute("COMMIT")
        return deleted, time.perf_counter() - started


def after(path: Path, cutoff_ms: int) -> tuple[RetentionPass, list[float]]:
    """The pass, and each of its transactions' time (sorted, seconds)."""
    with contextlib.closing(connect(path, busy_timeout_s=30)) as conn:
        warm_up(conn)
        retention = RetentionPass(cutoff_ms)
        retention.step(conn)  # lists the topics: a read, no transaction
        held: list[float] = []
        while not retention.done:
            started = time.perf_counter()
            retention.step(conn)
            held.append(time.perf_counter() - started)
        return retention, sorted(held)


def bench_retention(tmp: Path) -> None:
    print(
        f"# retention: write lock held by one pass, log of {ROWS:,} records of "
        f"{VALUE_BYTES} bytes over a week (BENCH_RETENTION_ROWS, BENCH_RETENTION_VALUE_BYTES)"
    )
    now_ms = int(time.time() * 1000)
    base = tmp / "retention-base.sqlite3"
    started = time.perf_counter()
    build(base, now_ms)
    print(
        f"{'built with executemany':<38} {time.perf_counter() - started:>8.1f} s"
        f"   {base.stat().st_size / 2**20:,.0f} MiB"
    )
    cases = {
        "steady state (1 min expired)": now_ms - WEEK_MS + 60_000,
        "backlog (10% expired)": now_ms - WEEK_MS + WEEK_MS // 10,
    }
    work = tmp / "retention.sqlite3"
    try:
        for name, cutoff_ms in cases.items():
            shutil.copyfile(base, work)
            deleted, held_s = before(work, cutoff_ms)
            print(
                f"{name + ', before':<38} one transaction {held_s * 1000:>9.1f} ms"
                f"   deleted {deleted:,}"
            )
            shutil.copyfile(base, work)
            retention, held = after(work, cutoff_ms)
            print(
                f"{name + ', after':<38} transactions {len(held):,}, p50 "
                f"{held[len(held) // 2] * 1000:.2f} ms, longest {held[-1] * 1000:.2f} ms"
                f"   deleted {retention.deleted:,} in {retention.elapsed_s:.2f} s"
            )
            print(f"{'':<38} lock held: before / longest after {held_s / held[-1]:,.0f}x")
            record(
                "retention",
                f"{name}: write lock held, longest chunk",
                held[-1] * 1000,
                "ms",
                baseline=held_s * 1000,
                baseline_name=f"{name}: the single DELETE before chunking",
                extra={"deleted": retention.deleted, "transactions": len(held)},
            )
    finally:
        for path in tmp.glob("retention*.sqlite3*"):
            path.unlink()
