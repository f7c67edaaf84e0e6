"""The event index in one SQLite file beside the ledger (``pubrelay/console/index.py``).

Tables: ``events`` (one row per event id, with its search fields and body), ``terms``
(every searchable value, lower-cased, to its event id), ``deliveries``, ``attempts``,
``handler_state`` (each handler's latest outcome per event), and ``ended_sessions`` (the
console sessions logged out, until they would have expired). Written in one transaction
per batch with ``synchronous=NORMAL`` (a view, not a record); purged every so often.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bus.sqlite.connection import transaction
from bus.sqlite.db import ConnectionThread, create_private_file
from pubrelay.console.fields import EventFields
from pubrelay.console.index import (
    MAX_STORED_BODY_BYTES,
    Attempt,
    Batch,
    Counts,
    Delivery,
    EventRow,
    Timeline,
)

_PURGE_EVERY_S: Final = 3600.0
_ROWS_PER_STATEMENT: Final = 500

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    received_at REAL NOT NULL,
    customer_id TEXT NOT NULL,
    customer_email TEXT NOT NULL,
    publication_id TEXT NOT NULL,
    voucher_code TEXT NOT NULL,
    campaign TEXT NOT NULL,
    channel TEXT NOT NULL,
    body BLOB NOT NULL,
    body_truncated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS terms (
    term TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (term, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS terms_event_id ON terms (event_id);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    at REAL NOT NULL,
    topic TEXT NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_event_id ON deliveries (event_id);
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries (at);
CREATE TABLE IF NOT EXISTS attempts (
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_event_id ON attempts (event_id);
CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at);
CREATE TABLE IF NOT EXISTS handler_state (
    handler TEXT NOT NULL,
    event_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (handler, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS handler_state_outcome ON handler_state (handler, outcome, at);
CREATE TABLE IF NOT EXISTS ended_sessions (
    session_id TEXT PRIMARY KEY,
    expiry REAL NOT NULL
) WITHOUT ROWID;
"""


class SqliteEventIndex:
    """The index in one SQLite file (created mode 0600: it holds customers' data)."""

    def __init__(self, path: Path, *, retention_s: float, timeout_s: float = 5.0) -> None:
        self.path = path
        self.retention_s = retention_s
        self.timeout_s = timeout_s
        self._conn = ConnectionThread("event-index")
        self._next_purge = 0.0

    async def open(self) -> None:
        if not self._conn.is_open:
            create_private_file(self.path)
            await self._conn.open(self.path, busy_timeout_s=self.timeout_s, schema=_SCHEMA)
            # A view, not a record: no fsync per batch competing with the bus's commits (a
            # power cut may lose the last batches; WAL keeps the file consistent).
            await self._conn.run(lambda conn: conn.execute("PRAGMA synchronous=NORMAL"))

    async def close(self) -> None:
        await self._conn.close()

    async def write(self, batch: Batch) -> None:
        """Write one batch in one transaction; purge past the retention now and then."""
        await self._conn.run(_write, batch)
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + min(_PURGE_EVERY_S, self.retention_s)
            await self._conn.run(_purge, time.time() - self.retention_s)

    async def search(self, query: str, *, limit: int = 50) -> list[EventRow]:
        """Events whose id is ``query``, or whose delivery id, publication id, customer id
        or e-mail or voucher code is ``query`` in any case, newest first."""
        return await self._conn.run(_search, query.strip(), limit)

    async def recent(self, *, limit: int = 50) -> list[EventRow]:
        return await self._conn.run(_recent, limit)

    async def timeline(self, event_id: str) -> Timeline | None:
        return await self._conn.run(_timeline, event_id)

    async def counts(self, since: float) -> Counts:
        return await self._conn.run(_counts, since)

    async def series(self, since: float, buckets: int) -> dict[str, list[int]]:
        """Intake outcomes per bucket of equal width from ``since`` to now."""
        return await self._conn.run(_series, since, time.time(), buckets)

    async def end_session(self, session_id: str, expiry: float) -> None:
        await self._conn.run(_end_session, session_id, expiry, time.time())

    async def session_ended(self, session_id: str) -> bool:
        return await self._conn.run(_session_ended, session_id, time.time())


