"""Consuming from the embedded bus: one consumer-group member per :class:`SqliteSubscription`.

One partition (0) per topic; the offset is the record's row id. Consumer groups store
their next offset in the bus's file. Members in this process are woken by publishes;
records written by another process are seen within ``poll_interval_s``. One worker
process per consumer group is supported on this bus (use Kafka to scale out): a file lock
beside the bus refuses a second member of the same group.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from bus.sqlite.connection import transaction
from bus.sqlite.db import ConnectionThread
from bus.sqlite.schema import decode_headers
from bus.types import Message, TopicPartition
from schemas.errors import BusUnavailable

_BUSY_TIMEOUT_S: Final = 30.0


class SqliteSubscription:
    """A consumer-group member on the embedded bus at ``path`` (partition 0 of each topic).

    ``wait_published(timeout_s)`` returns when the bus in this process commits new
    records, or after ``timeout_s``.
    """

    def __init__(
        self,
        path: Path,
        group: str,
        topics: Sequence[str],
        *,
        poll_interval_s: float,
        wait_published: Callable[[float], Awaitable[None]],
    ) -> None:
        self.path = path
        self.group = group
        self.topics = list(dict.fromkeys(topics))
        self._poll_interval_s = poll_interval_s
        self._wait_published = wait_published
        self._db = ConnectionThread("sqlite-bus-reader")
        self._positions: dict[str, int] = {}
        self._lock_fd: int | None = None

    async def start(self) -> None:
        self._lock_fd = self._lock_group()
        try:
            await self._db.open(self.path, busy_timeout_s=_BUSY_TIMEOUT_S)
            self._positions = await self._db.run(self._committed)
        except BaseException:
            self._unlock_group()
            raise

    def _lock_group(self) -> int:
        """One member per group on this bus: a second one (``pubrelay serve`` started twice
        on one data directory) would handle every event again."""
        name = hashlib.sha256(self.group.encode()).hexdigest()[:16]
        path = self.path.with_name(f"{self.path.name}.group-{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusUnavailable(
                f"consumer group {self.group!r} is already consuming {self.path} in another "
                "process; the embedded bus allows one per group (use Kafka to run several)"
            ) from None
        return fd

    def _unlock_group(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _committed(self, conn: sqlite3.Connection) -> dict[str, int]:
        rows = conn.execute(
            "SELECT topic, next_offset FROM group_offsets WHERE grp = ?", (self.group,)
        ).fetchall()
        stored = dict(rows)
        return {t: int(stored.get(t, 0)) for t in self.topics}

    async def close(self) -> None:
        await self._db.close()
        self._unlock_group()

    async def fetch(self, *, max_records: int = 500, timeout_s: float = 1.0) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            records = await self._db.run(self._read, max_records)
            if records:
                for message in records:
                    self._positions[message.topic] = max(
                        self._positions[message.topic], message.offset + 1
                    )
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self._wait_published(min(remaining, self._poll_interval_s))

    def _read(self, conn: sqlite3.Connection, max_records: int) -> list[Message]:
        out: list[Message] = []
        for topic in self.topics:
            rows = conn.execute(
                "SELECT id, key, value, headers, ts_ms FROM log "
                "WHERE topic = ? AND id >= ? ORDER BY id LIMIT ?",
                (topic, self._positions[topic], max_records - len(out)),
            ).fetchall()
            # Positional: this thread holds the interpreter lock while it builds them.
            out.extend(
                Message(topic, 0, offset, key, value, decode_headers(headers), ts_ms)
                for offset, key, value, headers, ts_ms in rows
            )
            if len(out) >= max_records:
                break
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            await self._db.run(self._commit, dict(offsets))

    def _commit(self, conn: sqlite3.Connection, offsets: dict[TopicPartition, int]) -> None:
        now_ms = int(time.time() * 1000)
        with transaction(conn):
            conn.executemany(
                "INSERT INTO group_offsets (grp, topic, next_offset, seen_ms) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (grp, topic) DO UPDATE SET "
                "next_offset = excluded.next_offset, seen_ms = excluded.seen_ms",
                [(self.group, tp.topic, offset, now_ms) for tp, offset in offsets.items()],
            )

    async def lag(self) -> Mapping[TopicPartition, int]:
        return await self._db.run(self._lag)

    def _lag(self, conn: sqlite3.Connection) -> dict[TopicPartition, int]:
        # The worker asks every PUBRELAY_WORKER__LAG_INTERVAL_S: the group is alive, even
        # stuck on a retry with nothing to commit, and retention keeps its records for it.
        # Only the topics it reads: one it no longer reads (its handler's event types
        # narrowed) is silent, and retention stops keeping its records.
        now_ms = int(time.time() * 1000)
        with transaction(conn):
            conn.executemany(
                "UPDATE group_offsets SET seen_ms = ? WHERE grp = ? AND topic = ?",
                [(now_ms, self.group, topic) for topic in self.topics],
            )
        committed = self._committed(conn)
        out: dict[TopicPartition, int] = {}
        for topic in self.topics:
            (count,) = conn.execute(
                "SELECT count(*) FROM log WHERE topic = ? AND id >= ?",
                (topic, committed[topic]),
            ).fetchone()
            out[TopicPartition(topic, 0)] = int(count)
        return out
