"""One record to a final outcome: identify it, check the ledger, call the handler, retry,
record the completion or publish the dead letter.

* **Identification.** The event id and type come from the ``event-id`` / ``event-type``
  headers, else from the body's ``event``; a record with neither cannot be routed or
  deduplicated and is dead-lettered at once (0 attempts). Records of event types the
  handler does not read are ``ignored`` without calling it.
* **Claims.** Every attempt starts with an atomic claim on ``(handler, key)`` in the
  ledger (:mod:`handlers.worker.ledger`). The key is the event id, or for
  ``customer.publication.succeeded`` the publication id: the webhook's event and the one
  reconciliation injected for the same publication are one. An event the handler already
  completed is a ``duplicate``; an event another worker holds (its call still running
  after a rebalance, or a worker that died mid-call until its claim expires) waits,
  polling, and is counted in ``pubrelay_handler_claim_waits_total``. The completion is
  recorded after the effect (even while shutting down, bounded by the drain); a failed
  attempt releases the claim.
* **Attempts.** The ledger counts them durably: a redelivery (restart, rebalance, a crash
  mid-call) goes on counting, so an event that keeps killing or losing its worker is
  dead-lettered after ``max_attempts`` like one that keeps failing. See
  :mod:`handlers.types` for what ``handle`` may raise and :mod:`handlers.worker.retry`
  for which failures are retried and when. A handler call is bounded by
  ``handler_timeout_s`` (a timeout is a transient failure) and runs within one of
  ``concurrency`` slots; a retry back-off holds no slot. A ``RetryLater(keep_order=False)``
  waits out of its lane (:class:`SteppedAside`, the runner's business): the customer's
  later events go on meanwhile.
* **Dead letters.** The original record plus ``dlq-*`` headers
  (:mod:`handlers.worker.dead_letters`), published to ``<prefix>dlq.<handler>``; while
  that publish fails the event stays unfinished, so the commit never passes it.
* **Abandoned.** On stop, or when the record's partition is revoked, a retry back-off (or
  a ledger wait) ends at once and the event stays uncommitted: it comes back (after the
  restart, or to the partition's new owner).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time

from structlog.typing import FilteringBoundLogger

from bus.types import Bus
from handlers.config import WorkerSettings
from handlers.types import Claim, Event, Handler
from handlers.worker.dead_letters import dead_letter_headers, error_text, error_type_name
from handlers.worker.error_text import error_message, short_error
from handlers.worker.identity import Identity, Unidentified, age_s, identify, to_event
from handlers.worker.lease import Lease
from handlers.worker.ledger import Ledger
from handlers.worker.metrics import WorkerMetrics
from handlers.worker.observer import AttemptObserver, NoObserver, Outcome
from handlers.worker.offsets import FetchedRecord
from handlers.worker.retry import BusRetry, is_transient, pause, retry_delay
from schemas.errors import PubrelayError, RetryLater, SkipEvent
from schemas.timestamps import utc_now_iso

_HELD_POLL_S = 0.5
"""How often a delivery whose event another worker holds asks the ledger again."""

_PROCESS_TOKEN = f"{socket.gethostname()}:{os.getpid()}"
"""Names this process in the claims it takes (each processor adds a random part)."""


class AttemptsExhausted(Exception):
    """Earlier deliveries of the event used up its attempts (see :mod:`handlers.worker.ledger`)."""


class SteppedAside:
    """The handler asked for a retry in ``delay_s`` out of order (``RetryLater(keep_order=
    False)``): the record is not finished, and the customer's later records may go first."""

    __slots__ = ("delay_s",)

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s


