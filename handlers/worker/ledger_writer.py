"""The SQLite ledger's writer: a process of its own (``python -m handlers.worker.ledger_writer``).

It owns the ledger file's one write connection (opened as every connection is:
:mod:`bus.sqlite.connection`) and answers the worker's requests over a pipe
(:mod:`bus.sqlite.pipe`: the framing, the loop, the lifetime, and why a process): its
commits run on the other core at the speed they have alone, where a thread's took 2 to 4
times as long and the loop waited for them (docs/performance.md, "The ledger's writer
process").

* Requests: :class:`Open` (connect, create the tables, check SQLite's JSON functions),
  :class:`Write` (operations of :mod:`handlers.worker.ledger_sql`), :class:`Purge`.
* **Group commit.** The writes already waiting when a transaction starts share it, up to
  :data:`GROUP_MAX_OPS` operations: under load, commits of a few hundred writes follow each
  other while the worker's loop goes on; each answer is sent as soon as its commit returns.
  One transaction's failure fails each request in it.
* **Lifetime.** A completion the worker sent before it was killed is recorded: the process
  makes every write it was sent before it ends.

It imports the standard library, :mod:`bus.sqlite.pipe`, :mod:`bus.sqlite.connection`,
:mod:`handlers.worker.ledger_sql` and :mod:`schemas.errors` only.
"""

from __future__ import annotations

import importlib
import sqlite3
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

from bus.sqlite import pipe
from bus.sqlite.connection import connect
from bus.sqlite.pipe import HEADER, answer, encode
from handlers.worker import ledger_sql

__all__ = ["GROUP_MAX_OPS", "HEADER", "Open", "Purge", "Request", "Write", "encode", "serve"]

WAL_AUTOCHECKPOINT_PAGES: Final = 4000
"""WAL pages (4 KiB each) after which a commit checkpoints them into the file; SQLite's
default is 1000. A completion inserts its key into a random leaf of the ``ledger`` table
(the keys are event and publication ids), so a commit of a few hundred writes appends about
as many pages to the WAL, and each page a checkpoint copies is a write of its own: fewer,
larger checkpoints copy a page changed by several commits once (docs/performance.md, "The
ledger: a page per completion")."""

TEMP_STORE: Final = "MEMORY"
"""Where SQLite keeps a statement's journal (``PRAGMA temp_store``). Each multi-row
statement of a run (:mod:`handlers.worker.ledger_sql`) keeps the original of every page it
changes so that it can be undone alone, and a run's keys are random: a few hundred pages.
Past 64 KiB SQLite's default spills that journal into a temporary file, created, written
and deleted in every transaction: 14.9 KB written per event against 9.1 KB without it. In
memory it is one statement's pages at most (a transaction holds :data:`GROUP_MAX_OPS`
operations), freed when the statement ends (docs/performance.md, "The ledger's statement
journals")."""

GROUP_MAX_OPS: Final = 256
"""Operations per transaction at most: a commit's answers come back while the next
transaction is made (larger groups made the worker's loop wait longer for each)."""


class Open(NamedTuple):
    """Connect to ``path`` (created by the worker with mode 0600), create the tables."""

    path: str
    busy_timeout_s: float


class Write(NamedTuple):
    """Make ``ops`` (in order, in one transaction, possibly with other waiting writes)."""

    ops: list[ledger_sql.Op]
    retention_s: float


class Purge(NamedTuple):
    """Forget entries older than ``cutoff`` (a Unix time); answers how many."""

    cutoff: float


Request = Open | Write | Purge


class _Writer:
    def __init__(self, out: pipe.Out) -> None:
        self._out = out
        self._conn: sqlite3.Connection | None = None

    def serve(self, requests: list[Request]) -> None:  # pipe.Server
        """Answer ``requests`` in order; consecutive writes share transactions."""
        group: list[Write] = []
        size = 0
        for request in requests:
            if isinstance(request, Write):
                if group and size + len(request.ops) > GROUP_MAX_OPS:
                    self._commit(group)
                    group, size = [], 0
                group.append(request)
                size += len(request.ops)
                continue
            self._commit(group)
            group, size = [], 0
            self._out(self._control(request))
        self._commit(group)

    def _commit(self, group: list[Write]) -> None:
        if not group:
            return
        try:
            results = ledger_sql.write_batch(
                self._require(), [op for write in group for op in write.ops], group[0].retention_s
            )
        except Exception as err:  # the store's error, for every request in the transaction
            self._out(b"".join(answer(False, err) for _ in group))
            return
        answers = []
        start = 0
        for write in group:
            answers.append(answer(True, results[start : start + len(write.ops)]))
            start += len(write.ops)
        self._out(b"".join(answers))

    def _control(self, request: Open | Purge) -> bytes:
        try:
            if isinstance(request, Open):
                self._open(request)
                return answer(True, None)
            return answer(True, ledger_sql.purge(self._require(), request.cutoff))
        except Exception as err:
            return answer(False, err)

    def _open(self, request: Open) -> None:
        if self._conn is not None:
            self._conn.close()
        conn = connect(Path(request.path), request.busy_timeout_s)
        try:
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA temp_store = {TEMP_STORE}")
            conn.executescript(ledger_sql.SCHEMA)
            ledger_sql.check_json_functions(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the ledger's writer was not opened")
        return self._conn


def serve(stdin: BinaryIO, stdout: BinaryIO) -> bool:
    """:func:`bus.sqlite.pipe.serve` with the ledger's writer."""
    return pipe.serve(stdin, stdout, _Writer)


def main() -> None:
    pipe.run_writer(_Writer)


if __name__ == "__main__":
    # Run as this module's own name: requests unpickle into its classes, not __main__'s.
    importlib.import_module("handlers.worker.ledger_writer").main()
