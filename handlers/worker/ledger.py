"""The idempotency ledger: which ``(handler, key)`` pairs had their effect, and who is
running one now.

For every attempt the worker first **claims** ``(handler, key)`` (the event id, or for a
``customer.publication.succeeded`` its publication: :mod:`handlers.worker.identity`): one
atomic step in the shared store that answers ``done`` (the effect was completed: a
duplicate), ``held`` (another process holds an unexpired claim: wait) or ``claimed`` (ours,
with the durable count of attempts so far). After the effect it marks the pair done; after a
failed attempt it releases the claim (the attempt stays counted). A claim lives
``claim_ttl_s`` (default 15 s) and the worker renews it while the call runs
(:mod:`handlers.worker.lease`): a holder that died blocks the event that long at most,
and a holder still running past a rebalance keeps the new owner waiting instead of
running the effect a second time. Handlers claim keys of their own the same way (the
e-mail handler claims ``publication:<id>``).

One window remains: a process that dies after the effect and before its "done" is
durable leaves a claim that expires, and the effect runs once more. The window is the
time from the effect landing at its target to the ledger's commit (the answer's way back,
the event loop, one group commit); docs/reliability.md has its measured size.

Two implementations:

* :class:`SqliteLedger` (default): one file in the data directory, opened like the
  embedded bus's (:mod:`bus.sqlite.connection`: WAL journal, ``synchronous=FULL``) and
  written by a process of its own (:mod:`handlers.worker.ledger_writer`); concurrent
  claims, releases and completions share one transaction (group commit, a few statements:
  :mod:`handlers.worker.ledger_sql`), and SQLite's write lock makes each claim atomic
  across the processes sharing the file.
* :class:`RedisLedger` (``PUBRELAY_LEDGER__URL=redis://host:port/db``): a key per
  completed pair (TTL = retention) and a hash per claim, changed by Lua scripts (atomic;
  expiry on the Redis server's clock), for workers on several hosts. Its durability is
  Redis's (enable ``appendonly`` in production).

Entries older than the retention (default 30 days) are forgotten: an event re-delivered
after that is handled again. Errors of the backing store propagate unchanged; the worker
treats any of them as "ledger unavailable" and backs off without calling the handler.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog

from bus.sqlite.db import ConnectionThread, create_private_file
from bus.sqlite.writer_process import WriterExited, WriterProcess
from handlers.config import DEFAULT_CLAIM_TTL_S, LedgerSettings
from handlers.types import Claim
from handlers.worker import ledger_sql
from handlers.worker.ledger_writer import Open, Purge, Write

if TYPE_CHECKING:
    import redis.asyncio

log = structlog.get_logger("pubrelay.handlers.ledger")

_PURGE_EVERY_S: Final = 3600.0


class Ledger(Protocol):
    """Claims and completed effects per handler and key (see the module docstring)."""

    claim_ttl_s: float
    """How long a claim lasts unless renewed (seconds)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def is_done(self, handler: str, event_id: str) -> bool:
        """Whether ``handler`` completed its effect for ``event_id`` (within the retention)."""
        ...

    async def mark_done(self, handler: str, event_id: str) -> None:
        """Record the effect as completed and drop its claim; returns once durable."""
        ...

    async def claim(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> Claim:
        """Take ``key`` for ``token`` (again, when ``token`` already holds it), atomically."""
        ...

    async def renew(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> bool:
        """Extend ``token``'s claim; False when ``token`` no longer holds it."""
        ...

    async def release(
        self, handler: str, key: str, token: str, *, forget_attempts: bool = False
    ) -> None:
        """End ``token``'s claim (no-op when another holds it); the attempts stay counted
        unless ``forget_attempts`` (after a dead letter: a replay starts afresh)."""
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
            claim_ttl_s=settings.claim_ttl_s,
        )
    path = Path(url.removeprefix("sqlite:///")) if url else data_dir / "ledger.sqlite3"
    return SqliteLedger(
        path,
        retention_s=settings.retention_s,
        timeout_s=settings.timeout_s,
        claim_ttl_s=settings.claim_ttl_s,
    )


class _Pending:
    __slots__ = ("future", "op")

    def __init__(self, op: ledger_sql.Op, future: asyncio.Future[Any]) -> None:
        self.op = op
        self.future = future


_REQUEST_MAX_OPS: Final = 64
"""Writes per request to the writer process at most: it groups waiting requests into
transactions of up to ``ledger_writer.GROUP_MAX_OPS`` writes, so a fetch's worth of claims
made in one loop turn commits in a few transactions whose answers come back one by one."""


class SqliteLedger:
    """A :class:`Ledger` in one SQLite file: a row per completed pair, a row per claim.

    Writes are made by a process of its own (:mod:`handlers.worker.ledger_writer`,
    :class:`~bus.sqlite.writer_process.WriterProcess`): the writes of one event loop
    turn are sent together at its end, without waiting for the answers to earlier ones.
    :meth:`is_done` reads on a thread of this process.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_s: float,
        timeout_s: float = 5.0,
        claim_ttl_s: float = DEFAULT_CLAIM_TTL_S,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.timeout_s = timeout_s
        self.claim_ttl_s = claim_ttl_s
        self._reader = ConnectionThread("ledger-read")
        self._writer: WriterProcess | None = None
        self._pending: list[_Pending] = []
        self._next_purge = 0.0

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer process while it runs."""
        return self._writer.pid if self._writer is not None else None

    async def open(self) -> None:
        if self._writer is None:
            create_private_file(self.path)  # mode 0600: it names customers' events
            writer = WriterProcess(
                "handlers.worker.ledger_writer",
                Open(str(self.path), self.timeout_s),
                name="ledger_writer",
                log=log,
                busy_timeout_s=self.timeout_s,
            )
            await writer.start()  # creates the tables; ConfigError without JSON functions
            self._writer = writer
            await self._reader.open(self.path, busy_timeout_s=self.timeout_s)
            await self.purge()

    async def close(self) -> None:
        # Writes still pending are sent, and answered, before the process ends.
        writer, self._writer = self._writer, None
        if writer is not None:
            self._send(writer)
            await writer.close()
        await self._reader.close()

    async def is_done(self, handler: str, event_id: str) -> bool:
        cutoff = time.time() - self.retention_s
        return await self._reader.run(ledger_sql.is_done, handler, event_id, cutoff)

    async def mark_done(self, handler: str, event_id: str) -> None:
        await self._write((ledger_sql.DONE, handler, event_id, "", 0.0))

    async def claim(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> Claim:
        ttl = self.claim_ttl_s if ttl_s is None else ttl_s
        state, attempts, wait_s = await self._write((ledger_sql.CLAIM, handler, key, token, ttl))
        return Claim(state, attempts=attempts, wait_s=wait_s)

    async def renew(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> bool:
        ttl = self.claim_ttl_s if ttl_s is None else ttl_s
        kept: bool = await self._write((ledger_sql.RENEW, handler, key, token, ttl))
        return kept

    async def release(
        self, handler: str, key: str, token: str, *, forget_attempts: bool = False
    ) -> None:
        await self._write((ledger_sql.RELEASE, handler, key, token, float(forget_attempts)))

    def _write(self, op: ledger_sql.Op) -> asyncio.Future[Any]:
        """Queue ``op`` for this loop turn's requests; its answer's future (not a coroutine:
        one frame fewer to resume per write)."""
        if self._writer is None:
            raise WriterExited("the ledger is closed")
        loop = asyncio.get_running_loop()
        entry = _Pending(op, loop.create_future())
        self._pending.append(entry)
        if len(self._pending) == 1:  # the first of this loop turn: send them at its end
            loop.call_soon(self._send, self._writer)
        # A caller cancelled while waiting leaves its write sent: it is made all the same
        # (what ``asyncio.shield`` gave, without a second future per write).
        return entry.future

    def _send(self, writer: WriterProcess) -> None:
        """Send the pending writes (and the purge when it is due)."""
        pending, self._pending = self._pending, []
        groups = [
            pending[start : start + _REQUEST_MAX_OPS]
            for start in range(0, len(pending), _REQUEST_MAX_OPS)
        ]
        answers = writer.send([Write([e.op for e in group], self.retention_s) for group in groups])
        for group, answer in zip(groups, answers, strict=True):
            answer.add_done_callback(functools.partial(_answered, group))
        if pending and time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + min(_PURGE_EVERY_S, self.retention_s)
            writer.request(Purge(time.time() - self.retention_s)).add_done_callback(_purged)

    async def purge(self) -> int:
        """Forget entries older than the retention; return how many were removed."""
        if self._writer is None:
            raise WriterExited("the ledger is closed")
        self._next_purge = time.monotonic() + min(_PURGE_EVERY_S, self.retention_s)
        removed: int = await self._writer.request(Purge(time.time() - self.retention_s))
        if removed:
            log.info("ledger_purged", entries=removed)
        return removed


def _answered(entries: list[_Pending], answer: asyncio.Future[list[Any]]) -> None:
    """Hand a request's answer to each of its writes' callers."""
    if (err := answer.exception()) is not None:  # the store's error, for each caller
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(err)
                entry.future.exception()  # retrieved: a cancelled caller won't warn
        return
    for entry, result in zip(entries, answer.result(), strict=True):
        if not entry.future.done():
            entry.future.set_result(result)


def _purged(answer: asyncio.Future[int]) -> None:
    """The purge is housekeeping: a failure is logged and tried again at the next interval."""
    if (err := answer.exception()) is not None:
        log.warning("ledger_purge_failed", error_type=type(err).__name__, error=str(err))
    elif removed := answer.result():
        log.info("ledger_purged", entries=removed)


# KEYS: the done key, the claim key. ARGV: token, claim ttl ms, retention ms.
# Returns {state, attempts, wait ms}: state 0 done, 1 held, 2 claimed.
_CLAIM_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local c = redis.call('HMGET', KEYS[2], 'token', 'expires_ms', 'attempts')
local attempts = tonumber(c[3]) or 0
if c[1] and c[1] ~= ARGV[1] and tonumber(c[2]) > now then
  return {1, attempts, tonumber(c[2]) - now}
end
attempts = attempts + 1
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'expires_ms', now + tonumber(ARGV[2]),
           'attempts', attempts)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {2, attempts, 0}
"""

# KEYS: the done key, the claim key. ARGV: retention ms, now (seconds, as text).
_DONE_LUA: Final = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: the claim key. ARGV: token, claim ttl ms. Returns 1 when the token holds the claim.
_RENEW_LUA: Final = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'expires_ms', now + tonumber(ARGV[2]))
return 1
"""

# KEYS: the claim key. ARGV: token, "1" to forget the attempts.
_RELEASE_LUA: Final = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then redis.call('DEL', KEYS[1])
else redis.call('HSET', KEYS[1], 'expires_ms', 0) end
return 1
"""

_STATES: Final = ("done", "held", "claimed")


class RedisLedger:
    """A :class:`Ledger` in Redis: ``<prefix><handler>:<key>`` (done, TTL = retention) and
    ``<prefix><handler>:<key>:claim`` (a hash: holder token, expiry, attempts)."""

    def __init__(
        self,
        url: str,
        *,
        retention_s: float,
        key_prefix: str = "pubrelay:ledger:",
        timeout_s: float = 5.0,
        max_connections: int = 16,
        claim_ttl_s: float = DEFAULT_CLAIM_TTL_S,
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self.retention_s = retention_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.claim_ttl_s = claim_ttl_s
        self._retention_ms = max(1, math.ceil(retention_s * 1000))
        self._client: redis.asyncio.Redis | None = None
        self._scripts: dict[str, Any] = {}

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
            self._scripts = {
                "claim": self._client.register_script(_CLAIM_LUA),
                "done": self._client.register_script(_DONE_LUA),
                "release": self._client.register_script(_RELEASE_LUA),
                "renew": self._client.register_script(_RENEW_LUA),
            }

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
        self._require()
        key = self._key(handler, event_id)
        await self._scripts["done"](
            keys=[key, key + ":claim"], args=[self._retention_ms, str(time.time())]
        )

    async def claim(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> Claim:
        self._require()
        ttl_ms = max(1, math.ceil((self.claim_ttl_s if ttl_s is None else ttl_s) * 1000))
        done_key = self._key(handler, key)
        state, attempts, wait_ms = await self._scripts["claim"](
            keys=[done_key, done_key + ":claim"], args=[token, ttl_ms, self._retention_ms]
        )
        return Claim(_STATES[int(state)], attempts=int(attempts), wait_s=int(wait_ms) / 1000)

    async def renew(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> bool:
        self._require()
        ttl_ms = max(1, math.ceil((self.claim_ttl_s if ttl_s is None else ttl_s) * 1000))
        kept = await self._scripts["renew"](
            keys=[self._key(handler, key) + ":claim"], args=[token, ttl_ms]
        )
        return bool(kept)

    async def release(
        self, handler: str, key: str, token: str, *, forget_attempts: bool = False
    ) -> None:
        self._require()
        await self._scripts["release"](
            keys=[self._key(handler, key) + ":claim"], args=[token, "1" if forget_attempts else "0"]
        )

    async def ping(self) -> None:
        """Raise the client's error when Redis cannot be reached."""
        await self._require().ping()
