"""The buses' publish deadlines: one timer for all of them.

A timer per publish (``call_later`` and its ``cancel``) cost 1.3 µs per request, 1.5% of
the intake's loop (docs/performance.md, "The request without a task"). Publishes arrive
with their deadlines nearly in order (one timeout for all of them, the intake's), and are
answered nearly in order: :class:`Deadlines` keeps them in a deque sorted by deadline,
drops those answered from its front, and keeps one timer, at the earliest deadline still
waiting. When it fires, each publish whose deadline passed and is still waiting goes to
``expire``. A publish answered out of order (on Kafka, a record sent once more alone
after the broker refused its batch) stays in the deque until those before it are
answered or expire."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar


class _Timed(Protocol):
    @property
    def deadline(self) -> float:  # time.monotonic()
        ...

    @property
    def future(self) -> asyncio.Future[Any]: ...


T = TypeVar("T", bound=_Timed)


class Deadlines(Generic[T]):
    """Publishes waiting for their answer, with one timer at the earliest deadline (see
    the module docstring). Call :meth:`add` for each, :meth:`settled` after answering
    some."""

    def __init__(self, expire: Callable[[T], object]) -> None:
        self._expire = expire  # called with each publish still waiting at its deadline
        self._waiting: deque[T] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def add(self, item: T) -> None:
        waiting = self._waiting
        if not waiting or waiting[-1].deadline <= item.deadline:
            waiting.append(item)  # the usual case: in order
        else:  # a shorter timeout than those before it: its place, from the end
            at = len(waiting) - 1
            while at > 0 and waiting[at - 1].deadline > item.deadline:
                at -= 1
            waiting.insert(at, item)
        if self._timer is None or item.deadline < self._timer_at:
            self._schedule()

    def settled(self) -> None:
        """Drop the answered publishes from the front (answers come in order)."""
        waiting = self._waiting
        while waiting and waiting[0].future.done():
            waiting.popleft()

    def unanswered(self) -> list[T]:
        """The publishes still waiting for their answer."""
        return [item for item in self._waiting if not item.future.done()]

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.settled()
        if not self._waiting:
            return
        self._timer_at = self._waiting[0].deadline
        delay = max(0.0, self._timer_at - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        waiting = self._waiting
        now = time.monotonic()
        while waiting and waiting[0].deadline <= now:
            item = waiting.popleft()
            if not item.future.done():
                self._expire(item)
        self._schedule()
