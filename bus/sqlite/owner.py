"""One consuming process per embedded bus, held for the process's whole life.

The embedded bus gives each consumer group a single member, so a second worker process on
the same file (usually ``pubrelay serve`` started twice on one data directory) could only
wait for the first one's groups, or, with no handler enabled, run unnoticed beside it.
A process that consumes (``serve``, ``worker``) therefore takes an exclusive advisory
``flock`` on ``<bus file>.worker.lock`` (in the data directory by default) before it
starts anything, and keeps it until it exits; the kernel releases it when the process
dies, however it dies. The file holds the owner's process id, for the message a second
process stops with.

Webhook-only processes (``pubrelay webhook``) take no lock: any number of them may publish
to one file beside its worker, as SQLite serialises their commits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from schemas.errors import BusInUse


def worker_lock_path(bus_path: Path) -> Path:
    return bus_path.with_name(f"{bus_path.name}.worker.lock")


@contextlib.contextmanager
def consuming(bus_path: Path) -> Iterator[None]:
    """Hold the embedded bus at ``bus_path`` as its one consuming process; raise
    :class:`~schemas.errors.BusInUse` at once when another process holds it."""
    path = worker_lock_path(bus_path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BusInUse(
                f"another pubrelay process (pid {owner}) already runs the worker on the "
                f"embedded bus {bus_path} (its lock: {path}). One process per data directory "
                "consumes the embedded bus: stop the other one first, add intake with "
                "`pubrelay webhook`, or use Kafka to run several workers"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:  # a full disk: say which file
            raise OSError(err.errno, err.strerror, str(path)) from err
        yield
    finally:
        os.close(fd)  # releases the lock
