"""The received-publication store: which publication ids pubrelay took in, beside the ledger.

The worker's recorder (:mod:`handlers.reconcile.recorder`) writes every publication id it
sees, from a webhook or from reconciliation (``origin``); the reconciler reads which of a
page's ids are missing, keeps its watermark here, and holds the runner lease here, so one
reconciliation runs at a time across processes.

* :class:`SqliteReceivedStore` (default): ``reconcile.sqlite3`` in the data directory,
  opened like the ledger (:mod:`bus.sqlite.db`); the lease is a conditional upsert.
* :class:`RedisReceivedStore` (when ``PUBRELAY_LEDGER__URL`` is Redis): one key per id with
  the retention as TTL; the lease is ``SET NX PX``, renewed and released only by its owner.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

from bus.sqlite.connection import transaction
from bus.sqlite.db import ConnectionThread, create_private_file
from handlers.config import LedgerSettings
from handlers.reconcile.config import ReconcileSettings

if TYPE_CHECKING:
    import redis.asyncio

Origin = Literal["webhook", "reconciliation"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS received (
    publication_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    origin TEXT NOT NULL,
    recorded_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_recorded_at ON received (recorded_at);
CREATE TABLE IF NOT EXISTS reconcile_state (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"""
_WATERMARK: Final = "watermark"
_NEWEST_WEBHOOK: Final = "newest_webhook"
_LEASE: Final = "lease"
_PURGE_EVERY_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class Received:
    publication_id: str
    created_at: float
    """The publication's creation time (epoch seconds); 0 when the event lacked it."""
    origin: Origin


class ReceivedStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def record(self, entries: Sequence[Received]) -> None:
        """Remember the ids (a second record of an id keeps the first origin)."""
        ...

    async def missing(self, publication_ids: Collection[str]) -> set[str]:
        """The ids among ``publication_ids`` never recorded (within the retention)."""
        ...

    async def watermark(self) -> float | None:
        """The creation time of the newest publication a finished run reconciled."""
        ...

    async def set_watermark(self, created_at: float) -> None: ...

    async def newest_webhook(self) -> float:
        """The creation time of the newest publication that came by webhook; before the
        first came, the time this was first asked (none came since). Without that, an
        installation no webhook had reached yet read as silent since 1970."""
        ...

    async def acquire_lease(self, owner: str, ttl_s: float) -> bool:
        """Take the runner lease unless another owner holds it unexpired; renew it if ours."""
        ...

    async def release_lease(self, owner: str) -> None: ...


def create_store(
    ledger: LedgerSettings, settings: ReconcileSettings, data_dir: Path
) -> ReceivedStore:
    """The store beside the ledger ``ledger.url`` names."""
    if ledger.url.startswith(("redis://", "rediss://", "unix://")):
        return RedisReceivedStore(
            ledger.url,
            retention_s=settings.retention_s,
            key_prefix=settings.redis_key_prefix,
            timeout_s=ledger.timeout_s,
        )
    base = Path(ledger.url.removeprefix("sqlite:///")).parent if ledger.url else data_dir
    return SqliteReceivedStore(
        base / "reconcile.sqlite3", retention_s=settings.retention_s, timeout_s=ledger.timeout_s
    )


class SqliteReceivedStore:
    def __init__(self, path: Path, *, retention_s: float, timeout_s: float = 5.0) -> None:
        self.path = path
        self.retention_s = retention_s
        self.timeout_s = timeout_s
        self._conn = ConnectionThread("reconcile-store")
        self._next_purge = 0.0

    async def open(self) -> None:
        if not self._conn.is_open:
            create_private_file(self.path)  # mode 0600: it names customers' publications
            await self._conn.open(self.path, busy_timeout_s=self.timeout_s, schema=_SCHEMA)
            await self.purge()

    async def close(self) -> None:
        await self._conn.close()

    async def record(self, entries: Sequence[Received]) -> None:
        if entries:
            await self._conn.run(_record, entries, time.time())
        if time.monotonic() >= self._next_purge:
            await self.purge()

    async def purge(self) -> None:
        """Forget ids recorded longer ago than the retention (at open, then hourly)."""
        self._next_purge = time.monotonic() + _PURGE_EVERY_S
        await self._conn.run(_purge, time.time() - self.retention_s)

    async def missing(self, publication_ids: Collection[str]) -> set[str]:
        found = await self._conn.run(_found, list(publication_ids))
        return set(publication_ids) - found

    async def watermark(self) -> float | None:
        return await self._conn.run(_state, _WATERMARK)

    async def set_watermark(self, created_at: float) -> None:
        await self._conn.run(_set_state, _WATERMARK, created_at)

    async def newest_webhook(self) -> float:
        return await self._conn.run(_newest_webhook, time.time())

    async def acquire_lease(self, owner: str, ttl_s: float) -> bool:
        return await self._conn.run(_acquire, owner, time.time(), ttl_s)

    async def release_lease(self, owner: str) -> None:
        await self._conn.run(_release, owner)


