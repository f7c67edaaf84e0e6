"""One reconciliation run, and the worker's periodic runs.

A run takes the runner lease (:mod:`~handlers.reconcile.store`; another runner holding it
makes this one :class:`~schemas.errors.ReconcileBusy`), reads ``GET /v1/publications``
newest first, 100 a page, back to the window's start, and collects the ``SUCCESS``
publications the store has not recorded. The window starts at ``--since`` when given,
else at the watermark (the newest publication a complete run reconciled) minus
``OVERLAP_S``, else ``LOOKBACK_S`` ago. Publications younger than ``MIN_AGE_S`` wait for
the next run (their webhook may still be on its way). ``FAILURE`` publications are
counted, never delivered.

The missing ones are then injected oldest first (a customer's events stay in order) as
the records of :mod:`~handlers.reconcile.record`, each recorded in the store once the bus
acknowledged it, so the next run does not inject it again; should a run die between the
two, the record's derived event id still makes every handler act once.

What was collected is injected even when the run stops early: on an API error
(re-raised afterwards), when the request budget ``MAX_REQUESTS`` is spent, or at the
API's last page (1000). The watermark moves only when the window was read to its start,
or as far as the API lists (page 1000): nothing older can ever be read there.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from bus.types import Bus
from handlers.builtin.voucherify_api import (
    MAX_LIMIT,
    ListedPublication,
    VoucherifyApi,
    VoucherifySettings,
)
from handlers.reconcile.config import ReconcileSettings
from handlers.reconcile.metrics import ReconcileMetrics, RunOutcome
from handlers.reconcile.record import build_record
from handlers.reconcile.store import Received, ReceivedStore
from schemas.errors import (
    ApiError,
    PageLimitReached,
    PubrelayError,
    ReconcileBusy,
    ReconcileWindowTooOld,
)
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED
from schemas.masking import mask_emails
from schemas.topics import topic_for

log = structlog.get_logger("pubrelay.reconcile")


@dataclass(slots=True)
class Summary:
    """What a run did; ``stopped`` says why it ended before the window's start."""

    since: datetime
    dry_run: bool
    pages: int = 0
    requests: int = 0
    seen: int = 0
    failures: int = 0
    unreadable: int = 0
    listed_ids: set[str] = field(default_factory=set)
    """Publications already counted: one the listing shows again on a later page (pushed
    down by those created meanwhile) is counted and injected once."""
    injected: int = 0
    newest: datetime | None = None
    """The creation time of the newest successful publication listed in the window."""
    missing: list[ListedPublication] = field(default_factory=list)
    stopped: str | None = None
    at_last_page: bool = False
    """Whether the API's last page (1000) was read: nothing older can be read there."""

    @property
    def complete(self) -> bool:
        return self.stopped is None

    def line(self) -> str:
        verb = "would inject" if self.dry_run else "injected"
        text = (
            f"reconciled since {self.since.isoformat(timespec='seconds')}: {self.pages} page(s) "
            f"read, {self.seen} publication(s) seen, {len(self.missing)} missing, "
            f"{verb} {len(self.missing) if self.dry_run else self.injected}, "
            f"{self.failures} failure(s)"
            + (f", {self.unreadable} unreadable" if self.unreadable else "")
        )
        return text if self.stopped is None else f"{text}; incomplete: {self.stopped}"


Progress = Callable[[Summary], None]