class EventProcessor:
    """Takes one handler's records, one at a time per lane, each to a final outcome."""

    def __init__(
        self,
        handler: Handler,
        *,
        bus: Bus,
        ledger: Ledger,
        settings: WorkerSettings,
        dlq_topic: str,
        metrics: WorkerMetrics,
        retry: BusRetry,
        stop: asyncio.Event,
        log: FilteringBoundLogger,
        observer: AttemptObserver | None = None,
    ) -> None:
        self.handler = handler
        self._observer = observer or NoObserver()
        self.name = handler.name
        self.bus = bus
        self.ledger = ledger
        self.settings = settings
        self.dlq_topic = dlq_topic
        self.stop = stop
        self.log = log
        self._retry = retry
        self._event_types = handler.event_types
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._active_ids: dict[str, asyncio.Event | None] = {}
        self._tokens = itertools.count(1)
        self._token_prefix = f"{_PROCESS_TOKEN}:{secrets.token_hex(3)}"  # this processor's
        self._lease = Lease(ledger, self.name, ttl_s=ledger.claim_ttl_s, log=log)
        outcome = metrics.events
        self._m_handled = outcome.labels(self.name, "handled")
        self._m_retried = outcome.labels(self.name, "retried")
        self._m_dead = outcome.labels(self.name, "dead_lettered")
        self._m_skipped = outcome.labels(self.name, "skipped")
        self._m_duplicate = outcome.labels(self.name, "duplicate")
        self._m_ignored = outcome.labels(self.name, "ignored")
        self._m_duration = metrics.duration.labels(self.name)
        self._m_age = metrics.event_age.labels(self.name)
        # Read when scraped: counting in a plain int spares each call two locked updates.
        self._in_flight = 0
        metrics.in_flight.labels(self.name).set_function(lambda: self._in_flight)
        self._m_claim_waits = metrics.claim_waits.labels(self.name)

    async def process(self, item: FetchedRecord) -> bool | SteppedAside:
        """Handle one record to a final outcome; False when abandoned (shutdown, revoke),
        :class:`SteppedAside` when the handler asked to wait out of its lane."""
        try:
            ident = identify(item.message)
        except Unidentified as err:
            return await self._dead_letter(item, None, err, attempts=0, first_failed_at=None)
        if self._event_types and ident.event_type not in self._event_types:
            self._m_ignored.inc()
            return True
        # Two deliveries of one event in different lanes (no key): one after the other. The
        # second one makes the event it waits on (rare: none is made per delivery).
        active = self._active_ids
        while ident.event_id in active:
            waited = active[ident.event_id]
            if waited is None:
                waited = active[ident.event_id] = asyncio.Event()
            await waited.wait()
        active[ident.event_id] = None
        token = f"{self._token_prefix}:{next(self._tokens)}"
        try:
            return await self._attempts(item, ident, token)
        except BaseException:  # cancelled (shutdown bound): let the next owner start at once
            await self._release(ident, token)
            raise
        finally:
            if (waiting := active.pop(ident.event_id)) is not None:
                waiting.set()

    async def _attempts(
        self, item: FetchedRecord, ident: Identity, token: str
    ) -> bool | SteppedAside:
        """The attempts, each under a claim, unless the handler already completed this event."""
        loop = asyncio.get_running_loop()
        event = to_event(item.message, ident)
        first_failed_at: str | None = None
        while True:
            if item.part.revoking:
                return False  # no longer ours: the new owner handles it (uncommitted)
            claim = await self._claim(item, ident, token)
            if claim is None:
                return False  # stopping or revoked while the ledger was away or held it
            if claim.state == "done":
                self._m_duplicate.inc()
                self._observe(item, ident, "duplicate", claim.attempts)
                self.log.info(
                    "event_duplicate", event_id=ident.event_id, event_type=ident.event_type
                )
                return True
            event.attempt = claim.attempts
            if event.attempt > self.settings.max_attempts:
                spent = AttemptsExhausted(
                    f"{event.attempt - 1} attempts were made in earlier deliveries (the worker "
                    "stopped, crashed or lost the partition during them)"
                )
                return await self._dead_letter(
                    item, ident, spent, attempts=event.attempt - 1, token=token
                )
            error = await self._call(event, ident.key, token, claimed_at=loop.time())
            if error is None or isinstance(error, SkipEvent):
                self._observe(item, ident, "skipped" if error else "done", event.attempt, error)
                return await self._completed(event, ident, error)
            first_failed_at = first_failed_at or utc_now_iso()
            if not is_transient(error) or event.attempt >= self.settings.max_attempts:
                return await self._dead_letter(
                    item,
                    ident,
                    error,
                    attempts=event.attempt,
                    first_failed_at=first_failed_at,
                    token=token,
                )
            await self._release(ident, token)
            self._observe(item, ident, "retrying", event.attempt, error)
            if item.part.revoking:
                return False
            if isinstance(error, RetryLater) and not error.keep_order:
                return SteppedAside(self._retry_scheduled(ident, event.attempt, error))
            if not await self._wait_to_retry(item, ident, event.attempt, error):
                return False  # stopping or revoked: the event stays uncommitted, comes back

    async def _claim(self, item: FetchedRecord, ident: Identity, token: str) -> Claim | None:
        """The ledger's claim for one attempt, waiting while another worker holds the event;
        None when stop or revoke ended the wait."""
        waited = False
        while True:
            ok, claim = await self._retry.keep_trying(
                "ledger",
                lambda: self.ledger.claim(self.name, ident.key, token),
                give_up_on_stop=True,
                revoked=item.part.revoked,
            )
            if not ok or claim is None:
                return None
            if claim.state != "held":
                return claim
            if not waited:
                waited = True
                self._m_claim_waits.inc()
                self.log.info(
                    "event_claimed_elsewhere",
                    event_id=ident.event_id,
                    event_type=ident.event_type,
                    claim_expires_in_s=round(claim.wait_s, 3),
                )
            if not await pause(min(claim.wait_s, _HELD_POLL_S), self.stop, item.part.revoked):
                return None

    def _observe(
        self,
        item: FetchedRecord,
        ident: Identity | None,
        outcome: Outcome,
        attempt: int,
        error: Exception | None = None,
    ) -> None:
        """Tell the observer (the console's index); it never blocks or raises."""
        self._observer.attempted(
            self.name,
            item.message,
            event_id=ident.event_id if ident else None,
            outcome=outcome,
            attempt=attempt,
            detail=None if error is None else short_error(error),
        )

    async def _release(self, ident: Identity, token: str, *, forget: bool = False) -> None:
        """End this delivery's claim; when the ledger fails, the claim's expiry does it."""
        try:
            await self.ledger.release(self.name, ident.key, token, forget_attempts=forget)
        except Exception as err:  # the store's own errors: the claim expires by itself
            self.log.warning(
                "ledger_release_failed",
                event_id=ident.event_id,
                error_type=type(err).__name__,
                error=short_error(err),
            )

    async def _wait_to_retry(
        self, item: FetchedRecord, ident: Identity, attempt: int, error: Exception
    ) -> bool:
        """Count and log the retry, then its back-off; False when stop or revoke ended it."""
        delay = self._retry_scheduled(ident, attempt, error)
        return await pause(delay, self.stop, item.part.revoked)

    def _retry_scheduled(self, ident: Identity, attempt: int, error: Exception) -> float:
        """Count and log the retry; its back-off."""
        delay = retry_delay(self.settings, attempt, error)
        self._m_retried.inc()
        self.log.warning(
            "event_retry_scheduled",
            event_id=ident.event_id,
            event_type=ident.event_type,
            attempt=attempt,
            retry_in_s=round(delay, 3),
            error_type=type(error).__name__,
            error=short_error(error),
        )
        return delay

    async def _call(
        self, event: Event, key: str, token: str, *, claimed_at: float
    ) -> Exception | None:
        """One handler call within a concurrency slot; the exception it raised, if any.

        A call over ``handler_timeout_s`` is cancelled and counts as a transient failure, and
        so does a ``CancelledError`` the handler raised while this lane was not cancelled
        (say a shared future some library cancelled): only our own cancellation propagates.
        """
        timeout_s = self.settings.handler_timeout_s or None
        async with self._slots:
            self._in_flight += 1
            started = time.perf_counter()
            try:
                await self._lease.run(
                    key, token, claimed_at, lambda: self.handler.handle(event), timeout_s=timeout_s
                )
            except asyncio.CancelledError as err:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the lane is being cancelled (shutdown bound)
                retry = RetryLater(f"the handler raised CancelledError: {error_message(err)}")
                retry.__cause__ = err
                return retry
            except Exception as err:  # classified by the caller (the bound's TimeoutError too)
                return err
            finally:
                self._m_duration.observe(time.perf_counter() - started)
                self._in_flight -= 1
        return None

    async def _completed(self, event: Event, ident: Identity, skip: SkipEvent | None) -> bool:
        # The effect is done: record it even while shutting down (bounded by the drain).
        await self._retry.keep_trying(
            "ledger",
            lambda: self.ledger.mark_done(self.name, ident.key),
            give_up_on_stop=False,
        )
        if skip is not None:
            self._m_skipped.inc()
            self.log.info(
                "event_skipped",
                event_id=ident.event_id,
                event_type=ident.event_type,
                reason=short_error(skip),
            )
            return True
        self._m_handled.inc()
        age = age_s(event, ident)
        if age is not None:
            self._m_age.observe(age)
        self.log.info(
            "event_handled",
            event_id=ident.event_id,
            event_type=ident.event_type,
            attempt=event.attempt,
        )
        return True

    async def _dead_letter(
        self,
        item: FetchedRecord,
        ident: Identity | None,
        error: Exception,
        *,
        attempts: int,
        first_failed_at: str | None = None,
        token: str | None = None,
    ) -> bool:
        message = item.message
        now = utc_now_iso()
        headers = dead_letter_headers(
            message.headers,
            error=error_text(error),
            error_type=error_type_name(error),
            attempts=attempts,
            first_failed_at=first_failed_at or now,
            last_failed_at=now,
            handler=self.name,
            source_topic=message.topic,
        )

        async def publish() -> None:
            await self.bus.publish(self.dlq_topic, message.value, key=message.key, headers=headers)

        # Not committed past this event until the dead letter is stored (bounded by the drain).
        await self._retry.keep_trying("publish_dlq", publish, give_up_on_stop=False)
        if ident is not None and token is not None:
            await self._release(ident, token, forget=True)  # a replay starts counting afresh
        self._m_dead.inc()
        self._observe(item, ident, "dead_lettered", attempts, error)
        # An exception no handler meant to raise (a bug, in a plugin or here) carries its
        # traceback to the log, masked as every line is: where it came from is the fix.
        with_traceback = (
            {} if isinstance(error, PubrelayError) or is_transient(error) else {"exc_info": error}
        )
        self.log.error(
            "event_dead_lettered",
            event_id=ident.event_id if ident else None,
            event_type=ident.event_type if ident else None,
            attempts=attempts,
            error_type=type(error).__name__,
            error=short_error(error),
            permanent=not is_transient(error),
            dlq_topic=self.dlq_topic,
            **with_traceback,
        )
        return True
