"""Waiting and trying again: handler failures apart from broker and ledger errors.

* **Handler failures.** :func:`is_transient` says which are retried (see
  :mod:`handlers.types` for the contract); :func:`retry_delay` says after how long:
  exponential from ``retry_base_delay_s``, capped at ``retry_max_delay_s``, minus up to
  ``retry_jitter`` of it, or the ``delay_s`` a :class:`~schemas.errors.RetryLater` asks for
  (within the cap). Attempts are counted; the last one ends in a dead letter.
* **Broker and ledger errors** (fetch, commit, publish, ledger calls) are logged
  (``worker_bus_error``), counted in ``pubrelay_handler_bus_errors_total`` and retried
  with a capped :class:`Backoff` (:class:`BusRetry`); they never end the consume loop and
  never count as handler attempts.

Every wait is a :func:`pause`, which ends early on ``stop`` or on the revoke of the
record's partition.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from structlog.typing import FilteringBoundLogger

from handlers.config import WorkerSettings
from handlers.worker.error_text import short_error
from handlers.worker.metrics import WorkerMetrics
from schemas.errors import RetryLater

T = TypeVar("T")


def is_transient(err: BaseException) -> bool:
    """Whether a handler failure is retried: ``RetryLater``, ``retriable`` classes, I/O errors."""
    return isinstance(err, (RetryLater, OSError, TimeoutError)) or (
        getattr(type(err), "retriable", False) is True
    )


def retry_delay(settings: WorkerSettings, attempt: int, error: Exception) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1 for the first) failed."""
    if isinstance(error, RetryLater) and error.delay_s is not None:
        return min(max(error.delay_s, 0.0), settings.retry_max_delay_s)
    delay = min(settings.retry_max_delay_s, settings.retry_base_delay_s * 2.0 ** (attempt - 1))
    jitter = settings.retry_jitter * random.random()  # noqa: S311 - jitter, not security
    return delay * (1 - jitter)


class Backoff:
    """Capped exponential back-off for broker and ledger errors."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.next_s = initial_s

    def reset(self) -> None:
        self.next_s = self.initial_s

    def step(self) -> float:
        delay = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return delay


async def pause(delay_s: float, *interrupts: asyncio.Event) -> bool:
    """Sleep unless one of ``interrupts`` is set first; whether the whole delay passed."""
    if any(event.is_set() for event in interrupts):
        return False
    wakers = [asyncio.ensure_future(event.wait()) for event in interrupts]
    try:
        done, _ = await asyncio.wait(wakers, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waker in wakers:
            waker.cancel()
    return not done


class BusRetry:
    """One handler's broker and ledger calls: reported, backed off, tried again."""

    def __init__(
        self,
        handler: str,
        *,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        stop: asyncio.Event,
        log: FilteringBoundLogger,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.stop = stop
        self._metrics = metrics
        self._log = log

    def backoff(self) -> Backoff:
        """A fresh back-off as configured (``bus_backoff_initial_s`` … ``bus_backoff_max_s``)."""
        return Backoff(self.settings.bus_backoff_initial_s, self.settings.bus_backoff_max_s)

    def report(self, operation: str, err: BaseException, delay_s: float) -> None:
        """Count and log one failed ``operation``, tried again in ``delay_s``."""
        self._metrics.bus_errors.labels(self.handler, operation).inc()
        self._log.warning(
            "worker_bus_error",
            operation=operation,
            error_type=type(err).__name__,
            error=short_error(err),
            retry_in_s=round(delay_s, 3),
        )

    async def keep_trying(
        self,
        operation: str,
        fn: Callable[[], Awaitable[T]],
        *,
        give_up_on_stop: bool,
        revoked: asyncio.Event | None = None,
    ) -> tuple[bool, T | None]:
        """Run ``fn`` until it succeeds; with ``give_up_on_stop``, return (False, None) on stop
        (or when ``revoked`` is set).

        Without it the loop only ends by success or by cancellation (the shutdown bound).
        """
        backoff: Backoff | None = None  # made on the first failure: most calls succeed
        while True:
            try:
                return True, await fn()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any broker / ledger failure: back off and retry
                backoff = backoff or self.backoff()
                delay = backoff.step()
                self.report(operation, err, delay)
                if give_up_on_stop:
                    interrupts = (self.stop,) if revoked is None else (self.stop, revoked)
                    if not await pause(delay, *interrupts):
                        return False, None
                else:
                    await asyncio.sleep(delay)