def _end_session(conn: sqlite3.Connection, session_id: str, expiry: float, now: float) -> None:
    """Remember one logout; let go of those past their expiry (a few per operator)."""
    with transaction(conn):
        conn.execute("DELETE FROM ended_sessions WHERE expiry <= ?", (now,))
        conn.execute(
            "INSERT OR REPLACE INTO ended_sessions (session_id, expiry) VALUES (?, ?)",
            (session_id, expiry),
        )


def _session_ended(conn: sqlite3.Connection, session_id: str, now: float) -> bool:
    found = conn.execute(
        "SELECT 1 FROM ended_sessions WHERE session_id = ? AND expiry > ?", (session_id, now)
    )
    return found.fetchone() is not None


def _insert(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]]) -> None:
    """``head`` (``INSERT ... INTO table``) for ``rows``, many rows per statement.

    One statement per ``_ROWS_PER_STATEMENT`` rows rather than one per row: each statement
    hands the GIL to the event loop and back once, not once per row (the intake measured
    a third more CPU per request with one-row statements under load).
    """
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        values = ",".join([one] * len(chunk))
        params = [value for row in chunk for value in row]
        conn.execute(f"{head} VALUES {values}", params)  # placeholders only: values are bound


def _write(conn: sqlite3.Connection, batch: Batch) -> None:
    events = []
    terms: list[tuple[str, str]] = []
    for e in batch.events:
        f = e.fields
        body = e.body[:MAX_STORED_BODY_BYTES]
        events.append((e.event_id, e.event_type, e.received_at, f.customer_id, f.customer_email,
                       f.publication_id, f.voucher_code, f.campaign, f.channel, body,
                       int(len(body) < len(e.body))))  # fmt: skip
        terms += [(t, e.event_id) for t in e.terms]
    deliveries = [
        (d.event_id, d.delivery_id, d.at, d.topic, d.status, d.outcome) for d in batch.deliveries
    ]
    # A delivery's id leads to its event once the event is stored (the terms go with the
    # event when the retention purges it).
    terms += [
        (d.delivery_id.lower(), d.event_id)
        for d in batch.deliveries
        if d.delivery_id and d.event_id and d.status < 300
    ]
    attempts = [
        (a.event_id, a.handler, a.at, a.attempt, a.outcome, a.detail, a.topic, a.partition,
         a.offset)
        for a in batch.attempts
    ]  # fmt: skip
    states = {
        (a.handler, a.event_id): (a.handler, a.event_id, a.outcome, a.at) for a in batch.attempts
    }
    with transaction(conn):
        # Columns named: a file a later version gave more columns is still written.
        _insert(
            conn,
            "INSERT OR IGNORE INTO events (event_id, event_type, received_at, customer_id, "
            "customer_email, publication_id, voucher_code, campaign, channel, body, "
            "body_truncated)",
            events,
        )
        _insert(conn, "INSERT OR IGNORE INTO terms (term, event_id)", list(dict.fromkeys(terms)))
        _insert(
            conn,
            "INSERT INTO deliveries (event_id, delivery_id, at, topic, status, outcome)",
            deliveries,
        )
        _insert(
            conn,
            "INSERT INTO attempts (event_id, handler, at, attempt, outcome, detail, topic, "
            'partition, "offset")',
            attempts,
        )
        _insert(
            conn,
            "INSERT OR REPLACE INTO handler_state (handler, event_id, outcome, at)",
            list(states.values()),
        )


def _purge(conn: sqlite3.Connection, cutoff: float) -> None:
    with transaction(conn):
        conn.execute(
            "DELETE FROM terms WHERE event_id IN "
            "(SELECT event_id FROM events WHERE received_at < ?)",
            (cutoff,),
        )
        conn.execute("DELETE FROM events WHERE received_at < ?", (cutoff,))
        conn.execute("DELETE FROM deliveries WHERE at < ?", (cutoff,))
        conn.execute("DELETE FROM attempts WHERE at < ?", (cutoff,))
        conn.execute("DELETE FROM handler_state WHERE at < ?", (cutoff,))


