"""The consumer's aiohttp application factories.

:func:`create_app`: the webhook app (``POST /webhooks/voucherify``, see ``webhook.py``,
plus ``/healthz``, ``/readyz`` and ``/metrics``). :func:`create_ops_app`: ``/healthz``,
``/readyz`` and ``/metrics`` alone, for a process that runs only the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.aiohttp import make_aiohttp_handler

from bus.types import Bus
from consumer.config import HttpSettings, WebhookSettings
from consumer.health import healthz, readyz
from consumer.metrics import WebhookMetrics
from consumer.observer import IntakeObserver
from consumer.signature import Verifier
from consumer.webhook import Intake, WriteLine

INTAKE: Final = web.AppKey("intake", Intake)
"""The webhook application's :class:`Intake` (its own HTTP layer serves it too:
:mod:`consumer.http1`)."""

CONSOLE_PREFIX: Final = "/console/"
"""Where the operator console is mounted (``pubrelay/console/app.py``)."""


def create_app(
    *,
    bus: Bus,
    http: HttpSettings,
    webhook: WebhookSettings,
    secrets: Sequence[str],
    topic_prefix: str,
    publish_timeout_s: float,
    registry: CollectorRegistry,
    observer: IntakeObserver | None = None,
    console: web.Application | None = None,
    write_line: WriteLine | None = None,
) -> web.Application:
    """Build the webhook application on a started bus.

    The caller owns the bus's lifecycle: one bus per process, shared with the worker in
    ``pubrelay serve`` (see ``pubrelay/runtime.py``). ``observer`` hears every verified
    request (the console's event index); ``console`` is mounted at ``/console/``;
    ``write_line`` writes the request lines (``consumer.webhook.WriteLine``).
    """
    metrics = WebhookMetrics(registry)
    intake = Intake(
        bus=bus,
        webhook=webhook,
        verifier=Verifier(secrets),
        topic_prefix=topic_prefix,
        publish_timeout_s=publish_timeout_s,
        max_body_bytes=http.max_body_bytes,
        metrics=metrics,
        body_read_timeout_s=http.body_read_timeout_s,
        max_concurrent_bodies=http.max_concurrent_bodies,
        max_concurrent_large_bodies=http.max_concurrent_large_bodies,
        observer=observer,
        write_line=write_line,
    )
    app = web.Application(client_max_size=http.max_body_bytes)
    app[INTAKE] = intake
    app.router.add_post(webhook.path, intake.receive)
    _add_ops_routes(app, bus, registry, metrics.bus_errors.labels("ping"))
    if console is not None:
        app.add_subapp(CONSOLE_PREFIX, console)
    return app


# After answering a request whose body it did not read to the end (413, 408, 503 busy),
# the server reads and drops what the client still sends for this long, so a client that is
# still sending sees the answer rather than a reset; then it closes the connection. A client
# that sends nothing more is held that long at the cost of an idle connection: a stalled
# client that reconnects once closed costs far more (the bench's attack section: 5 s
# instead of 2 s halved the reconnections, the CPU they cost and the memory peak).
LINGERING_S: Final = 5.0


def runner_options(http: HttpSettings, *, lingering_s: float = LINGERING_S) -> dict[str, Any]:
    """Keyword arguments of ``web.AppRunner`` that bound what an idle or slow client holds.

    ``keepalive_timeout`` closes a connection idle for that long, and also one whose request
    headers are not complete by then (aiohttp starts that clock when the connection opens
    and after each answer); the body's own deadline is ``BODY_READ_TIMEOUT_S``. The header
    limits bound what a connection holds before its request is complete: about
    ``2 x max_headers x max_field_size`` (512 KiB with the defaults; aiohttp's own allow
    4 MiB).
    """
    return {
        "keepalive_timeout": http.keepalive_timeout_s,
        "lingering_time": lingering_s,
        "max_headers": http.max_headers,
        "max_field_size": http.max_header_bytes,
    }


def create_ops_app(
    bus: Bus, registry: CollectorRegistry, console: web.Application | None = None
) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` for a worker-only process, and the
    console at ``/console/`` when given."""
    app = web.Application()
    _add_ops_routes(app, bus, registry)
    if console is not None:
        app.add_subapp(CONSOLE_PREFIX, console)
    return app


def _add_ops_routes(
    app: web.Application,
    bus: Bus,
    registry: CollectorRegistry,
    ping_failures: Counter | None = None,
) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz(bus, ping_failures))
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.on_response_prepare.append(_plain_server_header)


async def _plain_server_header(_: web.Request, response: web.StreamResponse) -> None:
    """``Server: pubrelay``, as the webhook's own HTTP layer says, rather than aiohttp's
    ``Python/3.11 aiohttp/3.x``: the versions are nobody's business on the network."""
    response.headers["Server"] = "pubrelay"