def runner_id() -> str:
    """This runner's lease owner: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Reconciler:
    def __init__(
        self,
        *,
        api: VoucherifySettings,
        settings: ReconcileSettings,
        store: ReceivedStore,
        bus: Bus,
        topic_prefix: str,
        metrics: ReconcileMetrics | None = None,
        owner: str | None = None,
    ) -> None:
        self.api_settings = api
        self.settings = settings
        self.store = store
        self.bus = bus
        self.topic_prefix = topic_prefix
        self.metrics = metrics
        self.owner = owner or runner_id()

    async def run_once(
        self,
        *,
        since: datetime | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Summary:
        """One run; raises ``ApiError`` subclasses, ``ReconcileBusy`` or bus errors."""
        outcome: RunOutcome = "failed"
        try:
            summary = await self._run(since, dry_run, progress)
        except ReconcileBusy:
            outcome = "busy"
            raise
        else:
            outcome = "success" if summary.complete else "incomplete"
            return summary
        finally:
            if self.metrics is not None and not dry_run:
                self.metrics.runs.labels(outcome).inc()
                if outcome == "success":
                    self.metrics.last_success.set(time.time())

    async def _run(
        self, since: datetime | None, dry_run: bool, progress: Progress | None
    ) -> Summary:
        if not dry_run and not await self.store.acquire_lease(self.owner, self.settings.lease_s):
            raise ReconcileBusy("another reconciliation is running (its lease is held)")
        try:
            start = since if since is not None else await self._window_start()
            if start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            start = self._within_memory(start, asked=since is not None)
            summary = Summary(since=start, dry_run=dry_run)
            failure = await self._collect(summary, dry_run, progress)
            newest = summary.newest
            summary.missing.sort(key=lambda p: p.created_at)
            if not dry_run:
                await self._inject(summary, progress)
                if (
                    failure is None
                    and newest is not None
                    and (summary.complete or summary.at_last_page)
                ):
                    await self.store.set_watermark(newest.timestamp())
                await self._observe(summary)
            if failure is not None:
                raise failure
            log.info(
                "reconcile_finished",
                pages=summary.pages,
                seen=summary.seen,
                missing=len(summary.missing),
                injected=summary.injected,
                failures=summary.failures,
                unreadable=summary.unreadable,
                stopped=summary.stopped,
                dry_run=dry_run,
            )
            return summary
        finally:
            if not dry_run:
                await self.store.release_lease(self.owner)

    def _within_memory(self, start: datetime, *, asked: bool) -> datetime:
        """``start``, unless it is older than the store remembers the publications that
        arrived (``RETENTION_S``): then every one of that time would read as missing and be
        delivered again, past the ledger's memory too. A ``--since`` that old is refused; a
        watermark that old (no run for weeks) is moved up to what the store remembers."""
        # With the overlap's margin: the store's hourly purge may run while the run reads
        # its oldest pages.
        settings = self.settings
        oldest = datetime.now(UTC) - timedelta(seconds=settings.retention_s - settings.overlap_s)
        if start >= oldest:
            return start
        if asked:
            raise ReconcileWindowTooOld(
                f"--since {start.isoformat(timespec='seconds')} is older than "
                f"PUBRELAY_RECONCILE__RETENTION_S ({self.settings.retention_s:g} s): the "
                "store no longer knows which publications of that time arrived, so each "
                "would be delivered again; the oldest possible is "
                f"{oldest.isoformat(timespec='seconds')}"
            )
        log.warning(
            "reconcile_window_shortened",
            since=start.isoformat(timespec="seconds"),
            to=oldest.isoformat(timespec="seconds"),
            reason="older than PUBRELAY_RECONCILE__RETENTION_S: publications of that time "
            "are no longer told apart",
        )
        return oldest

    async def _window_start(self) -> datetime:
        watermark = await self.store.watermark()
        if watermark is None:
            return datetime.now(UTC) - timedelta(seconds=self.settings.lookback_s)
        return datetime.fromtimestamp(watermark, UTC) - timedelta(seconds=self.settings.overlap_s)

    async def _collect(
        self, summary: Summary, dry_run: bool, progress: Progress | None
    ) -> ApiError | None:
        """Read pages back to the window's start; the API error that ended it early, if any."""
        settled = datetime.now(UTC) - timedelta(seconds=self.settings.min_age_s)
        async with VoucherifyApi(self.api_settings) as api:
            for number in range(1, 1_000_000):
                if api.requests >= self.settings.max_requests:
                    summary.stopped = (
                        f"the request budget of {self.settings.max_requests} "
                        "(PUBRELAY_RECONCILE__MAX_REQUESTS) is spent before the window's start; "
                        "the next run starts from the newest page again: run one with a larger "
                        "budget (deploy/README.md, PubrelayReconcileFailing)"
                    )
                    return None
                try:
                    page = await api.list_publications(number, limit=MAX_LIMIT)
                except PageLimitReached as err:
                    summary.at_last_page = True
                    summary.stopped = (
                        f"{err}; the window is deeper than the API lists: publications older "
                        f"than page {number - 1} were not checked"
                    )
                    return None
                except ApiError as err:
                    return err
                finally:
                    summary.requests = api.requests
                summary.pages += 1
                for reason in page.unreadable:
                    summary.unreadable += 1
                    log.warning("reconcile_item_unreadable", page=number, error=reason)
                in_window = [p for p in page.publications if p.created_at >= summary.since]
                await self._sort([p for p in in_window if p.created_at <= settled], summary)
                if progress is not None:
                    progress(summary)
                if (
                    len(in_window) < len(page.publications)
                    or page.listed < MAX_LIMIT
                    or (page.total is not None and number * MAX_LIMIT >= page.total)
                ):
                    return None
                if not dry_run and not await self.store.acquire_lease(
                    self.owner, self.settings.lease_s
                ):
                    raise ReconcileBusy("the reconciliation lease was lost to another runner")
        return None

    async def _sort(self, publications: list[ListedPublication], summary: Summary) -> None:
        """Count one page's publications in the window; keep the missing successes."""
        publications = [p for p in publications if p.id not in summary.listed_ids]
        summary.listed_ids.update(p.id for p in publications)
        summary.seen += len(publications)
        succeeded = [p for p in publications if p.succeeded]
        for pub in succeeded:
            if summary.newest is None or pub.created_at > summary.newest:
                summary.newest = pub.created_at
        summary.failures += len(publications) - len(succeeded)
        absent = await self.store.missing({p.id for p in succeeded})
        summary.missing.extend(p for p in succeeded if p.id in absent)

    async def _inject(self, summary: Summary, progress: Progress | None) -> None:
        if summary.missing:
            await self.bus.ensure_topics(
                [topic_for(self.topic_prefix, CUSTOMER_PUBLICATION_SUCCEEDED)]
            )
        for pub in summary.missing:
            record = build_record(pub, topic_prefix=self.topic_prefix)
            await self.bus.publish(
                record.topic, record.value, key=record.key, headers=record.headers
            )
            await self.store.record(
                [Received(pub.id, pub.created_at.timestamp(), "reconciliation")]
            )
            summary.injected += 1
            if self.metrics is not None:
                self.metrics.missing.inc()
            log.info(
                "reconcile_injected",
                publication_id=pub.id,
                event_id=record.event_id,
                channel=pub.channel,
                created_at=pub.created_at.isoformat(),
            )
            if progress is not None:
                progress(summary)

    async def _observe(self, summary: Summary) -> None:
        if self.metrics is None:
            return
        self.metrics.webhook_newest.set(await self.store.newest_webhook())
        if summary.newest is not None:
            self.metrics.api_newest.set(summary.newest.timestamp())


