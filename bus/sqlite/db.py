"""SQLite plumbing shared by the embedded bus and the idempotency ledger.

Every connection is opened the same way (:mod:`bus.sqlite.connection`: WAL, ``synchronous=
FULL``, explicit ``BEGIN IMMEDIATE`` transactions). Each connection lives on a single thread
of its own (:class:`ConnectionThread`), so the event loop never waits on the disk or on a
lock, and statements on one connection never interleave. Writes are the exception: the
bus's and the ledger's are made in a process of their own each (:mod:`bus.sqlite.writer`,
:mod:`handlers.worker.ledger_writer`).

The files hold customers' data: :func:`create_private_file` creates a database file with
mode 0600 before SQLite opens it (SQLite gives its ``-wal`` and ``-shm`` files the
database file's mode), in a directory created with mode 0700.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import structlog

from bus.sqlite.connection import connect

log = structlog.get_logger("pubrelay.files")

P = ParamSpec("P")
T = TypeVar("T")


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (and its directory with mode 0700) unless it
    exists; warn when an existing one is readable or writable by others than its owner."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        warn_if_not_private(path)
    else:
        os.close(fd)


def warn_if_not_private(path: Path) -> None:
    """Log a warning when the file at ``path`` is open to its group or to others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "data_file_not_private",
            path=str(path),
            mode=format(mode, "04o"),
            wanted="0600",
        )


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
