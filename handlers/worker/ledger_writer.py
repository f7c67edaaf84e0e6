"""The SQLite ledger's writer: a process of its own (``python -m handlers.worker.ledger_writer``).

Why a process: a writer thread shares the interpreter lock with the worker's event loop.
It gives the lock up around every SQLite call and, while the loop runs Python, waits to
take it back, so its commits took 2 to 4 times as long as alone and the loop waited for
them; what the thread did in Python (encoding a group's rows, reading the answers) was the
loop's time too. A process commits on the other core, at the speed it has alone
(docs/performance.md, "The ledger's writer process").

It owns the file's one write connection (opened as every connection is:
:mod:`bus.sqlite.connection`) and answers requests read from its standard input, in the
order they came, on its standard output. Each message is a 4-byte big-endian length and a
pickle; both ends are pubrelay's own, over a pipe no one else holds.

* Requests: :class:`Open` (connect, create the tables, check SQLite's JSON functions),
  :class:`Write` (operations of :mod:`handlers.worker.ledger_sql`), :class:`Purge`.
* Answers: ``(True, result)`` or ``(False, exception)``, one per request.
* **Group commit.** The writes already waiting when a transaction starts share it, up to
  :data:`GROUP_MAX_OPS` operations: under load, commits of a few hundred writes follow each
  other while the worker's loop goes on; each answer is sent as soon as its commit returns.
  One transaction's failure fails each request in it.
* **Lifetime.** It ends when its input closes: the worker closing the ledger, or the worker
  gone (killed included), after making every write it was sent (a completion the worker
  sent before a SIGKILL is recorded) and answering them while someone reads. SIGINT and
  SIGTERM are ignored: a Ctrl-C reaches the whole process group, and the worker's shutdown
  still needs to record its last completions here.

It imports the standard library, :mod:`bus.sqlite.connection`,
:mod:`handlers.worker.ledger_sql` and :mod:`schemas.errors` only (about 16 MB; open in
about 70 ms).
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import sqlite3
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Final, NamedTuple

from bus.sqlite.connection import connect
from handlers.worker import ledger_sql

HEADER: Final = struct.Struct("!I")
"""Each message's length, before its pickle."""

GROUP_MAX_OPS: Final = 256
"""Operations per transaction at most: a commit's answers come back while the next
transaction is made (larger groups made the worker's loop wait longer for each)."""

_READ_SIZE: Final = 1 << 20

_READ_MAX_REQUESTS: Final = 16
"""Requests read before serving them, at most (while more keep arriving): a few
transactions' worth, so answers never wait for a stream of requests to pause."""


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
Answer = tuple[bool, Any]


def encode(message: object) -> bytes:
    """One message as sent: its length, then its pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def answer(ok: bool, value: object) -> bytes:
    """An answer as sent; an exception that does not pickle is sent as its text."""
    try:
        return encode((ok, value))
    except Exception:  # an exception with arguments pickle cannot rebuild
        return encode((False, RuntimeError(f"{type(value).__name__}: {value}")))


class _Writer:
    def __init__(self, out: Callable[[bytes], None]) -> None:
        self._out = out
        self._conn: sqlite3.Connection | None = None

    def serve(self, requests: list[Request]) -> None:
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


def _read_requests(fd: int, buffer: bytearray) -> list[Request] | None:
    """The complete requests available (waiting for at least one); None at end of input."""
    requests: list[Request] = []
    while True:
        start = 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            data = buffer[start + HEADER.size : end]
            requests.append(pickle.loads(data))  # noqa: S301 - the worker's own pipe (see above)
            start = end
        del buffer[:start]  # once per read, not once per request
        if requests and (
            len(requests) >= _READ_MAX_REQUESTS or not select.select([fd], [], [], 0)[0]
        ):
            return requests  # nothing more waiting (or enough): serve these now
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            return requests or None
        buffer += chunk


def serve(stdin: BinaryIO, stdout: BinaryIO) -> bool:
    """Answer requests from ``stdin`` on ``stdout`` until ``stdin`` ends; True when no one
    was reading ``stdout`` any more (the worker gone: what it sent is made all the same)."""
    gone = False

    def out(data: bytes) -> None:
        nonlocal gone
        if gone:
            return
        try:
            stdout.write(data)
            stdout.flush()
        except BrokenPipeError:
            gone = True

    writer = _Writer(out)
    fd = stdin.fileno()
    buffer = bytearray()
    while (requests := _read_requests(fd, buffer)) is not None:
        writer.serve(requests)
    return gone


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if serve(sys.stdin.buffer, sys.stdout.buffer):
        os._exit(0)  # answers left in the buffer have no reader: do not flush them at exit


if __name__ == "__main__":
    # Run as this module's own name: requests unpickle into its classes, not __main__'s.
    importlib.import_module("handlers.worker.ledger_writer").main()
