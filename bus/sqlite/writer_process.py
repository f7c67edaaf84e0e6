"""A parent's end of a writer process (:mod:`bus.sqlite.pipe`): the embedded bus's
(:mod:`bus.sqlite.writer`) and the SQLite ledger's (:mod:`handlers.worker.ledger_writer`).

:class:`WriterProcess` starts the process, sends it requests without waiting for earlier
answers, and hands each answer to its request's future, in order.

* **Ends.** When the process ends unexpectedly, every request waiting for an answer fails
  with :class:`WriterExited` (its write may or may not have been committed: the caller
  decides what that means); ``<name>_exited`` is logged, and the next request starts a new
  process and fails meanwhile, so the caller backs off and tries again.
* **Close** closes the process's input: it answers what it read, then ends. The wait is
  bounded; after it the process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import sys
from collections import deque
from pathlib import Path
from typing import Any, Final

from structlog.typing import FilteringBoundLogger

from bus.sqlite.pipe import HEADER, encode

_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory holding pubrelay's packages: the process imports from it."""


MIN_CLOSE_TIMEOUT_S: Final = 10.0


class WriterExited(OSError):
    """A writer process ended before answering (the write's outcome is unknown)."""


class WriterProcess:
    """One writer process: ``python -m <module>``, opened with ``open_request`` (see the
    module docstring). ``name`` names it in errors and log events (``<name>_exited``).

    Closing lets it answer what it was sent for twice ``busy_timeout_s`` (a transaction
    may wait that long for the write lock), at least :data:`MIN_CLOSE_TIMEOUT_S`, then
    kills it."""

    def __init__(
        self,
        module: str,
        open_request: object,
        *,
        name: str,
        log: FilteringBoundLogger,
        busy_timeout_s: float,
    ) -> None:
        self.module = module
        self.open_request = open_request
        self.name = name
        self.log = log
        self.close_timeout_s = max(MIN_CLOSE_TIMEOUT_S, 2 * busy_timeout_s)
        self._event_exited = f"{name}_exited"
        self._event_unreadable = f"{name}_unreadable"
        self._event_started = f"{name}_started"
        self._event_start_failed = f"{name}_start_failed"
        self._proc: asyncio.subprocess.Process | None = None
        self._answers: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._starting: asyncio.Task[None] | None = None
        self._opened: asyncio.subprocess.Process | None = None
        self._closing = False

    @property
    def _what(self) -> str:
        return f"{self.name.replace('_', ' ')} process"

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the process and open the file; the opening's error is raised."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        self._proc = proc
        self._answers = asyncio.create_task(self._read(proc), name=f"{self.name}-answers")
        try:
            await self.request(self.open_request)
        except BaseException:
            await self._end(timeout_s=self.close_timeout_s)
            raise
        self._opened = proc

    def request(self, request: object) -> asyncio.Future[Any]:
        """Send ``request``; its future gets the answer (or the error it raised)."""
        [future] = self.send([request])
        return future

    def send(self, requests: list[object]) -> list[asyncio.Future[Any]]:
        """Send ``requests`` in one write; a future per request, in order."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in requests]
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            for future in futures:
                future.set_exception(WriterExited(f"the {self._what} is not running"))
            self._start_again()
            return futures
        self._waiting.extend(futures)
        proc.stdin.write(b"".join(encode(request) for request in requests))
        return futures

    async def close(self) -> None:
        """Let the process answer what it was sent, then end it (killed after a bound)."""
        self._closing = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        await self._end(timeout_s=self.close_timeout_s)

    async def _end(self, *, timeout_s: float) -> None:
        proc, answers = self._proc, self._answers
        if proc is None or answers is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(answers), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await answers

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each answer to the oldest waiting request, until the process ends."""
        assert proc.stdout is not None
        try:
            while True:
                (length,) = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))
                data = await proc.stdout.readexactly(length)
                ok, value = pickle.loads(data)  # noqa: S301 - our own process, over its own pipe
                future = self._waiting.popleft()
                if future.done():  # its caller gave up waiting
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except asyncio.IncompleteReadError:
            pass  # the process ended (closed by us, or not)
        except Exception as err:  # an answer we cannot read: a new process starts afresh
            self.log.error(self._event_unreadable, error_type=type(err).__name__, error=str(err))
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            code = await proc.wait()
            if self._proc is proc:
                self._proc = None
            waiting, self._waiting = self._waiting, deque()
            for future in waiting:
                if not future.done():
                    future.set_exception(WriterExited(f"the {self._what} ended (exit code {code})"))
            if self._opened is proc and not self._closing:
                self.log.error(self._event_exited, exit_code=code, unanswered=len(waiting))

    def _start_again(self) -> None:
        if self._closing or (self._starting is not None and not self._starting.done()):
            return
        self._starting = asyncio.create_task(self._restart(), name=f"{self.name}-start")

    async def _restart(self) -> None:
        try:
            await self.start()
        except Exception as err:  # the next request tries again (the worker backs off)
            self.log.error(self._event_start_failed, error_type=type(err).__name__, error=str(err))
        else:
            self.log.info(self._event_started, pid=self.pid)
