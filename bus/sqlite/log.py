"""The embedded default bus: an append-only log of topics in one SQLite file.

Durability: WAL journal with ``synchronous=FULL``; ``publish`` returns only after the
transaction holding its record is committed. Concurrent publishes share one commit
(group commit), so throughput does not pay one fsync per request (see
``docs/performance.md``).

The writes are made by a process of the bus's own (:mod:`bus.sqlite.writer`): each event
loop turn's records are sent as one batch without waiting for earlier batches' answers (at
most :data:`_MAX_IN_FLIGHT` of them); the process commits the batches waiting when a
transaction starts together.

Exactly-once answers: a publish that times out is withdrawn if the writer has not yet
claimed it, so a caller told "not stored" finds nothing stored. Only a record whose
commit was already under way when the timeout fired is awaited a little longer. The one
exception is the writer process dying (killed) during a commit: the records of that batch
are answered "not stored" (``BusUnavailable``) although the commit may have landed, so the
sender's retry stores them a second time, and the worker's ledger makes the second one a
duplicate; the next batch starts a new process.

Retention (``retention_s``): a record older than that is deleted once every consumer
group that reads its topic, and was seen within it, has committed past it; records of
topics no group reads are deleted by age, except quarantine and dead letters (by age
only past ``kept_topics_retention_s``, when set). A pass starts every
``min(retention_s, kept_topics_retention_s, 60 s)``; its deletions
(:mod:`bus.sqlite.retention`) run in short transactions of their own between publish
batches, so a publish waits for one small chunk at most, however long the log.

Consumers (:mod:`bus.sqlite.subscription`) are woken by this process's publishes; the
file's tables are in :mod:`bus.sqlite.schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from bus.deadlines import Deadlines
from bus.sqlite.db import create_private_file
from bus.sqlite.retention import DEFAULT_CHUNK_ROWS, MAX_PASS_INTERVAL_S, RetentionPass
from bus.sqlite.schema import encode_headers
from bus.sqlite.subscription import SqliteSubscription
from bus.sqlite.writer import Append, Open, Ping, Retain
from bus.sqlite.writer_process import WriterProcess
from bus.types import UNREADY_AFTER_FAILED_PUBLISH_S, RevokeCallback, Subscription
from schemas.errors import BusUnavailable
from schemas.record import Headers

log = structlog.get_logger("pubrelay.bus.sqlite")

_BATCH_RECORDS: Final = 8
"""Records sent as soon as this many wait, without waiting for the end of the loop turn."""

_MAX_IN_FLIGHT: Final = 16
"""Batches sent to the writer process and not yet answered, at most: the records of the
next loop turns go while earlier ones commit (the process groups those waiting)."""

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
    deadline: float  # time.monotonic(): the writer process leaves the record out after it
    timeout: float
    state: int = _PENDING
    timer: asyncio.TimerHandle | None = None  # only once the writer is late (stalled)


class SqliteBus:
    """A :class:`bus.types.Bus` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        publish_timeout_s: float = 5.0,
        retention_s: float = 7 * 24 * 3600,
        kept_topics_retention_s: float | None = None,
        poll_interval_s: float = 0.5,
        busy_timeout_s: float = 30.0,
        retention_chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        self.path = path
        self.publish_timeout_s = publish_timeout_s
        self.retention_s = retention_s
        self.kept_topics_retention_s = kept_topics_retention_s
        self.retention_chunk_rows = retention_chunk_rows
        self.poll_interval_s = poll_interval_s
        self._busy_timeout_s = busy_timeout_s
        self._process: WriterProcess | None = None
        self._pending: list[_Entry] = []
        self._flush_soon = False  # a send of _pending is due at the end of this loop turn
        self._published = asyncio.Event()
        self._retainer: asyncio.Task[None] | None = None  # runs from start to close
        self._in_flight: set[asyncio.Future[list[int]]] = set()
        self._deadlines = Deadlines[_Entry](self._timed_out)
        self._next_retention = 0.0  # monotonic time the next retention pass starts
        self._retention: RetentionPass | None = None
        self._warned_silent: set[tuple[str, str]] = set()  # (group, topic)
        self._closing = False
        self._commit_failed: tuple[float, str] | None = None  # (monotonic time, error)
        # The loop it was started on, looked up once: on Python 3.11 each
        # get_running_loop() is a getpid() system call (docs/performance.md).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer process while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        if self._retainer is not None:
            return
        process = WriterProcess(
            "bus.sqlite.writer",
            Open(str(self.path), self._busy_timeout_s),
            name="bus_writer",
            log=log,
            busy_timeout_s=self._busy_timeout_s,
        )
        try:
            create_private_file(self.path)
            await process.start()
        except (OSError, sqlite3.Error) as err:
            raise BusUnavailable(f"cannot open the embedded bus at {self.path}: {err}") from err
        self._process = process
        self._loop = asyncio.get_running_loop()
        self._retainer = asyncio.create_task(self._retention_loop(), name="sqlite-bus-retention")

    async def close(self) -> None:
        if self._retainer is not None:
            # Refuse new records, let the writer commit what it already accepted (bounded):
            # the records still waiting after that were not sent, and their deadlines
            # answer them "not stored".
            self._closing = True
            self._retainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retainer
            self._retainer = None
            deadline = time.monotonic() + self.publish_timeout_s
            self._send_pending()
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait(set(self._in_flight), timeout=left)
        if self._process is not None:
            process, self._process = self._process, None
            await process.close()
        self._loop = None

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
        # A caller that is cancelled cancels only its wait: a record the writer takes is
        # still committed.
        await self.submit(topic, value, key=key, headers=headers, timeout_s=timeout_s)

    def submit(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timeout_s: float | None = None,
    ) -> asyncio.Future[None]:
        """:meth:`publish` without a coroutine (:class:`bus.types.SubmittingBus`)."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._retainer is None or self._closing:
            _fail(future, BusUnavailable("the embedded bus is not started"))
            return future
        timeout = self.publish_timeout_s if timeout_s is None else timeout_s
        entry = _Entry(
            topic,
            key,
            value,
            headers,
            int(time.time() * 1000),
            future,
            time.monotonic() + timeout,
            timeout,
        )
        self._pending.append(entry)
        if len(self._pending) >= _BATCH_RECORDS:
            self._send_pending()  # sent now: commits overlap the loop's next requests
        elif not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        self._deadlines.add(entry)
        return future

    def _flush(self) -> None:
        """The end of the loop turn: its records go."""
        self._flush_soon = False
        self._send_pending()

    def _send_pending(self) -> None:
        """Send the records waiting, unless :data:`_MAX_IN_FLIGHT` batches wait for their
        answer (then the first answer sends them)."""
        if self._pending and len(self._in_flight) < _MAX_IN_FLIGHT:
            batch, self._pending = self._pending, []
            self._commit(batch)

    def _timed_out(self, entry: _Entry) -> None:
        """The publish deadline passed: withdraw the record if it was not sent to the writer
        yet; if it was, the writer's answer decides (it leaves out a record whose deadline
        passed before it held the write lock), within one more timeout."""
        if entry.future.done():
            return
        if entry.state == _PENDING:
            entry.state = _WITHDRAWN
            _fail(
                entry.future,
                BusUnavailable(f"the embedded bus did not commit within {entry.timeout:.1f}s"),
            )
        else:
            loop = entry.future.get_loop()
            stalled = BusUnavailable("the embedded bus commit is stalled")
            entry.timer = loop.call_later(entry.timeout, _fail, entry.future, stalled)

    def _commit(self, batch: list[_Entry]) -> None:
        """Send ``batch`` to the writer process; its answer settles the publishes."""
        live = [e for e in batch if e.state == _PENDING]  # not withdrawn meanwhile
        if not live:
            return
        for entry in live:
            entry.state = _CLAIMED
        rows = [(e.topic, e.key, e.value, encode_headers(e.headers), e.ts_ms) for e in live]
        if self._process is None:
            self._settle(live, None, BusUnavailable("the embedded bus is closed"))
            return
        answer = self._process.request(Append(rows, [e.deadline for e in live]))
        self._in_flight.add(answer)
        answer.add_done_callback(functools.partial(self._answered, live))

    def _answered(self, live: list[_Entry], answer: asyncio.Future[list[int]]) -> None:
        self._in_flight.discard(answer)
        self._send_pending()  # a batch waiting for room goes now
        err = asyncio.CancelledError() if answer.cancelled() else answer.exception()
        if err is not None:
            log.warning("bus_write_failed", error=str(err), records=len(live))
            if not isinstance(err, asyncio.CancelledError):  # closing: not the file's fault
                self._commit_failed = (time.monotonic(), str(err))
            self._settle(live, None, BusUnavailable(f"the embedded bus could not commit: {err}"))
        else:
            self._commit_failed = None
            self._settle(live, answer.result(), None)

    def _settle(
        self, live: list[_Entry], late: list[int] | None, failure: BusUnavailable | None
    ) -> None:
        if failure is not None:
            for entry in live:
                _fail(entry.future, failure)
        else:
            for i in late or ():
                live[i].state = _WITHDRAWN
                _fail(live[i].future, BusUnavailable("the embedded bus did not commit in time"))
            for entry in live:
                if entry.state == _CLAIMED and not entry.future.done():
                    entry.future.set_result(None)
            self._published.set()
            self._published = asyncio.Event()
        for entry in live:  # answered: a stalled commit's timer has nothing left to do
            if entry.timer is not None:
                entry.timer.cancel()
        self._deadlines.settled()

    # -- retention ------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        """A retention pass every ``min(retention_s, kept_topics_retention_s, 60 s)``, one
        short step at a time: the records sent during a step are committed before the
        next one starts."""
        while True:
            if self._retention is None:
                await asyncio.sleep(max(0.0, self._next_retention - time.monotonic()))
            await self._retention_step()

    async def _retention_step(self) -> None:
        if self._retention is None:
            now = time.time()
            cutoff_ms = int((now - self.retention_s) * 1000)
            kept = self.kept_topics_retention_s
            kept_cutoff_ms = None if kept is None else int((now - kept) * 1000)
            self._retention = RetentionPass(
                cutoff_ms, self.retention_chunk_rows, kept_cutoff_ms=kept_cutoff_ms
            )
        current = self._retention
        try:
            assert self._process is not None
            current = self._retention = await self._process.request(Retain(current))
        except Exception as err:  # housekeeping: the next pass tries again
            log.warning("bus_retention_failed", error=str(err), deleted=current.deleted)
            current.topics = []
        if current.done:
            for (group, topic), records in current.passed_over.items():
                # A warning once per group and topic: a handler disabled for good would
                # otherwise warn at every pass, as its records keep expiring.
                warned = (group, topic) in self._warned_silent
                self._warned_silent.add((group, topic))
                (log.info if warned else log.warning)(
                    "bus_retention_passed_silent_group",
                    group=group,
                    topic=topic,
                    records=records,
                    reason=f"not seen for over PUBRELAY_BUS__RETENTION_S ({self.retention_s:g} s)",
                )
            self._retention = None
            shortest = min(self.retention_s, self.kept_topics_retention_s or self.retention_s)
            self._next_retention = time.monotonic() + min(shortest, MAX_PASS_INTERVAL_S)
            if current.deleted:
                log.info(
                    "bus_retention_pass",
                    deleted=current.deleted,
                    transactions=current.steps - 1,
                    longest_step_ms=round(current.longest_step_s * 1000, 2),
                    duration_ms=round(current.elapsed_s * 1000, 1),
                )

    async def ping(self) -> None:
        if self._retainer is None or self._retainer.done() or self._process is None:
            raise BusUnavailable("the embedded bus is not running")
        if self._commit_failed is not None:
            at, error = self._commit_failed
            if (ago := time.monotonic() - at) < UNREADY_AFTER_FAILED_PUBLISH_S:
                raise BusUnavailable(
                    f"the embedded bus's last commit failed {ago:.0f}s ago: {error}"
                )
        try:
            await asyncio.wait_for(self._process.request(Ping()), self.publish_timeout_s)
        except (TimeoutError, OSError, sqlite3.Error) as err:
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


def _fail(future: asyncio.Future[None], error: BusUnavailable) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved here so an abandoned future does not warn
