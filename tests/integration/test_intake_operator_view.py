"""What an operator reads from the intake: who was refused, and why an event was quarantined."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from ipaddress import ip_network
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.sqlite import SqliteBus
from tests.fixtures.app import event_body, signed_headers

URL = "/webhooks/voucherify"
ClientFactory = Callable[..., Any]
MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]


def request_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == "webhook_request"]


async def test_401_and_403_request_lines_name_the_client_address(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    body = event_body()
    open_app, _ = make_app(sqlite_bus)
    open_client = await aiohttp_client(open_app)
    guarded_app, _ = make_app(sqlite_bus, allowed_networks=[ip_network("34.247.197.22/32")])
    guarded_client = await aiohttp_client(guarded_app)

    with structlog.testing.capture_logs() as logs:
        unsigned = await open_client.post(URL, data=body, headers={"X-Forwarded-For": "10.9.8.7"})
        refused = await guarded_client.post(URL, data=body, headers=signed_headers(body))
        accepted = await open_client.post(URL, data=body, headers=signed_headers(body))

    assert (unsigned.status, refused.status, accepted.status) == (401, 403, 202)
    unauthorized, forbidden, ok = request_lines(logs)
    assert unauthorized["client"] == "127.0.0.1"
    assert unauthorized["forwarded_for"] == "10.9.8.7"
    assert forbidden["client"] == "127.0.0.1"
    assert "client" not in ok  # only refusals carry it


async def test_a_quarantined_answer_says_why(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    app, _ = make_app(sqlite_bus, max_event_age_s=60)
    client = await aiohttp_client(app)
    body = event_body()  # created in 2024: older than a minute
    response = await client.post(URL, data=body, headers=signed_headers(body))
    assert response.status == 202
    assert await response.json() == {
        "status": "quarantined",
        "reason": "stale",
        "message": "kept on the quarantine topic",
    }
