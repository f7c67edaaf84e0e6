"""How every SQLite connection of pubrelay is opened, and its write transactions.

WAL journal with ``synchronous=FULL`` (a commit is on disk when it returns), a busy timeout
for waiting on another writer, and autocommit mode so transactions are explicit. Writes go
in ``BEGIN IMMEDIATE`` transactions (:func:`transaction`): the write lock is taken up
front, and any failure rolls the whole transaction back.

The standard library only, for the writer processes (:mod:`bus.sqlite.writer`,
:mod:`handlers.worker.ledger_writer`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode with ``synchronous=FULL``, usable from any one thread."""
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


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