async def run_periodically(
    reconciler: Reconciler,
    interval_s: float,
    stop: asyncio.Event,
    *,
    first_after: asyncio.Event | None = None,
) -> None:
    """A run every ``interval_s`` until ``stop`` is set; a failed run is logged, not raised.

    The first waits for ``first_after`` (the recorder has caught up with the publications
    received while the worker was away; at most ``interval_s``): before, every one of them
    would read as missing, be delivered again and fire PubrelayReconcileFoundMissing.
    A run still going when ``stop`` is set is cancelled (its lease released): shutdown does
    not wait for the API's pauses. What it injected stays injected; the rest waits.
    """
    if first_after is not None and not first_after.is_set():
        log.info("reconcile_waiting", reason="the recorder is catching up with the bus")
        waits = [asyncio.create_task(first_after.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
    while not stop.is_set():
        run = asyncio.create_task(reconciler.run_once(), name="reconcile-run")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({run, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not run.done():
                run.cancel()
        try:
            await run
        except asyncio.CancelledError:
            if not stop.is_set():
                raise
            log.info("reconcile_cancelled", reason="the worker is stopping")
        except ReconcileBusy:
            log.info("reconcile_skipped", reason="another runner holds the lease")
        except PubrelayError as err:
            log.error("reconcile_failed", error_type=type(err).__name__, error=str(err))
        except Exception as err:  # a bug or a store failure: the worker keeps running
            log.error(
                "reconcile_failed",
                error_type=type(err).__name__,
                error=mask_emails(str(err), max_chars=300),
            )
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            continue
