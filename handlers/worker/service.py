"""The worker as a service: its wiring, and the handlers' lifecycle around the runners.

:func:`open_worker` is the one wiring of ``pubrelay worker`` / ``pubrelay serve``: load the
enabled plugins (before anything listens, so a bad plugin stops start-up), open the
ledger, yield the :class:`Worker`, close the ledger. :class:`Worker` starts the handlers,
runs one :class:`~handlers.worker.runner.HandlerRunner` per handler side by side until
``stop`` is set, and then stops the handlers in reverse start order. The bus is started
(and closed) by the caller, who may share it with the web app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from bus.types import Bus
from handlers.builtin.voucherify_api import VoucherifySettings
from handlers.config import HandlersSettings, LedgerSettings, WorkerSettings
from handlers.reconcile.config import ReconcileSettings
from handlers.reconcile.metrics import ReconcileMetrics
from handlers.reconcile.reconciler import Reconciler, run_periodically
from handlers.reconcile.recorder import RECORDER_NAME, ReceivedRecorder
from handlers.reconcile.store import create_store
from handlers.registry import build_handlers
from handlers.types import Handler
from handlers.worker.error_text import short_error
from handlers.worker.ledger import Ledger, create_ledger
from handlers.worker.metrics import WorkerMetrics
from handlers.worker.observer import AttemptObserver
from handlers.worker.runner import HandlerRunner
from schemas.errors import PluginError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("pubrelay.handlers.worker")


class Worker:
    """Runs every handler's :class:`HandlerRunner` side by side until ``stop`` is set."""

    def __init__(
        self,
        handlers: Sequence[Handler],
        *,
        bus: Bus,
        ledger: Ledger,
        settings: WorkerSettings,
        topic_prefix: str,
        metrics_registry: CollectorRegistry,
        reconciler: Reconciler | None = None,
        reconcile_interval_s: float = 0.0,
        observer: AttemptObserver | None = None,
    ) -> None:
        names = [h.name for h in handlers]
        if len(set(names)) != len(names):
            raise PluginError(f"handler names must be unique, got {names}")
        self.handlers = list(handlers)
        self.bus = bus
        self.ledger = ledger
        self.settings = settings
        self.topic_prefix = topic_prefix
        self.metrics = WorkerMetrics(metrics_registry)
        self.metrics.declare(names)
        self.reconciler = reconciler
        self.reconcile_interval_s = reconcile_interval_s
        self.observer = observer

    async def run_until_stopped(self, stop: asyncio.Event) -> None:
        """Start the handlers, consume until ``stop`` is set, drain, commit, stop them."""
        started: list[Handler] = []
        try:
            await self._start_handlers(started)
            runners = [self._runner(handler, stop) for handler in self.handlers]
            log.info("worker_started", handlers=[h.name for h in self.handlers])
            if not runners:
                log.warning(
                    "worker_no_handlers",
                    hint=(
                        "events wait on the bus (for its retention): set "
                        "PUBRELAY_HANDLERS__ENABLED, e.g. '[\"email\"]', or try the e-mail "
                        "handler with --outbox"
                    ),
                )
                await stop.wait()
            async with asyncio.TaskGroup() as group:
                for runner in runners:
                    group.create_task(runner.run(), name=f"runner-{runner.name}")
                if self.reconciler is not None and self.reconcile_interval_s > 0:
                    recorder = next((r for r in runners if r.name == RECORDER_NAME), None)
                    group.create_task(
                        run_periodically(
                            self.reconciler,
                            self.reconcile_interval_s,
                            stop,
                            first_after=recorder.caught_up if recorder is not None else None,
                        ),
                        name="reconcile",
                    )
        finally:
            await self._stop_handlers(started)
            log.info("worker_finished")

    async def _start_handlers(self, started: list[Handler]) -> None:
        """Start each handler in order, adding it to ``started`` (what must be stopped)."""
        for handler in self.handlers:
            try:
                await handler.start()
            except Exception as err:
                raise PluginError(
                    f"handler {handler.name!r} failed to start: {type(err).__name__}: {err}"
                ) from err
            started.append(handler)

    def _runner(self, handler: Handler, stop: asyncio.Event) -> HandlerRunner:
        return HandlerRunner(
            handler,
            bus=self.bus,
            ledger=self.ledger,
            settings=self.settings,
            topic_prefix=self.topic_prefix,
            metrics=self.metrics,
            stop=stop,
            observer=self.observer,
        )

    @staticmethod
    async def _stop_handlers(started: Sequence[Handler]) -> None:
        """Stop the started handlers in reverse order; a failure is logged, not raised."""
        for handler in reversed(started):
            try:
                await handler.stop()
            except Exception as err:  # one failing stop must not keep others running
                log.error(
                    "handler_stop_failed",
                    handler=handler.name,
                    error_type=type(err).__name__,
                    error=short_error(err),
                )


