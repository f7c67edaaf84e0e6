"""``GET /healthz`` and ``GET /readyz``, the same for every pubrelay app.

``/healthz``: the process is alive. ``/readyz``: the bus answers; a 503 says only that it
does not (the error is logged, never sent to unauthenticated clients).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import Counter

from bus.types import Bus
from schemas.errors import BusUnavailable

log = structlog.get_logger("pubrelay.consumer")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def readyz(bus: Bus, failures: Counter | None = None) -> Handler:
    """The ``/readyz`` handler: 200 while ``bus`` answers a ping, 503 otherwise.

    ``failures`` (the webhook app's ``pubrelay_bus_errors_total{operation="ping"}``)
    counts the pings that failed.
    """

    async def ready(_: web.Request) -> web.Response:
        try:
            await bus.ping()
        except BusUnavailable as err:
            if failures is not None:
                failures.inc()
            log.warning("readiness_failed", error=str(err))
            return web.json_response(
                {"status": "unavailable", "message": "the event store does not answer"},
                status=503,
            )
        return web.json_response({"status": "ready"})

    return ready
