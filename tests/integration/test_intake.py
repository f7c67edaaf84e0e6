"""The webhook endpoint served on loopback, publishing to a real SQLite bus file."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from bus.sqlite import SqliteBus
from consumer.signature import sign
from pubrelay.settings import Settings
from schemas.record import header
from tests.fixtures.app import SECRET, event_body, read_topic, signed_headers

URL = "/webhooks/voucherify"
TOPIC = "voucherify.customer.publication.succeeded"
QUARANTINE = "voucherify.quarantine"

ClientFactory = Callable[..., Any]
MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> TestClient[Any, Any]:
    app, _ = make_app(sqlite_bus)
    result: TestClient[Any, Any] = await aiohttp_client(app)
    return result


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_signed_event_is_stored_with_key_headers_and_exact_bytes(
    client: TestClient[Any, Any], sqlite_bus: SqliteBus
) -> None:
    body = event_body(event_id="evcus_1", delivery_id="whs_1", customer_id="cust_42")

    response = await client.post(URL, data=body, headers=signed_headers(body))

    assert response.status == 202
    assert (await response.json())["status"] == "accepted"
    [record] = await read_topic(sqlite_bus, TOPIC)
    assert record.value == body
    assert record.key == b"cust_42"
    assert header(record.headers, "event-id") == b"evcus_1"
    assert header(record.headers, "event-type") == b"customer.publication.succeeded"
    assert header(record.headers, "delivery-id") == b"whs_1"
    received_at = header(record.headers, "received-at")
    assert received_at is not None
    assert datetime.fromisoformat(received_at.decode()) > datetime.now(UTC) - timedelta(minutes=1)
    assert header(record.headers, "x-voucherify-signature") == sign(SECRET, body).encode()
    envelope = json.loads(body)  # what the worker reads without parsing the body
    assert header(record.headers, "event-created-at") == envelope["event"]["created_at"].encode()
    assert (
        header(record.headers, "publication-id") == envelope["data"]["publication"]["id"].encode()
    )


async def test_pretty_printed_body_signed_over_its_compact_form_is_accepted(
    client: TestClient[Any, Any], sqlite_bus: SqliteBus
) -> None:
    pretty = event_body(indent=2)
    compact = json.dumps(json.loads(pretty), separators=(",", ":")).encode()
    headers = {"x-voucherify-signature": sign(SECRET, compact)}

    response = await client.post(URL, data=pretty, headers=headers)

    assert response.status == 202
    [record] = await read_topic(sqlite_bus, TOPIC)
    assert record.value == pretty  # stored as received, never re-serialised


async def test_any_of_several_secrets_is_accepted_during_rotation(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    app, _ = make_app(sqlite_bus, secrets=["old-secret", "new-secret"])
    client = await aiohttp_client(app)
    for secret in ("old-secret", "new-secret"):
        body = event_body()
        response = await client.post(URL, data=body, headers=signed_headers(body, secret))
        assert response.status == 202
    body = event_body()
    response = await client.post(URL, data=body, headers=signed_headers(body, "other"))
    assert response.status == 401
    assert len(await read_topic(sqlite_bus, TOPIC)) == 2


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-voucherify-signature": "0" * 64},
        {"x-voucherify-signature": "not-hex"},
        {"x-voucherify-signature": sign("wrong-secret", b"x")},
    ],
    ids=["missing", "zeros", "not-hex", "wrong-secret"],
)
async def test_bad_or_missing_signature_is_401_and_stores_nothing(
    aiohttp_client: ClientFactory,
    make_app: MakeApp,
    sqlite_bus: SqliteBus,
    headers: dict[str, str],
) -> None:
    app, registry = make_app(sqlite_bus)
    client = await aiohttp_client(app)

    response = await client.post(URL, data=event_body(), headers=headers)

    assert response.status == 401
    assert await read_topic(sqlite_bus, TOPIC) == []
    assert await read_topic(sqlite_bus, QUARANTINE) == []
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="unauthorized") == 1
    # A signature that matches no secret (a rotated secret) is told from none at all.
    mismatched = 1 if "x-voucherify-signature" in headers else 0
    assert metric(registry, "pubrelay_webhook_refused_total", guard="signature_mismatch") == (
        mismatched
    )


async def test_signature_over_a_tampered_body_is_rejected(
    client: TestClient[Any, Any], sqlite_bus: SqliteBus
) -> None:
    body = event_body()
    headers = signed_headers(body)
    tampered = body.replace(b"SPRING-2024-tPz", b"SPRING-2024-XXX")

    response = await client.post(URL, data=tampered, headers=headers)

    assert response.status == 401
    assert await read_topic(sqlite_bus, TOPIC) == []


async def test_body_over_the_limit_is_413_before_it_is_read(
    aiohttp_client: ClientFactory,
    make_app: MakeApp,
    sqlite_bus: SqliteBus,
    settings: Settings,
) -> None:
    app, registry = make_app(sqlite_bus)
    client = await aiohttp_client(app)
    limit = settings.http.max_body_bytes
    big = b'{"pad":"' + b"x" * limit + b'"}'

    response = await client.post(URL, data=io.BytesIO(big), headers=signed_headers(big))
    assert response.status == 413

    async def chunks() -> Any:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    response = await client.post(URL, data=chunks(), headers=signed_headers(big))
    assert response.status == 413

    # Only the headers, announcing one byte too many: the answer comes without a byte of
    # the body (a server waiting for it would answer 408 after BODY_READ_TIMEOUT_S).
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: pubrelay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {limit + 1}\r\nx-voucherify-signature: {sign(SECRET, big)}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    try:
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 413 "), status_line

    assert await read_topic(sqlite_bus, TOPIC) == []
    assert await read_topic(sqlite_bus, QUARANTINE) == []
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="too_large") == 3


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_webhook_path_are_405(
    client: TestClient[Any, Any], method: str
) -> None:
    response = await client.request(method, URL)
    assert response.status == 405


def _raw_payload() -> bytes:
    # A distribution set to send a "raw" payload: the data object without the envelope.
    return json.dumps(json.loads(event_body())["data"]).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"this is not json", "not_json"),
        (b'{"id": "whs_1", "event": ', "not_json"),
        (b'{"id":"\xff\xfe"}', "not_utf8"),
        (b'{"a":' + b"[" * 100 + b"]" * 100 + b"}", "too_deep"),
        (_raw_payload(), "no_envelope"),
        (
            b'{"id":"whs_1","event":{"id":"ev_1","type":"bad type/with slash"}}',
            "invalid_event_type",
        ),
    ],
    ids=["text", "truncated", "latin1", "deep", "raw-payload", "bad-type"],
)
async def test_signed_body_we_cannot_route_is_quarantined_and_counted(
    aiohttp_client: ClientFactory,
    make_app: MakeApp,
    sqlite_bus: SqliteBus,
    body: bytes,
    reason: str,
) -> None:
    app, registry = make_app(sqlite_bus)
    client = await aiohttp_client(app)

    response = await client.post(URL, data=body, headers=signed_headers(body))

    assert response.status == 202
    assert (await response.json())["status"] == "quarantined"
    [record] = await read_topic(sqlite_bus, QUARANTINE)
    assert record.value == body
    assert header(record.headers, "quarantine-reason") == reason.encode()
    assert await read_topic(sqlite_bus, TOPIC) == []
    assert metric(registry, "pubrelay_webhook_quarantined_total", reason=reason) == 1
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="quarantined") == 1


async def test_event_older_than_the_maximum_age_is_quarantined_as_stale(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    app, _ = make_app(sqlite_bus, max_event_age_s=3600.0)
    client = await aiohttp_client(app)
    old = event_body(event_id="evcus_old")  # the example's event is from 2024
    fresh_envelope = json.loads(event_body(event_id="evcus_new"))
    fresh_envelope["event"]["created_at"] = datetime.now(UTC).isoformat()
    fresh = json.dumps(fresh_envelope).encode()

    assert (await client.post(URL, data=old, headers=signed_headers(old))).status == 202
    assert (await client.post(URL, data=fresh, headers=signed_headers(fresh))).status == 202

    [stale] = await read_topic(sqlite_bus, QUARANTINE)
    assert header(stale.headers, "quarantine-reason") == b"stale"
    assert header(stale.headers, "event-id") == b"evcus_old"
    [accepted] = await read_topic(sqlite_bus, TOPIC)
    assert header(accepted.headers, "event-id") == b"evcus_new"


async def test_same_event_delivered_twice_is_stored_twice_with_one_event_id(
    client: TestClient[Any, Any], sqlite_bus: SqliteBus
) -> None:
    first = event_body(event_id="evcus_same", delivery_id="whs_a")
    retry = event_body(event_id="evcus_same", delivery_id="whs_b")

    for body in (first, retry):
        assert (await client.post(URL, data=body, headers=signed_headers(body))).status == 202

    records = await read_topic(sqlite_bus, TOPIC)
    assert [header(r.headers, "delivery-id") for r in records] == [b"whs_a", b"whs_b"]
    assert {header(r.headers, "event-id") for r in records} == {b"evcus_same"}


async def test_stalled_bus_answers_503_with_retry_after_and_keeps_nothing(
    aiohttp_client: ClientFactory,
    make_app: MakeApp,
    sqlite_bus: SqliteBus,
    settings: Settings,
) -> None:
    app, registry = make_app(sqlite_bus)
    client = await aiohttp_client(app)
    stalled = event_body(event_id="evcus_stalled")
    # Another connection holds the write lock: the bus cannot commit.
    blocker = sqlite3.connect(settings.sqlite_bus_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        response = await client.post(URL, data=stalled, headers=signed_headers(stalled))
        assert response.status == 503
        assert response.headers["Retry-After"] == "30"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    later = event_body(event_id="evcus_later")
    assert (await client.post(URL, data=later, headers=signed_headers(later))).status == 202
    records = await read_topic(sqlite_bus, TOPIC)
    assert [header(r.headers, "event-id") for r in records] == [b"evcus_later"]
    assert metric(registry, "pubrelay_webhook_requests_total", outcome="unavailable") == 1
    assert metric(registry, "pubrelay_bus_errors_total", operation="publish") == 1
    # The publish that timed out is timed too, beside the one acknowledged.
    assert metric(registry, "pubrelay_bus_publish_duration_seconds_count") == 2
    assert metric(registry, "pubrelay_bus_publish_duration_seconds_bucket", le="0.25") == 1


async def test_closed_bus_answers_503_and_readyz_reports_it(
    aiohttp_client: ClientFactory, make_app: MakeApp, settings: Settings
) -> None:
    bus = SqliteBus(settings.sqlite_bus_path, publish_timeout_s=0.5)
    await bus.start()
    app, _ = make_app(bus)
    client = await aiohttp_client(app)
    assert (await client.get("/readyz")).status == 200
    await bus.close()

    body = event_body()
    response = await client.post(URL, data=body, headers=signed_headers(body))

    assert response.status == 503
    assert "Retry-After" in response.headers
    assert (await client.get("/readyz")).status == 503
    assert (await client.get("/healthz")).status == 200


async def test_restart_keeps_every_accepted_event_and_none_that_was_refused(
    aiohttp_client: ClientFactory, make_app: MakeApp, settings: Settings
) -> None:
    bus = SqliteBus(settings.sqlite_bus_path, publish_timeout_s=0.3)
    await bus.start()
    app, _ = make_app(bus)
    client = await aiohttp_client(app)
    accepted: list[bytes] = []
    refused: list[bytes] = []
    blocker = sqlite3.connect(settings.sqlite_bus_path, isolation_level=None)
    for n in range(30):
        if n == 10:
            blocker.execute("BEGIN EXCLUSIVE")
        if n == 15:
            blocker.execute("ROLLBACK")
        body = event_body(event_id=f"evcus_r{n}")
        response = await client.post(URL, data=body, headers=signed_headers(body))
        assert response.status in (202, 503)
        (accepted if response.status == 202 else refused).append(f"evcus_r{n}".encode())
    blocker.close()
    await client.close()
    await bus.close()

    reopened = SqliteBus(settings.sqlite_bus_path)
    await reopened.start()
    try:
        stored = [header(r.headers, "event-id") for r in await read_topic(reopened, TOPIC)]
    finally:
        await reopened.close()
    assert len(refused) == 5
    assert stored == accepted


async def test_allowlist_refuses_other_source_addresses(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    only_voucherify = [ip_network("34.247.197.22/32")]
    app, _ = make_app(sqlite_bus, allowed_networks=only_voucherify)
    client = await aiohttp_client(app)
    body = event_body()
    assert (await client.post(URL, data=body, headers=signed_headers(body))).status == 403

    app, _ = make_app(sqlite_bus, allowed_networks=[ip_network("127.0.0.0/8")])
    client = await aiohttp_client(app)
    assert (await client.post(URL, data=body, headers=signed_headers(body))).status == 202


async def test_metrics_endpoint_exposes_outcomes_and_publish_latency(
    client: TestClient[Any, Any],
) -> None:
    body = event_body()
    await client.post(URL, data=body, headers=signed_headers(body))
    await client.post(URL, data=body)

    text = await (await client.get("/metrics")).text()

    assert 'pubrelay_webhook_requests_total{outcome="accepted"} 1.0' in text
    assert 'pubrelay_webhook_requests_total{outcome="unauthorized"} 1.0' in text
    assert "pubrelay_bus_publish_duration_seconds_count 1.0" in text


async def test_unsigned_requests_pass_only_with_the_loud_flag(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    body = event_body(event_id="evcus_unsigned")
    strict, _ = make_app(sqlite_bus)
    assert (await (await aiohttp_client(strict)).post(URL, data=body)).status == 401

    app, _ = make_app(sqlite_bus, secrets=[], allow_unsigned=True)
    response = await (await aiohttp_client(app)).post(URL, data=body)

    assert response.status == 202
    [record] = await read_topic(sqlite_bus, TOPIC)
    assert header(record.headers, "event-id") == b"evcus_unsigned"


async def test_hostile_unsigned_body_is_refused_without_stalling_the_server(
    client: TestClient[Any, Any],
) -> None:
    # An opened string full of escaped quotes once cost the whitespace fallback quadratic
    # time: about an hour of a blocked event loop for 1 MB, with no secret needed.
    hostile = b'"' + b'\\"' * 500_000
    response = await client.post(URL, data=hostile, headers={"x-voucherify-signature": "0" * 64})
    assert response.status == 401
    assert (await client.get("/healthz")).status == 200


async def test_allowlist_trusts_only_the_address_our_proxy_appended(
    aiohttp_client: ClientFactory, make_app: MakeApp, sqlite_bus: SqliteBus
) -> None:
    voucherify = [ip_network("34.247.197.22/32")]
    app, _ = make_app(sqlite_bus, allowed_networks=voucherify, trust_forwarded_for=True)
    client = await aiohttp_client(app)
    body = event_body()

    spoofed = {**signed_headers(body), "X-Forwarded-For": "34.247.197.22, 6.6.6.6"}
    assert (await client.post(URL, data=body, headers=spoofed)).status == 403
    real = {**signed_headers(body), "X-Forwarded-For": "6.6.6.6, 34.247.197.22"}
    assert (await client.post(URL, data=body, headers=real)).status == 202
    mapped = {**signed_headers(body), "X-Forwarded-For": "::ffff:34.247.197.22"}
    assert (await client.post(URL, data=body, headers=mapped)).status == 202


async def test_odd_header_bytes_never_turn_a_request_into_a_500(
    client: TestClient[Any, Any], sqlite_bus: SqliteBus
) -> None:
    # Raw bytes on the wire: aiohttp's client would refuse to send them.
    body = b"not json at all"
    signature = sign(SECRET, body).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: text/\xff\r\nX-Request-Id: \xfe\xff\r\n"
        b"x-voucherify-signature: " + signature + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()

    assert status_line.split()[1] == b"202"
    [kept] = await read_topic(sqlite_bus, QUARANTINE)
    assert header(kept.headers, "content-type") == b"text/\xff"


async def test_readyz_does_not_publish_internal_details(
    aiohttp_client: ClientFactory, make_app: MakeApp, settings: Settings
) -> None:
    bus = SqliteBus(settings.sqlite_bus_path)
    await bus.start()
    app, _ = make_app(bus)
    client = await aiohttp_client(app)
    await bus.close()
    response = await client.get("/readyz")
    assert response.status == 503
    assert str(settings.sqlite_bus_path) not in await response.text()


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/no-such-page"])
async def test_answers_name_pubrelay_but_no_versions(
    client: TestClient[Any, Any], path: str
) -> None:
    response = await client.get(path)
    assert response.headers["Server"] == "pubrelay"  # not "Python/3.11 aiohttp/3.x"
