"""Wiring of the long-running processes: webhook consumer, worker, or both.

One bus per process, shared by the web app and the worker; every resource is started
before the process reports ready and closed in reverse order on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import importlib.metadata
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bus import create_bus
from bus.sqlite.owner import consuming
from bus.types import Bus
from consumer.app import INTAKE, create_app, create_ops_app, runner_options
from consumer.http1 import WebhookServer
from handlers.worker.service import open_worker
from pubrelay.console_runtime import open_console
from pubrelay.console_token import console_url
from pubrelay.data_dir_metrics import DataDirSpace
from pubrelay.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, EXIT_WORKER_FAILED
from pubrelay.logging import log_line
from pubrelay.loop_watch import LoopWatch
from pubrelay.secrets import resolve_secrets
from pubrelay.settings import Settings
from schemas.errors import BusUnavailable, PubrelayError
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED
from schemas.topics import quarantine_topic, topic_for

log = structlog.get_logger("pubrelay")


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors and
    ``pubrelay_build_info{version}``; injected everywhere.

    Without the ``*_created`` series: a timestamp per counter and histogram series
    (hundreds of them) that no dashboard or alert here reads (README "Observability").
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client lacks the annotation
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build_info = Gauge(
        "pubrelay_build_info",
        "The running pubrelay's version, as a label; the value is always 1.",
        ["version"],
        registry=registry,
    )
    build_info.labels(_version()).set(1)
    return registry


def _version() -> str:
    try:
        return importlib.metadata.version("pubrelay")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


SWITCH_INTERVAL_S: Final = 0.0005

# glibc's mallopt(3) parameters (malloc.h) and the values tune_malloc sets.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD_BYTES: Final = 4 << 20
TRIM_THRESHOLD_BYTES: Final = 8 << 20
_MALLOC_ENV: Final = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc() -> bool:
    """Keep buffers of up to 4 MiB on the heap, and up to 8 MiB of freed heap, so that a
    Kafka produce request of a few hundred KB does not map fresh pages each time.

    glibc serves allocations above its (adaptive) mmap threshold with a mapping of their
    own and gives the heap's freed top back to the kernel above its trim threshold, so
    each such request, and each of its copies, faulted its pages in anew: at 64 records a
    batch 1.5 page faults a record, 12-16% of the Kafka path's CPU
    (docs/performance.md, "Page faults of large batches"). True when set; False on a C
    library without ``mallopt`` (musl, macOS) or when the environment tunes glibc's
    malloc itself (``GLIBC_TUNABLES``, ``MALLOC_*_THRESHOLD_``), which is left to rule.
    """
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    set_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    set_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(set_mmap and set_trim)


def tune_runtime() -> None:
    """Fewer gen-0 collections and a frozen start-up heap remove the 35-45 ms full
    collections that dominated p99 under load; a shorter GIL switch interval lets the
    SQLite threads (the bus's writer and reader, the ledger's reads) take the GIL back
    within 0.5 ms of a call rather than 5 ms while the event loop is busy; glibc's malloc
    keeps large buffers on the heap (:func:`tune_malloc`) (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    tune_malloc()


@asynccontextmanager
async def started_bus(settings: Settings, *, webhook: bool) -> AsyncIterator[Bus]:
    bus = create_bus(settings.bus, settings.sqlite_bus_path)
    await bus.start()
    try:
        if webhook:
            prefix = settings.bus.topic_prefix
            await bus.ensure_topics(
                [topic_for(prefix, CUSTOMER_PUBLICATION_SUCCEEDED), quarantine_topic(prefix)]
            )
        yield bus
    finally:
        await bus.close()


async def run(
    settings: Settings,
    *,
    webhook: bool,
    worker: bool,
    console: bool = False,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code. ``console``: serve the
    console with a generated token when none is configured (``make run``); ``env``: the
    handlers' variables instead of the environment's (``pubrelay/outbox_run.py``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    secrets: list[str] = []
    if webhook:
        if settings.webhook.allow_unsigned:
            log.warning(
                "signature_checks_disabled",
                message="PUBRELAY_WEBHOOK__ALLOW_UNSIGNED is set: ANYONE can post events",
            )
        else:
            # A generated secret is for trying pubrelay on one machine: on Kafka, webhook
            # processes verify Voucherify's own, configured secret.
            secrets = resolve_secrets(settings, generate=settings.bus.kind == "sqlite")
    registry = new_registry()
    DataDirSpace(settings.data_dir, registry)
    watch = LoopWatch(registry)

    async with AsyncExitStack() as stack:
        stack.callback(watch.stop)  # the first in, the last out: it watches the shutdown too
        if worker and settings.bus.kind == "sqlite":
            # One consuming process per embedded bus (data directory): a second one stops
            # here with BusInUse (exit 2). Webhook-only processes may run side by side.
            stack.enter_context(consuming(settings.sqlite_bus_path))
        try:
            bus = await stack.enter_async_context(started_bus(settings, webhook=webhook))
        except BusUnavailable as err:
            log.error("bus_unavailable_at_start", error=str(err))
            return EXIT_UNAVAILABLE

        parts = await stack.enter_async_context(
            open_console(settings, bus, registry, generate_token=console)
        )
        runner = None
        if worker:
            # Plugins are loaded before anything listens: a bad one stops start-up.
            runner = await stack.enter_async_context(
                open_worker(
                    bus=bus,
                    handlers=settings.handlers,
                    worker=settings.worker,
                    ledger=settings.ledger,
                    data_dir=settings.data_dir,
                    topic_prefix=settings.bus.topic_prefix,
                    metrics_registry=registry,
                    voucherify=settings.voucherify,
                    reconcile=settings.reconcile,
                    observer=parts.recorder if parts else None,
                    env=env,
                )
            )

        if webhook:
            app = create_app(
                bus=bus,
                http=settings.http,
                webhook=settings.webhook,
                secrets=secrets,
                topic_prefix=settings.bus.topic_prefix,
                publish_timeout_s=settings.bus.publish_timeout_s,
                registry=registry,
                observer=parts.recorder if parts else None,
                console=parts.app if parts else None,
                write_line=log_line,
            )
        else:
            app = create_ops_app(bus, registry, console=parts.app if parts else None)
        web_runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=settings.http.shutdown_timeout_s,
            **runner_options(settings.http),
        )
        await web_runner.setup()
        stack.push_async_callback(web_runner.cleanup)
        # No SO_REUSEPORT: a second process on the same port must fail, not share it.
        try:
            await _listen(settings, app, web_runner, stack, webhook=webhook)
        except OSError as err:  # before the worker consumed anything
            log.error(
                "listen_failed",
                host=settings.http.host,
                port=settings.http.port,
                error=str(err),
                hint=_listen_hint(settings, err),
            )
            return EXIT_CONFIG
        worker_task = None
        if runner is not None:
            worker_task = asyncio.create_task(runner.run_until_stopped(stop), name="worker")

        log.info(
            "listening",
            url=f"http://{settings.http.host}:{settings.http.port}"
            + (settings.webhook.path if webhook else "/metrics"),
            bus=settings.bus.kind,
            webhook=webhook,
            worker=worker,
            handlers=settings.handlers.enabled if worker else [],
        )
        if parts is not None:
            log.info("console", url=console_url(settings.http.host, settings.http.port))
        tune_runtime()
        watch.start()  # from here on, until stopped: start-up's imports may take seconds
        code = await _wait(stop, worker_task)
        log.info("stopping")
    log.info("stopped")
    return code


def _listen_hint(settings: Settings, err: OSError) -> str:
    """What to do about a port that could not be listened on."""
    where = f"{settings.http.host}:{settings.http.port}"
    if err.errno == errno.EADDRINUSE:
        return (
            f"{where} is in use by another process: stop it, or set PUBRELAY_HTTP__PORT "
            "to a free port"
        )
    if err.errno == errno.EACCES:
        return f"{where} needs privileges this process lacks: set PUBRELAY_HTTP__PORT above 1023"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"no interface of this host has {settings.http.host}: check PUBRELAY_HTTP__HOST"
    return f"check PUBRELAY_HTTP__HOST and PUBRELAY_HTTP__PORT ({where})"


async def _listen(
    settings: Settings,
    app: web.Application,
    web_runner: web.AppRunner,
    stack: AsyncExitStack,
    *,
    webhook: bool,
) -> None:
    """Listen on the HTTP port (an ``OSError`` when that fails). The webhook process serves
    its webhook requests on its own HTTP layer (:mod:`consumer.http1`), which hands every
    other connection to aiohttp; a worker-only process listens with aiohttp alone."""
    assert web_runner.server is not None
    http = settings.http
    if not webhook:
        await web.TCPSite(web_runner, http.host, http.port).start()
        return
    front = WebhookServer(app[INTAKE], web_runner.server, path=settings.webhook.path, http=http)
    listener = await asyncio.get_running_loop().create_server(
        front, http.host, http.port, backlog=128
    )

    async def stop_listening() -> None:
        listener.close()
        await front.shutdown(http.shutdown_timeout_s)

    stack.push_async_callback(stop_listening)


async def _wait(stop: asyncio.Event, worker_task: asyncio.Task[None] | None) -> int:
    """Until a signal, or until the worker ends on its own (a failure)."""
    stopped = asyncio.create_task(stop.wait())
    waiting: list[asyncio.Task[Any]] = [stopped]
    if worker_task is not None:
        waiting.append(worker_task)
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    stopped.cancel()
    if worker_task is None:
        return EXIT_OK
    try:
        await worker_task
    except PubrelayError as err:
        log.error("worker_failed", error=str(err))
        return EXIT_WORKER_FAILED
    except Exception:  # a bug (or an ExceptionGroup from its task group): say so, exit 4
        log.exception("worker_failed")
        return EXIT_WORKER_FAILED
    return EXIT_OK
