"""A watch on a long-running process's event loop.

Everything a process does runs on one event loop: the webhook's requests, the worker's
handler calls, the renewals of its claims, its timers. A handler that blocks the loop (a
plugin's ``time.sleep``, a synchronous HTTP client, a long computation) stops all of them
at once; past ``PUBRELAY_LEDGER__CLAIM_TTL_S`` another worker may take the blocked call's
event (README "Writing a handler"). Nothing on the loop can say so, since nothing on it
runs: a thread of its own watches a beat the loop keeps, and logs
``event_loop_blocked`` with the loop thread's stack (code locations only, no values) once
the loop has missed its beat for :data:`BLOCKED_AFTER_S`, again at each doubling of the
time, and ``event_loop_unblocked`` with the whole time once the loop runs again. A loop
held in one call that keeps the interpreter lock (a catastrophic regular expression, a
huge decode in C) keeps this thread from running too: such a stall is told once the loop
runs again, ``where`` saying it was not seen, if the process burned CPU meanwhile (a
process stopped as a whole, ``SIGSTOP`` or a paused machine, burns none and is not a
stall). The histogram ``pubrelay_event_loop_blocked_seconds`` counts the stalls by
length.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry, Histogram

BEAT_S: Final = 0.1
BLOCKED_AFTER_S: Final = 1.0
STACK_FRAMES: Final = 12  # the innermost frames, where the loop is held
BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
HELD_LOCK: Final = "(not seen while it lasted: the loop held the interpreter lock)"
HELD_CPU_SHARE: Final = 0.1
"""CPU the process must have used during an unseen stall for it to be a held lock: a
stopped process uses none, a loop holding the lock on a crowded machine gets a share."""


class LoopWatch:
    """Watch the running loop from :meth:`start` to :meth:`stop` (both called on it)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        blocked_after_s: float = BLOCKED_AFTER_S,
        beat_s: float = BEAT_S,
    ) -> None:
        self._blocked_after_s = blocked_after_s
        self._beat_s = beat_s
        self._stalls = Histogram(
            "pubrelay_event_loop_blocked_seconds",
            f"Stalls of this process's event loop of {blocked_after_s:g} s or more, by "
            "length (a handler or plugin blocking the loop): see the event_loop_blocked "
            "log lines for where.",
            buckets=BUCKETS,
            registry=registry,
        )
        # When the loop last kept its beat, and the process's CPU time then: written by the
        # loop as one tuple, read by the thread.
        self._beat = (time.monotonic(), time.process_time())
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        self._beat = (time.monotonic(), time.process_time())
        self._handle = loop.call_later(self._beat_s, self._keep_beat, loop)
        self._thread = threading.Thread(
            target=self._watch, args=(loop_thread,), name="pubrelay-loop-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._beat_s + 1)
            self._thread = None

    def _keep_beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beat = (time.monotonic(), time.process_time())
        self._handle = loop.call_later(self._beat_s, self._keep_beat, loop)

    def _watch(self, loop_thread: int) -> None:
        log = structlog.get_logger("pubrelay.loop_watch")  # as configured when started
        stalled_since: float | None = None  # the beat of the stall reported
        next_report = self._blocked_after_s
        woke = time.monotonic()
        last_beat, last_cpu = self._beat
        while not self._stopped.wait(self._beat_s):
            beat, cpu = self._beat
            now = time.monotonic()
            slept, woke = now - woke, now
            if beat != last_beat:
                if stalled_since is not None:
                    blocked_s = beat - stalled_since
                    self._stalls.observe(blocked_s)
                    log.warning("event_loop_unblocked", blocked_s=round(blocked_s, 3))
                    stalled_since, next_report = None, self._blocked_after_s
                else:
                    self._held_unseen(log, beat - last_beat, cpu - last_cpu)
                last_beat, last_cpu = beat, cpu
            if slept > self._blocked_after_s:
                # This thread was held as long: the process stopped or the machine paused
                # (the loop's missed beat says nothing), or the loop held the interpreter
                # lock, which _held_unseen tells once the beat comes again.
                continue
            missed_s = now - beat
            if missed_s >= next_report and not self._stopped.is_set():
                stalled_since = beat
                next_report = 2 * missed_s
                log.warning(
                    "event_loop_blocked",
                    blocked_s=round(missed_s, 3),
                    where=_stack_of(loop_thread),
                )

    def _held_unseen(self, log: Any, gap_s: float, cpu_s: float) -> None:
        """A gap between two beats that this thread could not watch live: the loop held the
        interpreter lock (a long call in C, a catastrophic regular expression) when the
        process burned CPU meanwhile (``cpu_s``, between the two beats); a process stopped
        as a whole burned none."""
        blocked_s = gap_s - self._beat_s
        if blocked_s < self._blocked_after_s:
            return
        if cpu_s < blocked_s * HELD_CPU_SHARE:
            return  # stopped, not busy
        log.warning(
            "event_loop_blocked",
            blocked_s=round(blocked_s, 3),
            where=[HELD_LOCK],
        )
        self._stalls.observe(blocked_s)
        log.warning("event_loop_unblocked", blocked_s=round(blocked_s, 3))


def _stack_of(thread: int) -> list[str]:
    """Where ``thread`` is: its innermost frames as ``file:line function``, outermost
    first (no source text, no values)."""
    frame = sys._current_frames().get(thread)
    if frame is None:
        return []
    frames = traceback.StackSummary.extract(
        traceback.walk_stack(frame), limit=STACK_FRAMES, lookup_lines=False
    )
    return [f"{summary.filename}:{summary.lineno} {summary.name}" for summary in reversed(frames)]
