"""SQLite plumbing shared by the embedded bus and the idempotency ledger.

Every connection is opened the same way: WAL journal with ``synchronous=FULL`` (a commit
is on disk when it returns), a busy timeout for waiting on another writer, and autocommit
mode so transactions are explicit. Each connection lives on a single thread of its own
(:class:`ConnectionThread`), so the event loop never waits on the disk or on a lock, and
statements on one connection never interleave. Writes go in ``BEGIN IMMEDIATE``
transactions (:func:`transaction`): the write lock is taken up front, and any failure
rolls the whole transaction back.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


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


class ConnectionThread:
    """One SQLite connection and the single thread that runs every call on it.

    :meth:`run` hands the connection to a function on that thread and awaits its result;
    the function's errors propagate to the caller unchanged.
    """

    def __init__(self, thread_name: str) -> None:
        self._name = thread_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self, path: Path, *, busy_timeout_s: float, schema: str | None = None) -> None:
        """Connect (see :func:`connect`), then run ``schema`` (a SQL script) when given."""

        def open_() -> sqlite3.Connection:
            conn = connect(path, busy_timeout_s)
            if schema is not None:
                conn.executescript(schema)
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, open_)

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(connection, *args, **kwargs)`` on the connection's thread."""

        def call() -> T:
            conn = self._conn
            assert conn is not None, f"{self._name}: the SQLite connection is not open"
            return fn(conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the connection after the calls already queued, then end the thread.

        The thread is joined off the event loop: a call stuck on a lock must not block
        the loop while it shuts down.
        """
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        await asyncio.to_thread(self._executor.shutdown, True)