@asynccontextmanager
async def open_worker(
    *,
    bus: Bus,
    handlers: HandlersSettings,
    worker: WorkerSettings,
    ledger: LedgerSettings,
    data_dir: Path,
    topic_prefix: str,
    metrics_registry: CollectorRegistry,
    env: Mapping[str, str] | None = None,
    voucherify: VoucherifySettings | None = None,
    reconcile: ReconcileSettings | None = None,
    observer: AttemptObserver | None = None,
) -> AsyncIterator[Worker]:
    """The worker of the enabled handlers, with its ledger open until the block ends.

    With a Voucherify key pair (``voucherify.configured``) the worker also runs the
    reconciliation recorder (:mod:`handlers.reconcile.recorder`, its own consumer group)
    with its store, and, when ``reconcile.interval_s`` > 0, a reconciliation every so often.
    ``observer`` hears every attempt's outcome (the console's event index).

    Raises :class:`schemas.errors.PluginError` / ``ConfigError`` before opening anything
    when a plugin is unknown, broken or misconfigured.
    """
    store = create_ledger(ledger, data_dir)
    built = build_handlers(
        handlers.enabled,
        data_dir=data_dir,
        metrics_registry=metrics_registry,
        topic_prefix=topic_prefix,
        env=env,
        ledger=store,
        max_attempts=worker.max_attempts,
    )
    reconcile = reconcile or ReconcileSettings()
    received = None
    if reconcile.interval_s > 0 and (voucherify is None or not voucherify.configured):
        log.warning(
            "reconcile_not_configured",
            message="PUBRELAY_RECONCILE__INTERVAL_S is set but PUBRELAY_VOUCHERIFY__APP_ID / "
            "APP_TOKEN are not: no reconciliation runs",
        )
    if voucherify is not None and voucherify.configured:
        received = create_store(ledger, reconcile, data_dir)
        built.append(ReceivedRecorder(received))
    await store.open()
    try:
        reconciler = None
        if received is not None and voucherify is not None:
            await received.open()
            reconciler = Reconciler(
                api=voucherify,
                settings=reconcile,
                store=received,
                bus=bus,
                topic_prefix=topic_prefix,
                metrics=ReconcileMetrics(metrics_registry),
            )
        yield Worker(
            built,
            bus=bus,
            ledger=store,
            settings=worker,
            topic_prefix=topic_prefix,
            metrics_registry=metrics_registry,
            reconciler=reconciler,
            reconcile_interval_s=reconcile.interval_s,
            observer=observer,
        )
    finally:
        if received is not None:
            await received.close()
        await store.close()


async def run_worker(
    *,
    bus: Bus,
    handlers: HandlersSettings,
    worker: WorkerSettings,
    ledger: LedgerSettings,
    data_dir: Path,
    topic_prefix: str,
    metrics_registry: CollectorRegistry,
    stop: asyncio.Event,
    env: Mapping[str, str] | None = None,
) -> None:
    """:func:`open_worker`, run until ``stop`` is set, close: the worker of a process."""
    async with open_worker(
        bus=bus,
        handlers=handlers,
        worker=worker,
        ledger=ledger,
        data_dir=data_dir,
        topic_prefix=topic_prefix,
        metrics_registry=metrics_registry,
        env=env,
    ) as running:
        await running.run_until_stopped(stop)
