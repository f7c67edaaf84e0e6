"""The embedded bus's writer: a process of its own (``python -m bus.sqlite.writer``).

It owns the bus file's one write connection (opened as every connection is:
:mod:`bus.sqlite.connection`) and answers :class:`bus.sqlite.log.SqliteBus`'s requests over
a pipe (:mod:`bus.sqlite.pipe`: the framing, the loop, the lifetime, and why a process).
On a thread, its SQLite work and its hand-overs of the interpreter lock were a third of
the intake's time once the HTTP layer no longer hid them (docs/performance.md, "The
webhook's own HTTP layer").

* Requests: :class:`Open` (connect, create the tables), :class:`Append` (records),
  :class:`Retain` (one step of a retention pass), :class:`Ping`.
* **Group commit.** The appends waiting when a transaction starts share it, up to
  :data:`GROUP_MAX_ROWS` records; one transaction's failure fails each append in it.
* Answers: for an append, the records it withdrew (the rest are committed:
  ``synchronous=FULL``); the pass after its step for :class:`Retain`.
* **Deadlines.** Each record comes with its publish's deadline (``time.monotonic()``, one
  clock for every process of the host). The writer waits for SQLite's write lock only
  until the last of them, and leaves out the records whose deadline passed before it held
  the lock: their publishers were told "not stored", and they are not.

It imports the standard library, :mod:`bus.sqlite.pipe`, :mod:`bus.sqlite.connection`,
:mod:`bus.sqlite.retention`, :mod:`bus.sqlite.schema` (with msgspec) and two small
:mod:`schemas` modules only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sqlite3
import time
from pathlib import Path
from typing import Final, NamedTuple

from bus.sqlite import pipe
from bus.sqlite.connection import connect
from bus.sqlite.retention import RetentionPass
from bus.sqlite.schema import SCHEMA, migrate

_ROWS_PER_INSERT: Final = 100  # 500 parameters, well under SQLite's limit

GROUP_MAX_ROWS: Final = 1000
"""Records per transaction at most: the appends waiting when one starts share it."""

Row = tuple[str, bytes | None, bytes, bytes, int]
"""A record as appended: ``(topic, key, value, encoded headers, ts_ms)``."""


class Open(NamedTuple):
    """Connect to ``path`` (created by the parent with mode 0600), create the tables."""

    path: str
    busy_timeout_s: float


class Append(NamedTuple):
    """Commit ``rows`` in one transaction, each unless its deadline (``time.monotonic()``)
    passed before the write lock was held; answers the indexes of those left out."""

    rows: list[Row]
    deadlines: list[float]


class Retain(NamedTuple):
    """Make one step of ``retention``; answers the pass as it is after the step."""

    retention: RetentionPass


class Ping(NamedTuple):
    """Answer once the connection answers a ``SELECT 1``."""


Request = Open | Append | Retain | Ping


@functools.cache
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO log (topic, key, value, headers, ts_ms) VALUES {values}"  # noqa: S608


def append(
    conn: sqlite3.Connection, rows: list[Row], deadlines: list[float], busy_timeout_s: float
) -> list[int]:
    """``rows`` in one transaction (one multi-row statement per chunk), but those whose
    deadline passed before the write lock was held; their indexes."""
    wait_s = max(deadlines, default=0.0) - time.monotonic()
    if wait_s <= 0 or not _begin(conn, min(wait_s, busy_timeout_s), busy_timeout_s):
        return list(range(len(rows)))
    try:
        now = time.monotonic()
        late = [i for i, deadline in enumerate(deadlines) if deadline <= now]
        kept = [row for row, deadline in zip(rows, deadlines, strict=True) if deadline > now]
        for start in range(0, len(kept), _ROWS_PER_INSERT):
            chunk = kept[start : start + _ROWS_PER_INSERT]
            conn.execute(_insert_sql(len(chunk)), [field for row in chunk for field in row])
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return late


def _begin(conn: sqlite3.Connection, wait_s: float, busy_timeout_s: float) -> bool:
    """``BEGIN IMMEDIATE``, waiting at most ``wait_s`` for the write lock; False when it
    stayed busy (the connection's own busy timeout is ``busy_timeout_s`` again after)."""
    conn.execute(f"PRAGMA busy_timeout = {max(1, int(wait_s * 1000))}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        if err.sqlite_errorcode == sqlite3.SQLITE_BUSY:
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    return True


class _Writer:
    def __init__(self, out: pipe.Out) -> None:
        self._out = out
        self._conn: sqlite3.Connection | None = None
        self._busy_timeout_s = 0.0

    def serve(self, requests: list[Request]) -> None:  # pipe.Server
        """Answer ``requests`` in order; consecutive appends share one transaction (up to
        :data:`GROUP_MAX_ROWS` records): the group commit. Each transaction's answers go
        as soon as it is committed."""
        group: list[Append] = []
        rows = 0
        for request in requests:
            if isinstance(request, Append):
                if group and rows + len(request.rows) > GROUP_MAX_ROWS:
                    self._out(b"".join(self._append(group)))
                    group, rows = [], 0
                group.append(request)
                rows += len(request.rows)
                continue
            self._out(b"".join([*self._append(group), self._answer(request)]))
            group, rows = [], 0
        if group:
            self._out(b"".join(self._append(group)))

    def _append(self, group: list[Append]) -> list[bytes]:
        if not group:
            return []
        try:
            late = set(
                append(
                    self._require(),
                    [row for request in group for row in request.rows],
                    [deadline for request in group for deadline in request.deadlines],
                    self._busy_timeout_s,
                )
            )
        except Exception as err:  # the store's error, for every request in the transaction
            return [pipe.answer(False, err) for _ in group]
        answers = []
        start = 0
        for request in group:
            end = start + len(request.rows)
            answers.append(pipe.answer(True, [i - start for i in range(start, end) if i in late]))
            start = end
        return answers

    def _answer(self, request: Open | Retain | Ping) -> bytes:
        try:
            if isinstance(request, Open):
                self._open(request)
                return pipe.answer(True, None)
            conn = self._require()
            if isinstance(request, Retain):
                request.retention.step(conn)
                return pipe.answer(True, request.retention)
            conn.execute("SELECT 1").fetchone()
            return pipe.answer(True, None)
        except Exception as err:  # the store's error, for the parent to raise
            return pipe.answer(False, err)

    def _open(self, request: Open) -> None:
        if self._conn is not None:
            self._conn.close()
        conn = connect(Path(request.path), request.busy_timeout_s)
        try:
            conn.executescript(SCHEMA)
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._busy_timeout_s = request.busy_timeout_s

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the bus's writer was not opened")
        return self._conn


def main() -> None:
    pipe.run_writer(_Writer)


if __name__ == "__main__":
    # Run as this module's own name: requests unpickle into its classes, not __main__'s.
    importlib.import_module("bus.sqlite.writer").main()
