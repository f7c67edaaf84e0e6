"""The embedded default bus: an append-only log in one SQLite file.

Durability: WAL journal with ``synchronous=FULL``; ``publish`` returns only after the
transaction holding its record is committed. Concurrent publishes share one commit
(group commit), so throughput does not pay one fsync per request.

Exactly-once answers: a publish that times out is withdrawn if the writer has not yet
claimed it, so a caller told "not stored" finds nothing stored. Only a record whose
commit was already under way when the timeout fired is awaited a little longer.

Retention (``retention_s``): a record older than that is deleted once every consumer
group that reads its topic has committed past it, so nothing unhandled is lost; records
of topics no group reads are deleted by age, except quarantine and dead letters.

Consumers: one partition (0) per topic; the offset is the record's row id. Consumer
groups store their next offset in the same file. Consumers in this process are woken by
publishes; records written by another process are seen within ``poll_interval_s``.
One worker process per consumer group is supported on this bus (use Kafka to scale out).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import msgspec
import structlog

from bus.types import Message, RevokeCallback, Subscription, TopicPartition
from schemas.errors import BusUnavailable
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.sqlite")

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_topic_id ON log (topic, id);
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""

# Old records go only once every consumer group of their topic is past them; on a topic
# no group reads, by age alone, except quarantine and dead letters (kept for a human).
_RETENTION_SQL: Final = """
DELETE FROM log WHERE ts_ms < ? AND (
    id < (SELECT MIN(g.next_offset) FROM group_offsets g WHERE g.topic = log.topic)
    OR (
        NOT EXISTS (SELECT 1 FROM group_offsets g WHERE g.topic = log.topic)
        AND topic NOT LIKE '%quarantine' AND topic NOT LIKE '%dlq.%'
    )
)
"""
_ROWS_PER_INSERT: Final = 100  # 500 parameters, well under SQLite's limit


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO log (topic, key, value, headers, ts_ms) VALUES {values}"  # noqa: S608


_PENDING: Final = 0
_CLAIMED: Final = 1
_WITHDRAWN: Final = 2

_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@dataclass(slots=True)
class _Entry:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    ts_ms: int
    future: asyncio.Future[None]
    state: int = _PENDING


class SqliteBus:
    """A :class:`bus.types.Bus` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        publish_timeout_s: float = 5.0,
        retention_s: float = 7 * 24 * 3600,
        poll_interval_s: float = 0.5,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = path
        self.publish_timeout_s = publish_timeout_s
        self.retention_s = retention_s
        self.poll_interval_s = poll_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-bus-writer")
        self._conn: sqlite3.Connection | None = None
        self._state_lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()
        self._published = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._next_retention = 0.0
        self._closing = False

    async def start(self) -> None:
        if self._writer is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = await self._run(self._open)
        except (OSError, sqlite3.Error) as err:
            raise BusUnavailable(f"cannot open the embedded bus at {self.path}: {err}") from err
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-bus-writer")

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path, self._busy_timeout_s)
        conn.executescript(_SCHEMA)
        return conn

    async def close(self) -> None:
        if self._writer is not None:
            # Refuse new records, let the writer commit what it already accepted (bounded).
            self._closing = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.publish_timeout_s)
            except TimeoutError:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            self._writer = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        # A writer stuck on a lock must not block the event loop while it shuts down.
        await asyncio.to_thread(self._executor.shutdown, True)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- publishing -----------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> None:
        if self._writer is None or self._closing:
            raise BusUnavailable("the embedded bus is not started")
        loop = asyncio.get_running_loop()
        entry = _Entry(topic, key, value, headers, int(time.time() * 1000), loop.create_future())
        self._pending.append(entry)
        self._wake.set()
        timeout = self.publish_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(entry.future), timeout)
        except TimeoutError:
            with self._state_lock:
                if entry.state == _PENDING:
                    entry.state = _WITHDRAWN
                    withdrawn = True
                else:
                    withdrawn = False
            if withdrawn:
                raise BusUnavailable(
                    f"the embedded bus did not commit within {timeout:.1f}s"
                ) from None
            # The commit holding this record is under way: its outcome decides.
            try:
                await asyncio.wait_for(asyncio.shield(entry.future), timeout)
            except TimeoutError:
                raise BusUnavailable("the embedded bus commit is stalled") from None

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                if self._closing:
                    return
                continue
            try:
                await self._run(self._write_batch, batch)
            except Exception as err:  # any failure fails this batch, not the loop
                log.warning("bus_write_failed", error=str(err), records=len(batch))
                failure = BusUnavailable(f"the embedded bus could not commit: {err}")
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(failure)
                        # Retrieved here so an abandoned future does not warn.
                        entry.future.exception()
            else:
                for entry in batch:
                    if entry.state == _CLAIMED and not entry.future.done():
                        entry.future.set_result(None)
                self._published.set()
                self._published = asyncio.Event()
            if self._closing and not self._pending:
                return

    def _write_batch(self, batch: list[_Entry]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            with self._state_lock:
                live = [e for e in batch if e.state == _PENDING]
                for entry in live:
                    entry.state = _CLAIMED
            # One multi-row statement per chunk: sqlite3 releases and re-takes the GIL
            # around every step, and under load each re-take waits for the event loop's
            # thread (the switch interval), so per-row steps made commits ten times slower.
            for start in range(0, len(live), _ROWS_PER_INSERT):
                chunk = live[start : start + _ROWS_PER_INSERT]
                params: list[object] = []
                for e in chunk:
                    params += (e.topic, e.key, e.value, _headers_encoder.encode(e.headers), e.ts_ms)
                conn.execute(_insert_sql(len(chunk)), params)
            self._apply_retention(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _apply_retention(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if now < self._next_retention:
            return
        self._next_retention = now + min(self.retention_s, 60.0)
        cutoff = int((time.time() - self.retention_s) * 1000)
        conn.execute(_RETENTION_SQL, (cutoff,))

    async def ping(self) -> None:
        if self._writer is None or self._writer.done():
            raise BusUnavailable("the embedded bus is not running")
        try:
            await asyncio.wait_for(self._run(self._ping), self.publish_timeout_s)
        except (TimeoutError, sqlite3.Error) as err:
            raise BusUnavailable(f"the embedded bus does not answer: {err!r}") from err

    def _ping(self) -> None:
        assert self._conn is not None
        self._conn.execute("SELECT 1").fetchone()

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Topics need no creation on the embedded bus."""

    # -- consuming ------------------------------------------------------------------

    def subscribe(
        self,
        group: str,
        topics: Sequence[str],
        *,
        on_revoke: RevokeCallback | None = None,
    ) -> Subscription:
        del on_revoke  # one member per group: partitions are never revoked here
        return SqliteSubscription(self, group, topics)

    async def wait_published(self, timeout_s: float) -> None:
        """Return when this process commits new records, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._published.wait(), timeout_s)


class SqliteSubscription:
    """A consumer-group member on :class:`SqliteBus` (partition 0 of each topic)."""

    def __init__(self, bus: SqliteBus, group: str, topics: Sequence[str]) -> None:
        self.bus = bus
        self.group = group
        self.topics = list(dict.fromkeys(topics))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-bus-reader")
        self._conn: sqlite3.Connection | None = None
        self._positions: dict[str, int] = {}
        self._lock_fd: int | None = None

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        self._lock_fd = self._lock_group()
        try:
            self._conn = await self._run(_connect, self.bus.path, 30.0)
            self._positions = await self._run(self._committed)
        except BaseException:
            self._unlock_group()
            raise

    def _lock_group(self) -> int:
        """One member per group on this bus: a second one (``pubrelay serve`` started twice
        on one data directory) would handle every event again."""
        name = hashlib.sha256(self.group.encode()).hexdigest()[:16]
        path = self.bus.path.with_name(f"{self.bus.path.name}.group-{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusUnavailable(
                f"consumer group {self.group!r} is already consuming {self.bus.path} in another "
                "process; the embedded bus allows one per group (use Kafka to run several)"
            ) from None
        return fd

    def _unlock_group(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _committed(self) -> dict[str, int]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT topic, next_offset FROM group_offsets WHERE grp = ?", (self.group,)
        ).fetchall()
        stored = dict(rows)
        return {t: int(stored.get(t, 0)) for t in self.topics}

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        await asyncio.to_thread(self._executor.shutdown, True)
        self._unlock_group()

    async def fetch(self, *, max_records: int = 500, timeout_s: float = 1.0) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            records = await self._run(self._read, max_records)
            if records:
                for message in records:
                    self._positions[message.topic] = max(
                        self._positions[message.topic], message.offset + 1
                    )
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self.bus.wait_published(min(remaining, self.bus.poll_interval_s))

    def _read(self, max_records: int) -> list[Message]:
        assert self._conn is not None
        out: list[Message] = []
        for topic in self.topics:
            rows = self._conn.execute(
                "SELECT id, key, value, headers, ts_ms FROM log "
                "WHERE topic = ? AND id >= ? ORDER BY id LIMIT ?",
                (topic, self._positions[topic], max_records - len(out)),
            ).fetchall()
            out.extend(
                Message(
                    topic=topic,
                    partition=0,
                    offset=row[0],
                    key=row[1],
                    value=row[2],
                    headers=tuple(_headers_decoder.decode(row[3])),
                    timestamp_ms=row[4],
                )
                for row in rows
            )
            if len(out) >= max_records:
                break
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            await self._run(self._commit, dict(offsets))

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self._conn is not None
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT INTO group_offsets (grp, topic, next_offset) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, topic) DO UPDATE SET next_offset = excluded.next_offset",
                [(self.group, tp.topic, offset) for tp, offset in offsets.items()],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise

    async def lag(self) -> Mapping[TopicPartition, int]:
        return await self._run(self._lag)

    def _lag(self) -> dict[TopicPartition, int]:
        assert self._conn is not None
        committed = self._committed()
        out: dict[TopicPartition, int] = {}
        for topic in self.topics:
            (count,) = self._conn.execute(
                "SELECT count(*) FROM log WHERE topic = ? AND id >= ?",
                (topic, committed[topic]),
            ).fetchone()
            out[TopicPartition(topic, 0)] = int(count)
        return out