_SELECT_EVENTS: Final = (
    "SELECT event_id, event_type, received_at, customer_id, customer_email, publication_id, "
    "voucher_code, campaign, channel FROM events "
)


def _rows(conn: sqlite3.Connection, clauses: str, params: Sequence[object]) -> list[EventRow]:
    """The events ``_SELECT_EVENTS`` + ``clauses`` (constant SQL; values as parameters)."""
    rows = conn.execute(_SELECT_EVENTS + clauses, params).fetchall()
    found = [EventRow(r[0], r[1], r[2], EventFields(*r[3:9])) for r in rows]
    for row in found:
        states = conn.execute(
            "SELECT handler, outcome FROM handler_state WHERE event_id = ? ORDER BY handler",
            (row.event_id,),
        )
        row.handlers = dict(states.fetchall())
    return found


def _search(conn: sqlite3.Connection, query: str, limit: int) -> list[EventRow]:
    """The event whose id is ``query``, and those with the term ``query`` lower-cased."""
    where = "WHERE event_id IN (SELECT ? UNION SELECT event_id FROM terms WHERE term = ?) "
    params = (query, query.lower(), limit)
    return _rows(conn, where + "ORDER BY received_at DESC LIMIT ?", params)


def _recent(conn: sqlite3.Connection, limit: int) -> list[EventRow]:
    return _rows(conn, "ORDER BY received_at DESC LIMIT ?", (limit,))


def _timeline(conn: sqlite3.Connection, event_id: str) -> Timeline | None:
    found = _rows(conn, "WHERE event_id = ?", (event_id,))
    if not found:
        return None
    event = found[0]
    body = conn.execute(
        "SELECT body, body_truncated FROM events WHERE event_id = ?", (event_id,)
    ).fetchone()
    event.body, event.body_truncated = bytes(body[0]), bool(body[1])
    deliveries = [
        Delivery(*r)
        for r in conn.execute(
            "SELECT event_id, delivery_id, at, topic, status, outcome FROM deliveries "
            "WHERE event_id = ? ORDER BY at",
            (event_id,),
        ).fetchall()
    ]
    attempts = [
        Attempt(*r)
        for r in conn.execute(
            'SELECT event_id, handler, at, attempt, outcome, detail, topic, partition, "offset" '
            "FROM attempts WHERE event_id = ? ORDER BY at, rowid",
            (event_id,),
        ).fetchall()
    ]
    return Timeline(event, deliveries, attempts)


def _counts(conn: sqlite3.Connection, since: float) -> Counts:
    intake = dict(
        conn.execute(
            "SELECT outcome, count(*) FROM deliveries WHERE at >= ? GROUP BY outcome", (since,)
        ).fetchall()
    )
    handlers: dict[str, dict[str, int]] = {}
    for handler, outcome, n in conn.execute(
        "SELECT handler, outcome, count(*) FROM handler_state WHERE at >= ? "
        "GROUP BY handler, outcome",
        (since,),
    ):
        handlers.setdefault(handler, {})[outcome] = n
    oldest = dict(
        conn.execute(
            "SELECT handler, min(at) FROM handler_state WHERE outcome = 'retrying' GROUP BY handler"
        ).fetchall()
    )
    return Counts(intake, handlers, oldest)


def _series(
    conn: sqlite3.Connection, since: float, now: float, buckets: int
) -> dict[str, list[int]]:
    width = max(1e-3, (now - since) / buckets)
    out: dict[str, list[int]] = {}
    for outcome, bucket, n in conn.execute(
        "SELECT outcome, CAST((at - ?) / ? AS INTEGER) AS b, count(*) FROM deliveries "
        "WHERE at >= ? GROUP BY outcome, b",
        (since, width, since),
    ):
        out.setdefault(outcome, [0] * buckets)[min(int(bucket), buckets - 1)] += n
    return out
