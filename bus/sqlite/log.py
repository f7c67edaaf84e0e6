"""The embedded default bus: an append-only log of topics in one SQLite file.

Durability: WAL journal with ``synchronous=FULL``; ``publish`` returns only after the
transaction holding its record is committed. Concurrent publishes share one commit
(group commit), so throughput does not pay one fsync per request (see
``docs/performance.md``).

Exactly-once answers: a publish that times out is withdrawn if the writer has not yet
claimed it, so a caller told "not stored" finds nothing stored. Only a record whose
commit was already under way when the timeout fired is awaited a little longer.

Retention (``retention_s``): a record older than that is deleted once every consumer
group that reads its topic has committed past it, so nothing unhandled is lost; records
of topics no group reads are deleted by age, except quarantine and dead letters. A pass
starts every ``min(retention_s, 60 s)``; its deletions (:mod:`bus.sqlite.retention`) run
in short transactions of their own between publish batches, so a publish waits for one
small chunk at most, however long the log.

Consumers (:mod:`bus.sqlite.subscription`) are woken by this process's publishes; the
file's tables are in :mod:`bus.sqlite.schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from bus.sqlite.connection import transaction
from bus.sqlite.db import ConnectionThread, create_private_file
from bus.sqlite.retention import DEFAULT_CHUNK_ROWS, MAX_PASS_INTERVAL_S, RetentionPass
from bus.sqlite.schema import SCHEMA, encode_headers
from bus.sqlite.subscription import SqliteSubscription
from bus.types import RevokeCallback, Subscription
from schemas.errors import BusUnavailable
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.sqlite")

_ROWS_PER_INSERT: Final = 100  # 500 parameters, well under SQLite's limit


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO log (topic, key, value, headers, ts_ms) VALUES {values}"  # noqa: S608


_PENDING: Final = 0
_CLAIMED: Final = 1
_WITHDRAWN: Final = 2


@dataclass(slots=True)
class _Entry:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    ts_ms: int
    future: asyncio.Future[None]
    state: int = _PENDING
    timer: asyncio.TimerHandle | None = None


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
        retention_chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.path = path
        self.publish_timeout_s = publish_timeout_s
        self.retention_s = retention_s
        self.retention_chunk_rows = retention_chunk_rows
        self.poll_interval_s = poll_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._db = ConnectionThread("sqlite-bus-writer")
        self._state_lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()
        self._published = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._next_retention = 0.0  # monotonic time the next retention pass starts
        self._retention: RetentionPass | None = None
        self._closing = False

    async def start(self) -> None:
        if self._writer is not None:
            return
        try:
            create_private_file(self.path)
            await self._db.open(self.path, busy_timeout_s=self._busy_timeout_s, schema=SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise BusUnavailable(f"cannot open the embedded bus at {self.path}: {err}") from err
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-bus-writer")

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
        await self._db.close()

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
        # One timer per record rather than wait_for + shield (a task's worth of futures
        # and callbacks per request: docs/performance.md). A caller that is cancelled
        # cancels only its wait: a record the writer takes is still committed.
        entry.timer = loop.call_later(timeout, self._timed_out, entry, timeout)
        try:
            await entry.future
        finally:
            entry.timer.cancel()

    def _timed_out(self, entry: _Entry, timeout: float) -> None:
        """The publish deadline passed: withdraw the record if the writer has not taken
        it; if its commit is under way, that commit decides, within one more timeout."""
        if entry.future.done():
            return
        with self._state_lock:
            withdrawn = entry.state == _PENDING
            if withdrawn:
                entry.state = _WITHDRAWN
        if withdrawn:
            entry.future.set_exception(
                BusUnavailable(f"the embedded bus did not commit within {timeout:.1f}s")
            )
        else:
            loop = entry.future.get_loop()
            entry.timer = loop.call_later(timeout, _stalled, entry)

    async def _write_loop(self) -> None:
        while True:
            if self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
            elif self._closing:
                return
            elif self._retention_due():
                await self._retention_step()  # one short transaction; publishes go first
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._until_retention_s())
                self._wake.clear()

    async def _commit(self, batch: list[_Entry]) -> None:
        try:
            await self._db.run(self._write_batch, batch)
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

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_Entry]) -> None:
        with transaction(conn):
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
                    params += (e.topic, e.key, e.value, encode_headers(e.headers), e.ts_ms)
                conn.execute(_insert_sql(len(chunk)), params)

    # -- retention ------------------------------------------------------------------

    def _retention_due(self) -> bool:
        return self._retention is not None or time.monotonic() >= self._next_retention

    def _until_retention_s(self) -> float:
        return max(0.0, self._next_retention - time.monotonic())

    async def _retention_step(self) -> None:
        if self._retention is None:
            cutoff_ms = int((time.time() - self.retention_s) * 1000)
            self._retention = RetentionPass(cutoff_ms, self.retention_chunk_rows)
        current = self._retention
        try:
            await self._db.run(current.step)
        except Exception as err:  # housekeeping: the next pass tries again
            log.warning("bus_retention_failed", error=str(err), deleted=current.deleted)
            current.topics = []
        if current.done:
            self._retention = None
            self._next_retention = time.monotonic() + min(self.retention_s, MAX_PASS_INTERVAL_S)
            if current.deleted:
                log.info(
                    "bus_retention_pass",
                    deleted=current.deleted,
                    transactions=current.steps - 1,
                    longest_step_ms=round(current.longest_step_s * 1000, 2),
                    duration_ms=round(current.elapsed_s * 1000, 1),
                )

    async def ping(self) -> None:
        if self._writer is None or self._writer.done():
            raise BusUnavailable("the embedded bus is not running")
        try:
            await asyncio.wait_for(self._db.run(_select_one), self.publish_timeout_s)
        except (TimeoutError, sqlite3.Error) as err:
            raise BusUnavailable(f"the embedded bus does not answer: {err!r}") from err

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
        return SqliteSubscription(
            self.path,
            group,
            topics,
            poll_interval_s=self.poll_interval_s,
            wait_published=self.wait_published,
        )

    async def wait_published(self, timeout_s: float) -> None:
        """Return when this process commits new records, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._published.wait(), timeout_s)


def _stalled(entry: _Entry) -> None:
    if not entry.future.done():
        entry.future.set_exception(BusUnavailable("the embedded bus commit is stalled"))


def _select_one(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1").fetchone()
