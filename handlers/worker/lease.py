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
the call before the claim can expire in the ledger, despite latency and clock drift."""


class ClaimLost(Exception):
    """The call was stopped because its claim could not be kept (retried: transient)."""

    retriable = True


class Lease:
    """Runs handler calls under the claims the worker took for them."""

    def __init__(
        self, ledger: Ledger, handler: str, *, ttl_s: float, log: FilteringBoundLogger
    ) -> None:
        self.ledger = ledger
        self.handler = handler
        self.ttl_s = ttl_s
        self.log = log

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

        One timer bounds the call for both (the sooner of the two deadlines): a call costs
        the event loop two timers, not three (docs/performance.md).
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
        bound = asyncio.timeout_at(min(call_deadline, claimed_at + self.ttl_s * _SAFETY))
        renewer: asyncio.Task[None] | None = None

        def start_renewing() -> None:
            nonlocal renewer
            renewer = asyncio.create_task(
                self._keep(key, token, bound, call_deadline), name="claim-renew"
            )

        # Most calls end long before the first renewal: no task for them, a timer only.
        timer = loop.call_at(claimed_at + self.ttl_s / _RENEWALS_PER_TTL, start_renewing)
        try:
            async with bound:
                await call()
        except TimeoutError:
            if not bound.expired():
                raise  # the handler's own
            if call_deadline <= (bound.when() or 0.0):
                raise TimeoutError(f"the handler call took more than {timeout_s} s") from None
            raise self._lost(key) from None
        finally:
            timer.cancel()
            if renewer is not None:
                renewer.cancel()

    def _lost(self, key: str) -> ClaimLost:
        return ClaimLost(
            f"the claim on event {key} could not be kept for {self.handler}: the call was "
            "stopped so that no other worker runs it at the same time"
        )

    async def _keep(
        self, key: str, token: str, bound: asyncio.Timeout, call_deadline: float
    ) -> None:
        """Renew every third of the lifetime; end the call when the claim is gone."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                kept = await self.ledger.renew(self.handler, key, token, ttl_s=self.ttl_s)
            except Exception as err:  # the store's own errors: try again until our deadline
                self._report(key, err)
            else:
                if not kept:
                    self.log.error("event_claim_lost", event_id=key)
                    bound.reschedule(loop.time())
                    return
                bound.reschedule(min(call_deadline, started + self.ttl_s * _SAFETY))
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