def _record(conn: sqlite3.Connection, entries: Sequence[Received], now: float) -> None:
    newest = _newest_by_webhook(entries, now)
    with transaction(conn):
        conn.executemany(
            "INSERT INTO received (publication_id, created_at, origin, recorded_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (publication_id) DO NOTHING",
            [(e.publication_id, e.created_at, e.origin, now) for e in entries],
        )
        if newest is not None:
            conn.execute(
                "INSERT INTO reconcile_state (name, value) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET value = excluded.value WHERE excluded.value > value",
                (_NEWEST_WEBHOOK, newest),
            )


def _newest_by_webhook(entries: Sequence[Received], now: float) -> float | None:
    """The newest creation time among the webhook's entries; one that lacked it counts as
    created now (it proves the webhook alive, and 0 would read as silent since 1970)."""
    return max((e.created_at or now for e in entries if e.origin == "webhook"), default=None)


def _newest_webhook(conn: sqlite3.Connection, now: float) -> float:
    with transaction(conn):
        conn.execute(
            "INSERT INTO reconcile_state (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (_NEWEST_WEBHOOK, now),
        )
    newest = _state(conn, _NEWEST_WEBHOOK)
    assert newest is not None  # written above
    return newest


def _found(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT publication_id FROM received WHERE publication_id IN ({marks})",  # noqa: S608 - only placeholders
            chunk,
        )
        found.update(row[0] for row in rows)
    return found


def _state(conn: sqlite3.Connection, name: str) -> float | None:
    row = conn.execute("SELECT value FROM reconcile_state WHERE name = ?", (name,)).fetchone()
    return float(row[0]) if row is not None else None


def _set_state(conn: sqlite3.Connection, name: str, value: float) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO reconcile_state (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )


def _acquire(conn: sqlite3.Connection, owner: str, now: float, ttl_s: float) -> bool:
    with transaction(conn):
        changed = conn.execute(
            "INSERT INTO reconcile_state (name, value, owner) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, owner = excluded.owner "
            "WHERE reconcile_state.value < ? OR reconcile_state.owner = excluded.owner",
            (_LEASE, now + ttl_s, owner, now),
        ).rowcount
    return changed == 1


def _release(conn: sqlite3.Connection, owner: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM reconcile_state WHERE name = ? AND owner = ?", (_LEASE, owner))


def _purge(conn: sqlite3.Connection, cutoff: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM received WHERE recorded_at < ?", (cutoff,))


# Only the owner renews or deletes the lease: compare and act in one step on the server.
_RENEW: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_SET_IF_NEWER: Final = """
local current = tonumber(redis.call('get', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > current then redis.call('set', KEYS[1], ARGV[1]) end
return 0
"""


class RedisReceivedStore:
    """Keys ``<prefix>received:<id>`` (TTL = retention), ``<prefix>watermark``,
    ``<prefix>newest_webhook`` and ``<prefix>lease``."""

    def __init__(
        self, url: str, *, retention_s: float, key_prefix: str, timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.retention_s = retention_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None

    async def open(self) -> None:
        if self._client is None:
            import redis.asyncio as aioredis  # noqa: PLC0415 - only needed with a Redis URL

            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                decode_responses=True,
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose(close_connection_pool=True)

    def _require(self) -> redis.asyncio.Redis:
        assert self._client is not None, "store not open"
        return self._client

    async def record(self, entries: Sequence[Received]) -> None:
        if not entries:
            return
        ttl_ms = max(1, math.ceil(self.retention_s * 1000))
        async with self._require().pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.set(
                    f"{self.key_prefix}received:{e.publication_id}",
                    f"{e.origin} {e.created_at}",
                    px=ttl_ms,
                    nx=True,
                )
            newest = _newest_by_webhook(entries, time.time())
            if newest is not None:
                pipe.eval(_SET_IF_NEWER, 1, self.key_prefix + _NEWEST_WEBHOOK, str(newest))
            await pipe.execute()

    async def missing(self, publication_ids: Collection[str]) -> set[str]:
        ids = list(publication_ids)
        if not ids:
            return set()
        values = await self._require().mget([f"{self.key_prefix}received:{i}" for i in ids])
        return {i for i, value in zip(ids, values, strict=True) if value is None}

    async def _float(self, name: str) -> float | None:
        value = await self._require().get(self.key_prefix + name)
        return float(value) if value is not None else None

    async def watermark(self) -> float | None:
        return await self._float(_WATERMARK)

    async def set_watermark(self, created_at: float) -> None:
        await self._require().set(self.key_prefix + _WATERMARK, str(created_at))

    async def newest_webhook(self) -> float:
        client, key = self._require(), self.key_prefix + _NEWEST_WEBHOOK
        await client.set(key, repr(time.time()), nx=True)
        value = await client.get(key)
        return float(value) if value is not None else time.time()

    async def acquire_lease(self, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        done = await self._require().eval(_RENEW, 1, self.key_prefix + _LEASE, owner, ttl_ms)
        return bool(done)

    async def release_lease(self, owner: str) -> None:
        await self._require().eval(_RELEASE, 1, self.key_prefix + _LEASE, owner)
