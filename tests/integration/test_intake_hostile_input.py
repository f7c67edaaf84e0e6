"""Input an attacker or an odd upstream sends, against the app served on loopback: bodies
that make the signature check expensive, forged ``X-Forwarded-For`` lines (on raw
sockets, since HTTP clients merge repeated headers), lone surrogate escapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.sqlite import SqliteBus
from consumer.signature import MAX_NORMALISED_TOKENS, sign
from schemas.record import header
from tests.fixtures.app import SECRET, ServeApp, event_body, read_topic, signed_headers
from tests.fixtures.hostile import hostile_bodies

URL = "/webhooks/voucherify"
TOPIC = "voucherify.customer.publication.succeeded"
QUARANTINE = "voucherify.quarantine"
VOUCHERIFY_EU1 = [ip_network(a) for a in ("34.247.197.22", "63.32.191.141", "52.215.148.84")]
MIB = 1024 * 1024

MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def serve(
    app_server: ServeApp, make_app: MakeApp, bus: SqliteBus, **webhook: Any
) -> tuple[int, CollectorRegistry]:
    app, registry = make_app(bus, **webhook)
    server = await app_server(app)
    assert server.port is not None
    return server.port, registry


# --- 1. what an unauthenticated body may cost -------------------------------------------------


def pretty_event(tags: int) -> tuple[bytes, bytes]:
    """A pretty-printed event holding ``tags`` extra strings, and its compact form."""
    envelope = json.loads(event_body())
    envelope["data"]["customer"]["metadata"]["tags"] = [f"tag {i}" for i in range(tags)]
    compact = json.dumps(envelope, separators=(",", ":")).encode()
    return json.dumps(envelope, indent=2).encode(), compact


async def test_a_pretty_body_past_the_bound_is_refused_without_the_compact_check_and_counted(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    port, registry = await serve(app_server, make_app, sqlite_bus)
    small_pretty, small_compact = pretty_event(tags=100)
    large_pretty, large_compact = pretty_event(tags=MAX_NORMALISED_TOKENS // 2)
    assert large_pretty.count(b'"') > MAX_NORMALISED_TOKENS

    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:

        async def post(body: bytes, signed_over: bytes) -> int:
            signature = {"x-voucherify-signature": sign(SECRET, signed_over)}
            async with client.post(URL, data=body, headers=signature) as response:
                return response.status

        assert await post(small_pretty, small_compact) == 202
        assert await post(large_pretty, large_compact) == 401
        assert await post(large_pretty, large_pretty) == 202  # signed as received: no bound

    assert [r.value for r in await read_topic(sqlite_bus, TOPIC)] == [small_pretty, large_pretty]
    refused = metric(registry, "pubrelay_webhook_refused_total", guard="signature_fallback_skipped")
    assert refused == 1


async def test_deliveries_get_their_202_while_four_clients_post_1_mib_bogus_signed_bodies(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    port, registry = await serve(app_server, make_app, sqlite_bus)
    hostile = list(hostile_bodies(MIB).values())
    bogus = {"x-voucherify-signature": "0" * 64}

    async def attacker() -> list[int]:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            statuses = []
            for body in hostile:
                async with client.post(URL, data=body, headers=bogus) as response:
                    statuses.append(response.status)
            return statuses

    async def deliveries() -> list[int]:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            statuses = []
            for _ in range(5):
                body = event_body()
                async with client.post(URL, data=body, headers=signed_headers(body)) as response:
                    statuses.append(response.status)
            return statuses

    async with asyncio.timeout(60):  # only against a hang: the outcome is what is asserted
        *attacks, delivered = await asyncio.gather(*(attacker() for _ in range(4)), deliveries())

    assert delivered == [202] * 5
    assert attacks == [[401] * len(hostile)] * 4
    assert len(await read_topic(sqlite_bus, TOPIC)) == 5
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="unauthorized") == 4 * len(
        hostile
    )


# --- 3. X-Forwarded-For, every line of it ---------------------------------------------------------


async def raw_post(port: int, forwarded_for: list[str]) -> int:
    """POST a signed event with one ``X-Forwarded-For`` line per entry of ``forwarded_for``,
    written as raw bytes on a socket; the answer's status."""
    body = event_body()
    lines = [
        f"POST {URL} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"x-voucherify-signature: {sign(SECRET, body)}",
        *(f"X-Forwarded-For: {value}" for value in forwarded_for),
        "Connection: close",
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def test_a_forwarded_for_line_of_the_clients_own_cannot_choose_its_address(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    port, registry = await serve(
        app_server,
        make_app,
        sqlite_bus,
        allowed_networks=VOUCHERIFY_EU1,
        trust_forwarded_for=True,
    )
    # The client sends a Voucherify address; our proxy (HAProxy `option forwardfor`) adds a
    # line of its own with the address it saw.
    assert await raw_post(port, ["34.247.197.22", "6.6.6.6"]) == 403
    assert await raw_post(port, ["34.247.197.22, 52.215.148.84", "6.6.6.6"]) == 403
    # Voucherify itself, whatever it sent before.
    assert await raw_post(port, ["6.6.6.6", "34.247.197.22"]) == 202
    assert await raw_post(port, ["34.247.197.22"]) == 202
    assert len(await read_topic(sqlite_bus, TOPIC)) == 2
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="forbidden") == 2


async def test_behind_two_proxies_the_client_is_the_second_entry_from_the_right(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    port, registry = await serve(
        app_server,
        make_app,
        sqlite_bus,
        allowed_networks=VOUCHERIFY_EU1,
        trust_forwarded_for=True,
        trusted_proxy_hops=2,
    )
    # The outer proxy appends the client's address, the inner one the outer's (10.0.0.5).
    assert await raw_post(port, ["6.6.6.6", "34.247.197.22", "10.0.0.5"]) == 202
    assert await raw_post(port, ["6.6.6.6, 34.247.197.22", "10.0.0.5"]) == 202
    assert await raw_post(port, ["34.247.197.22", "6.6.6.6", "10.0.0.5"]) == 403
    # Only one entry: the request did not come through both proxies.
    assert await raw_post(port, ["34.247.197.22"]) == 403
    assert metric(registry, "pubrelay_webhook_refused_total", guard="forwarded_for") == 1
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="forbidden") == 2
    assert len(await read_topic(sqlite_bus, TOPIC)) == 2


# --- 5. valid JSON the decoders refuse: lone surrogate escapes ------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"Jack \\ud83d", b"\\ude00 Jack", b"Jack \\ud83d\\ud83d\\ude00"],
    ids=["lone-high", "lone-low", "lone-high-then-a-pair"],
)
async def test_a_lone_surrogate_in_the_customer_name_is_routed_on_its_event_topic(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus, name: bytes
) -> None:
    port, registry = await serve(app_server, make_app, sqlite_bus)
    body = event_body(event_id="evcus_s1", customer_id="cust_s1")
    body = body.replace(b'"name":"Jack Webhook"', b'"name":"' + name + b'"')
    assert name in body

    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client,
        client.post(URL, data=body, headers=signed_headers(body)) as response,
    ):
        assert response.status == 202
        assert (await response.json())["status"] == "accepted"

    [record] = await read_topic(sqlite_bus, TOPIC)
    assert record.value == body  # byte for byte, the escape included
    assert record.key == b"cust_s1"
    assert header(record.headers, "event-id") == b"evcus_s1"
    assert await read_topic(sqlite_bus, QUARANTINE) == []
    assert metric(registry, "pubrelay_webhook_quarantined_total", reason="not_json") == 0
