"""Keeping a claim while a handler call runs, and stopping the call when it cannot be kept.

A claim in the ledger lasts ``claim_ttl_s`` (:class:`handlers.config.LedgerSettings`). A
call that runs longer renews it every third of that; a worker that dies stops renewing,
so its events wait for at most ``claim_ttl_s`` before another worker takes them. When a
renewal says the claim went to someone else, or the renewals fail until the claim would
expire (the ledger unreachable), the call is cancelled before another worker may start
the same effect, and the attempt counts as a transient failure (:class:`ClaimLost`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Final

from structlog.typing import FilteringBoundLogger

from handlers.worker.error_text import short_error
from handlers.worker.ledger import Ledger

_RENEWALS_PER_TTL: Final = 3
_SAFETY: Final = 0.8
"""Our own deadline is this share of the claim's lifetime after its last renewal: it ends
the call before the claim can expire in the ledger, despite latency, clock drift and the
tick below."""
_TICK_MAX_S: Final = 0.1
_TICK_SHARE: Final = 0.05
"""The ticker looks at the running calls every ``min(0.1 s, 5% of the claim's lifetime)``."""


class ClaimLost(Exception):
    """The call was stopped because its claim could not be kept (retried: transient)."""

    retriable = True


class _Call:
    """One call the lease runs: its bound, deadlines and renewer."""

    __slots__ = ("bound", "call_deadline", "deadline", "key", "renew_at", "renewer", "token")

    def __init__(
        self,
        key: str,
        token: str,
        bound: asyncio.Timeout,
        *,
        call_deadline: float,
        deadline: float,
        renew_at: float,
    ) -> None:
        self.key = key
        self.token = token
        self.bound = bound
        self.call_deadline = call_deadline
        self.deadline = deadline  # the sooner of the call's and the claim's
        self.renew_at = renew_at
        self.renewer: asyncio.Task[None] | None = None


class Lease:
    """Runs handler calls under the claims the worker took for them."""

    def __init__(
        self, ledger: Ledger, handler: str, *, ttl_s: float, log: FilteringBoundLogger
    ) -> None:
        self.ledger = ledger
        self.handler = handler
        self.ttl_s = ttl_s
        self.log = log
        self._tick_s = min(_TICK_MAX_S, ttl_s * _TICK_SHARE)
        self._calls: set[_Call] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_loop: asyncio.AbstractEventLoop | None = None

    async def run(
        self,
        key: str,
        token: str,
        claimed_at: float,
        call: Callable[[], Awaitable[None]],
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Await ``call()`` while renewing ``token``'s claim on ``key`` (taken at
        ``claimed_at``, event-loop time); :class:`ClaimLost` when the claim could not be kept
        (the call is then cancelled, or not started), ``TimeoutError`` when the call took
        longer than ``timeout_s`` (None: no bound).

        No timer per call: one ticker looks at every running call (:meth:`_tick`), ends
        those past their deadline (the sooner of ``timeout_s`` and the claim's) and starts
        renewing those that run long, so a call ends at most one tick after its deadline
        (docs/performance.md, "The worker, second pass").
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - claimed_at >= self.ttl_s / _RENEWALS_PER_TTL:
            # The call waited (for a concurrency slot): make sure the claim is still ours.
            claimed_at = now
            if not await self._renew_once(key, token):
                raise self._lost(key)
            now = loop.time()
        call_deadline = now + timeout_s if timeout_s else math.inf
        running = _Call(
            key,
            token,
            asyncio.timeout(None),
            call_deadline=call_deadline,
            deadline=min(call_deadline, claimed_at + self.ttl_s * _SAFETY),
            renew_at=claimed_at + self.ttl_s / _RENEWALS_PER_TTL,
        )
        self._calls.add(running)
        if self._ticker is None or self._ticker_loop is not loop:
            self._ticker_loop = loop  # a lease outliving its loop starts over in the next
            self._ticker = loop.call_later(self._tick_s, self._tick, loop)
        try:
            async with running.bound:
                await call()
        except TimeoutError:
            if not running.bound.expired():
                raise  # the handler's own
            if call_deadline <= running.deadline:
                raise TimeoutError(f"the handler call took more than {timeout_s} s") from None
            raise self._lost(key) from None
        finally:
            self._calls.discard(running)
            if running.renewer is not None:
                running.renewer.cancel()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """End the calls past their deadline, start renewing the long ones; again in a tick
        while any call runs (scheduled first: nothing here may leave calls unwatched)."""
        self._ticker = loop.call_later(self._tick_s, self._tick, loop) if self._calls else None
        now = loop.time()
        for running in self._calls:
            if now >= running.deadline:
                if running.bound.when() is None:
                    running.bound.reschedule(now)  # cancels the call: a TimeoutError in run()
            elif running.renewer is None and now >= running.renew_at:
                running.renewer = loop.create_task(self._keep(running), name="claim-renew")

    def _lost(self, key: str) -> ClaimLost:
        return ClaimLost(
            f"the claim on event {key} could not be kept for {self.handler}: the call was "
            "stopped so that no other worker runs it at the same time"
        )

    async def _keep(self, running: _Call) -> None:
        """Renew every third of the lifetime, moving the call's deadline; end the call when
        the claim is gone."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                kept = await self.ledger.renew(
                    self.handler, running.key, running.token, ttl_s=self.ttl_s
                )
            except Exception as err:  # the store's own errors: try again until our deadline
                self._report(running.key, err)
            else:
                if not kept:
                    self.log.error("event_claim_lost", event_id=running.key)
                    running.deadline = started
                    running.bound.reschedule(loop.time())
                    return
                running.deadline = min(running.call_deadline, started + self.ttl_s * _SAFETY)
            await asyncio.sleep(self.ttl_s / _RENEWALS_PER_TTL)

    async def _renew_once(self, key: str, token: str) -> bool:
        try:
            return await self.ledger.renew(self.handler, key, token, ttl_s=self.ttl_s)
        except Exception as err:  # the store's own errors: the attempt is retried
            self._report(key, err)
            return False

    def _report(self, key: str, err: Exception) -> None:
        self.log.warning(
            "ledger_renew_failed",
            event_id=key,
            error_type=type(err).__name__,
            error=short_error(err),
        )
