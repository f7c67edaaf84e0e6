"""The idempotency ledger: which ``(handler, event id)`` pairs already had their effect.

The worker asks the ledger before calling a handler and writes to it after the handler's
effect completed. The write is not atomic with the effect: a crash between the two
repeats that one effect once after the restart (at-least-once). Handlers that can should
also pass a natural idempotency key (the event id) to the systems they write to.

Two implementations:

* :class:`SqliteLedger` (default): one file in the data directory, opened like the
  embedded bus's (:mod:`bus.sqlite.db`: WAL journal, ``synchronous=FULL``); concurrent
  completions share one commit (group commit).
* :class:`RedisLedger` (``PUBRELAY_LEDGER__URL=redis://host:port/db``): one key per pair
  with a TTL of the retention, for several worker processes sharing one ledger. Its
  durability is Redis's (enable ``appendonly`` in production).

Entries older than the retention (default 30 days) are forgotten: an event re-delivered
after that is handled again. Errors of the backing store propagate unchanged; the worker
treats any of them as "ledger unavailable" and backs off without calling the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog

from bus.sqlite.db import ConnectionThread, create_private_file, transaction
from handlers.config import LedgerSettings

if TYPE_CHECKING:
    import redis.asyncio

log = structlog.get_logger("pubrelay.handlers.ledger")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger (
    handler TEXT NOT NULL,
    event_id TEXT NOT NULL,
    completed_at REAL NOT NULL,
    PRIMARY KEY (handler, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_completed_at ON ledger (completed_at);
"""

_PURGE_EVERY_S: Final = 3600.0


class Ledger(Protocol):
    """Remembers completed effects per handler."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def is_done(self, handler: str, event_id: str) -> bool:
        """Whether ``handler`` completed its effect for ``event_id`` (within the retention)."""
        ...

    async def mark_done(self, handler: str, event_id: str) -> None:
        """Record the effect as completed; returns once the record is durable."""
        ...


def create_ledger(settings: LedgerSettings, data_dir: Path) -> Ledger:
    """The ledger ``settings.url`` names (SQLite in ``data_dir`` when empty)."""
    url = settings.url
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLedger(
            url,
            retention_s=settings.retention_s,
            key_prefix=settings.redis_key_prefix,
            timeout_s=settings.timeout_s,
        )
    path = Path(url.removeprefix("sqlite:///")) if url else data_dir / "ledger.sqlite3"
    return SqliteLedger(path, retention_s=settings.retention_s, timeout_s=settings.timeout_s)


class _Pending:
    __slots__ = ("completed_at", "event_id", "future", "handler")

    def __init__(self, handler: str, event_id: str, future: asyncio.Future[None]) -> None:
        self.handler = handler
        self.event_id = event_id
        self.completed_at = time.time()
        self.future = future


class SqliteLedger:
    """A :class:`Ledger` in one SQLite file (one row per handler and event id)."""

    def __init__(self, path: Path, *, retention_s: float, timeout_s: float = 5.0) -> None:
        self.path = path
        self.retention_s = retention_s
        self.timeout_s = timeout_s
        self._reader = ConnectionThread("ledger-read")
        self._writer = ConnectionThread("ledger-write")
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._next_purge = 0.0

    async def open(self) -> None:
        if not self._writer.is_open:
            create_private_file(self.path)  # mode 0600: it names customers' events
            await self._writer.open(self.path, busy_timeout_s=self.timeout_s, schema=_SCHEMA)
            await self._reader.open(self.path, busy_timeout_s=self.timeout_s)
            await self.purge()

    async def close(self) -> None:
        # Completions still pending are written before the connections close.
        while self._pending or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush(), name="ledger-flush")
            with contextlib.suppress(Exception):
                await self._flusher
        await self._reader.close()
        await self._writer.close()

    async def is_done(self, handler: str, event_id: str) -> bool:
        cutoff = time.time() - self.retention_s
        return await self._reader.run(_is_done, handler, event_id, cutoff)

    async def mark_done(self, handler: str, event_id: str) -> None:
        entry = _Pending(handler, event_id, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="ledger-flush")
        await asyncio.shield(entry.future)

    async def _flush(self) -> None:
        # Every completion that arrives while a commit (or the purge) runs joins the next
        # commit. The flusher only ends with nothing pending and no await between that check
        # and its end: ``mark_done`` starts a new flusher only once this one is done.
        while True:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._writer.run(_write_batch, batch)
                except Exception as err:  # the store's own errors, handed to each caller
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(err)
                            entry.future.exception()  # retrieved: a cancelled caller won't warn
                else:
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_result(None)
            if time.monotonic() < self._next_purge:
                return
            try:
                await self.purge()
            except Exception as err:  # the purge is housekeeping: retried at the next interval
                log.warning("ledger_purge_failed", error_type=type(err).__name__, error=str(err))

    async def purge(self) -> int:
        """Forget entries older than the retention; return how many were removed."""
        self._next_purge = time.monotonic() + min(_PURGE_EVERY_S, self.retention_s)
        removed = await self._writer.run(_purge, time.time() - self.retention_s)
        if removed:
            log.info("ledger_purged", entries=removed)
        return removed


def _is_done(conn: sqlite3.Connection, handler: str, event_id: str, cutoff: float) -> bool:
    row = conn.execute(
        "SELECT 1 FROM ledger WHERE handler = ? AND event_id = ? AND completed_at >= ?",
        (handler, event_id, cutoff),
    ).fetchone()
    return row is not None


def _write_batch(conn: sqlite3.Connection, batch: list[_Pending]) -> None:
    with transaction(conn):
        conn.executemany(
            "INSERT INTO ledger (handler, event_id, completed_at) VALUES (?, ?, ?) "
            "ON CONFLICT (handler, event_id) "
            "DO UPDATE SET completed_at = excluded.completed_at",
            [(e.handler, e.event_id, e.completed_at) for e in batch],
        )


def _purge(conn: sqlite3.Connection, cutoff: float) -> int:
    return conn.execute("DELETE FROM ledger WHERE completed_at < ?", (cutoff,)).rowcount


class RedisLedger:
    """A :class:`Ledger` in Redis: key ``<prefix><handler>:<event id>``, TTL = retention."""

    def __init__(
        self,
        url: str,
        *,
        retention_s: float,
        key_prefix: str = "pubrelay:ledger:",
        timeout_s: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self.retention_s = retention_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None

    def _key(self, handler: str, event_id: str) -> str:
        return f"{self.key_prefix}{handler}:{event_id}"

    async def open(self) -> None:
        """Create the client; the connection is made on first use (Redis may be down now)."""
        if self._client is None:
            import redis.asyncio as aioredis  # noqa: PLC0415 - only needed with a Redis URL

            # A blocking pool: many lanes share a few connections instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                health_check_interval=30,
            )
            self._client = aioredis.Redis(connection_pool=pool)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose(close_connection_pool=True)

    def _require(self) -> redis.asyncio.Redis:
        assert self._client is not None, "ledger not open"
        return self._client

    async def is_done(self, handler: str, event_id: str) -> bool:
        return bool(await self._require().exists(self._key(handler, event_id)))

    async def mark_done(self, handler: str, event_id: str) -> None:
        ttl_ms = max(1, math.ceil(self.retention_s * 1000))
        await self._require().set(self._key(handler, event_id), str(time.time()), px=ttl_ms)

    async def ping(self) -> None:
        """Raise the client's error when Redis cannot be reached."""
        await self._require().ping()
