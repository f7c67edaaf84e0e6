"""How every SQLite connection of pubrelay is opened, and its write transactions.

WAL journal with ``synchronous=FULL`` (a commit is on disk when it returns), a busy timeout
for waiting on another writer, and autocommit mode so transactions are explicit. Several
processes may open a new file at the same moment (two workers sharing a ledger): switching
its journal to WAL is tried again until the busy timeout passes (:func:`_enter_wal`).
Writes go in ``BEGIN IMMEDIATE`` transactions (:func:`transaction`): the write lock is
taken up front, and any failure rolls the whole transaction back.

The standard library only, for the writer processes (:mod:`bus.sqlite.writer`,
:mod:`handlers.worker.ledger_writer`).
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

_WAL_RETRY_MAX_S = 0.05
"""The longest pause between two tries of the WAL switch (they start 1 ms apart)."""


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode with ``synchronous=FULL``, usable from any one thread.

    A failure names the file, and says so when its file system is full: SQLite itself
    answers a full disk at this point with a bare "disk I/O error" (it cannot create the
    ``-shm`` file)."""
    try:
        conn = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as err:
        raise _named(err, path) from err
    try:
        _enter_wal(conn, busy_timeout_s)
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as err:
        conn.close()
        raise _named(err, path) from err
    except BaseException:
        conn.close()
        raise
    return conn


_NO_ROOM_BYTES = 1 << 20
"""Less free space than this on a file system is called "no room left" in an error."""


def _named(err: sqlite3.Error, path: Path) -> sqlite3.Error:
    note = str(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < _NO_ROOM_BYTES:
        note += f": its file system is full, {free:,} bytes free"
    return type(err)(f"{err} ({note})")


def _enter_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while the file is busy until
    ``busy_timeout_s`` has passed since the first try.

    Switching a new file's journal takes its exclusive lock. When two connections switch it
    at the same moment, each holds the shared lock the other waits for, and SQLite answers
    one of them "database is locked" at once instead of waiting out the busy timeout."""
    deadline = time.monotonic() + busy_timeout_s
    pause_s = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # SQLITE_BUSY_RECOVERY too
            if not busy or time.monotonic() >= deadline:
                raise
        else:
            return
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, _WAL_RETRY_MAX_S)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; ``ROLLBACK`` when anything in it (the commit
    included) fails, and the failure propagates."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
