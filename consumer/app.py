"""The consumer's aiohttp application factories.

:func:`create_app`: the webhook app (``POST /webhooks/voucherify``, see ``webhook.py``,
plus ``/healthz``, ``/readyz`` and ``/metrics``). :func:`create_ops_app`: ``/healthz``,
``/readyz`` and ``/metrics`` alone, for a process that runs only the worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.aiohttp import make_aiohttp_handler

from bus.types import Bus
from consumer.config import HttpSettings, WebhookSettings
from consumer.health import healthz, readyz
from consumer.metrics import WebhookMetrics
from consumer.signature import Verifier
from consumer.webhook import Intake


def create_app(
    *,
    bus: Bus,
    http: HttpSettings,
    webhook: WebhookSettings,
    secrets: Sequence[str],
    topic_prefix: str,
    publish_timeout_s: float,
    registry: CollectorRegistry,
) -> web.Application:
    """Build the webhook application on a started bus.

    The caller owns the bus's lifecycle: one bus per process, shared with the worker in
    ``pubrelay serve`` (see ``pubrelay/runtime.py``).
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
    )
    app = web.Application(client_max_size=http.max_body_bytes)
    app.router.add_post(webhook.path, intake.receive)
    _add_ops_routes(app, bus, registry, metrics.bus_errors.labels("ping"))
    return app


def create_ops_app(bus: Bus, registry: CollectorRegistry) -> web.Application:
    """``/healthz``, ``/readyz`` and ``/metrics`` for a worker-only process."""
    app = web.Application()
    _add_ops_routes(app, bus, registry)
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
