"""The writer processes' pipe: how requests and answers travel, and a writer's loop.

The embedded bus (:mod:`bus.sqlite.writer`) and the SQLite ledger
(:mod:`handlers.worker.ledger_writer`) each make their writes in a process of their own,
started by :class:`bus.sqlite.writer_process.WriterProcess`. Why a process: a writer thread
shares the interpreter lock with the event loop. It gives the lock up around every SQLite
call and, while the loop runs Python, waits to take it back; each hand-over costs both
threads, and the loop pays for the thread's Python too (docs/performance.md, "The
ledger's writer process" and "The webhook's own HTTP layer").

The process reads requests on its standard input and answers each one on its standard
output, in the order they came. Each message is a 4-byte big-endian length and a pickle;
both ends are pubrelay's own, over a pipe no one else holds. An answer is ``(True,
result)`` or ``(False, exception)``.

* **Lifetime.** A writer ends when its input closes (the parent closing it, or the parent
  gone, killed included), after making every write it was sent, answering them while
  someone reads. SIGINT and SIGTERM are ignored: a Ctrl-C reaches the whole process group,
  and the parent's shutdown still needs its writer to commit its last writes.

The standard library only: a writer process imports this module,
:mod:`bus.sqlite.connection` and its own statements (about 16 MB; open in about 70 ms).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, Final, Protocol

HEADER: Final = struct.Struct("!I")
"""Each message's length, before its pickle."""

_READ_SIZE: Final = 1 << 20
"""Bytes read at once, into one buffer kept for the process's life: a fresh 1 MiB object
per read came from new memory each time, and without its page faults and unmapping the
bus writer needs about an eighth less CPU (docs/performance.md, "The writer's reads")."""

_READ_MAX_REQUESTS: Final = 16
"""Requests read before serving them, at most (while more keep arriving): a few
transactions' worth, so answers never wait for a stream of requests to pause."""

Answer = tuple[bool, Any]
Out = Callable[[bytes], None]
"""Sends answers (already encoded) to the parent."""


class Server(Protocol):
    def serve(self, requests: list[Any]) -> None:
        """Make ``requests`` and send one answer each, in order."""


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


def read_requests(fd: int, buffer: bytearray, into: memoryview) -> list[Any] | None:
    """The complete requests available (waiting for at least one); None at end of input.

    What arrives is read into ``into`` and copied to the end of ``buffer``, which keeps
    the start of a request not yet whole."""
    requests: list[Any] = []
    while True:
        start = 0
        while len(buffer) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if len(buffer) < end:
                break
            data = buffer[start + HEADER.size : end]
            requests.append(pickle.loads(data))  # noqa: S301 - the parent's own pipe (see above)
            start = end
        del buffer[:start]  # once per read, not once per request
        if requests and (
            len(requests) >= _READ_MAX_REQUESTS or not select.select([fd], [], [], 0)[0]
        ):
            return requests  # nothing more waiting (or enough): serve these now
        size = os.readv(fd, [into])
        if not size:
            return requests or None
        buffer += into[:size]


def serve(stdin: BinaryIO, stdout: BinaryIO, make_server: Callable[[Out], Server]) -> bool:
    """Answer requests from ``stdin`` on ``stdout`` until ``stdin`` ends; True when no one
    was reading ``stdout`` any more (the parent gone: what it sent is made all the same)."""
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

    server = make_server(out)
    fd = stdin.fileno()
    buffer = bytearray()
    into = memoryview(bytearray(_READ_SIZE))
    while (requests := read_requests(fd, buffer, into)) is not None:
        server.serve(requests)
    return gone


def run_writer(make_server: Callable[[Out], Server]) -> None:
    """A writer process's life: serve its standard input until it ends (see above)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if serve(sys.stdin.buffer, sys.stdout.buffer, make_server):
        os._exit(0)  # answers left in the buffer have no reader: do not flush them at exit
