"""Clients that send slowly or not at all, against the app served on loopback with the
server options of production (``consumer.app.runner_options``), on raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from bus.sqlite import SqliteBus
from consumer.config import HttpSettings
from tests.fixtures.app import Front, ServeApp, event_body, read_topic, signed_headers

URL = "/webhooks/voucherify"
TOPIC = "voucherify.customer.publication.succeeded"
BOGUS = "0" * 64
# Generous bounds for "within the deadline": they only fail when nothing ever happens.
MARGIN_S = 4.0
LINGERING_S = 1.0  # production's 5 s, shortened to keep the suite fast

MakeApp = Callable[..., tuple[web.Application, CollectorRegistry]]


@dataclass
class Served:
    server: TestServer | Front
    registry: CollectorRegistry
    http: HttpSettings

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_receiving(self, size: str, count: int) -> None:
        """Until the server is receiving ``count`` bodies (bounded: 5 s)."""
        for _ in range(500):
            if self.metric("pubrelay_webhook_bodies_receiving", size=size) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the server never received {count} {size} bodies at once")


@pytest.fixture
def serve(
    app_server: ServeApp, make_app: MakeApp, sqlite_bus: SqliteBus
) -> Callable[..., Awaitable[Served]]:
    async def start(**http: Any) -> Served:
        app, registry = make_app(sqlite_bus, http=http)
        settings = HttpSettings.model_validate(http)
        server = await app_server(app, settings, lingering_s=LINGERING_S)
        return Served(server, registry, settings)

    return start


class Staller:
    """A client that sends its headers and part of its body, then nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, sent: int, chunked: bool = True) -> Staller:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"x-voucherify-signature: {BOGUS}\r\n"
        )
        if chunked:
            head += "Transfer-Encoding: chunked\r\n\r\n"
            writer.write(head.encode() + f"{sent:x}\r\n".encode() + b" " * sent + b"\r\n")
        else:
            head += f"Content-Length: {sent * 2}\r\n\r\n"
            writer.write(head.encode() + b" " * sent)
        await writer.drain()
        return cls(reader, writer)

    async def answer(self, within_s: float) -> tuple[int, bytes]:
        """The status and head of the answer, which must come within ``within_s``."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), within_s)
        return int(head.split()[1]), head

    async def closed(self, within_s: float) -> bool:
        """True once the server closed the connection (bounded by ``within_s``)."""
        await asyncio.wait_for(self.reader.read(), within_s)  # everything, up to EOF
        return self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def stallers() -> AsyncIterator[list[Staller]]:
    opened: list[Staller] = []
    yield opened
    await asyncio.gather(*(s.close() for s in opened))


async def test_body_that_stops_arriving_is_cut_at_the_deadline_and_its_connection_closed(
    serve: Callable[..., Awaitable[Served]], stallers: list[Staller]
) -> None:
    served = await serve(body_read_timeout_s=1.0)
    # Pre-created at zero, like every outcome and guard.
    assert served.metric("pubrelay_webhook_requests_total", outcome="body_timeout") == 0
    assert (
        served.registry.get_sample_value(
            "pubrelay_webhook_refused_total", {"guard": "body_read_timeout"}
        )
        == 0
    )
    # The review's case: a chunked body that stops after 512 KiB; and a small declared one.
    stallers += [
        await Staller.open(served.port, sent=512 * 1024),
        await Staller.open(served.port, sent=100, chunked=False),
    ]

    for staller in stallers:
        status, head = await staller.answer(within_s=1.0 + MARGIN_S)
        assert status == 408
        assert b"Connection: close" in head
        assert await staller.closed(within_s=LINGERING_S + MARGIN_S)
    assert served.metric("pubrelay_webhook_requests_total", outcome="body_timeout") == 2
    assert served.metric("pubrelay_webhook_refused_total", guard="body_read_timeout") == 2
    assert served.metric("pubrelay_webhook_bodies_receiving", size="any") == 0


async def test_cap_on_bodies_being_received_refuses_at_once_with_503_busy(
    serve: Callable[..., Awaitable[Served]], stallers: list[Staller]
) -> None:
    served = await serve(
        body_read_timeout_s=2.0, max_concurrent_bodies=4, max_concurrent_large_bodies=2
    )
    url = f"http://127.0.0.1:{served.port}{URL}"
    large = b'{"pad":"' + b"x" * (100 * 1024) + b'"}'
    stallers += [await Staller.open(served.port, sent=200 * 1024) for _ in range(2)]
    await served.wait_receiving("large", 2)

    async with aiohttp.ClientSession() as session:
        # Every large-body slot is held: one more large body is refused before the deadline.
        async with session.post(url, data=large, headers={"x-voucherify-signature": BOGUS}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "30"
            assert (await r.json())["status"] == "busy"
        # A delivery of the usual size needs no large-body slot.
        body = event_body()
        async with session.post(url, data=body, headers=signed_headers(body)) as r:
            assert r.status == 202

        # Every slot of any size is held: a small body still arriving is refused, at once;
        # one that arrived whole with its headers holds nothing more and is taken.
        stallers += [await Staller.open(served.port, sent=100, chunked=False) for _ in range(2)]
        await served.wait_receiving("any", 4)
        late = await Staller.open(served.port, sent=100, chunked=False)
        assert (await late.answer(within_s=MARGIN_S))[0] == 503
        await late.close()
        async with session.post(url, data=body, headers=signed_headers(body)) as r:
            assert r.status == 202

        # Cut at the deadline, the stalled clients give their slots back.
        for staller in stallers:
            assert (await staller.answer(within_s=2.0 + MARGIN_S))[0] == 408
        async with session.post(url, data=large, headers={"x-voucherify-signature": BOGUS}) as r:
            assert r.status == 401  # read to the end, then refused for its signature

    assert served.metric("pubrelay_webhook_requests_total", outcome="busy") == 2
    refused = "pubrelay_webhook_refused_total"
    assert served.metric(refused, guard="max_concurrent_large_bodies") == 1
    assert served.metric(refused, guard="max_concurrent_bodies") == 1
    assert served.metric("pubrelay_webhook_requests_total", outcome="body_timeout") == 4


async def test_signed_delivery_is_accepted_while_fifty_clients_hold_stalled_bodies(
    serve: Callable[..., Awaitable[Served]], stallers: list[Staller], sqlite_bus: SqliteBus
) -> None:
    served = await serve(body_read_timeout_s=1.5)
    stallers += [await Staller.open(served.port, sent=512 * 1024) for _ in range(25)]
    stallers += [await Staller.open(served.port, sent=1000, chunked=False) for _ in range(25)]
    await served.wait_receiving("any", 50)

    url = f"http://127.0.0.1:{served.port}{URL}"
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            body = event_body()
            async with session.post(url, data=body, headers=signed_headers(body)) as r:
                assert r.status == 202

    assert len(await read_topic(sqlite_bus, TOPIC, expect=5)) == 5
    answers = await asyncio.gather(*(s.answer(within_s=1.5 + MARGIN_S) for s in stallers))
    assert {status for status, _ in answers} == {408}
    assert served.metric("pubrelay_webhook_requests_total", outcome="body_timeout") == 50


async def test_connections_without_complete_headers_or_idle_are_closed(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    served = await serve(keepalive_timeout_s=1.0)
    silent = await asyncio.open_connection("127.0.0.1", served.port)
    partial = await asyncio.open_connection("127.0.0.1", served.port)
    partial[1].write(f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
    idle = await asyncio.open_connection("127.0.0.1", served.port)
    idle[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.gather(partial[1].drain(), idle[1].drain())

    try:
        for reader, _ in (silent, partial):
            assert await asyncio.wait_for(reader.read(), 1.0 + MARGIN_S) == b""
        # The idle one got its answer, then was closed after the keep-alive time.
        answer = await asyncio.wait_for(idle[0].read(), 1.0 + MARGIN_S)
        assert answer.startswith(b"HTTP/1.1 200")
        assert idle[0].at_eof()
    finally:
        for _, writer in (silent, partial, idle):
            writer.close()


async def test_header_limits_refuse_requests_with_too_many_or_too_long_headers(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    # What a half-sent request may hold is about 2 x MAX_HEADERS x MAX_HEADER_BYTES.
    served = await serve()
    limit = served.http.max_header_bytes

    async def status_of(headers: list[tuple[str, str]]) -> int:
        body = event_body()
        signed = signed_headers(body)
        lines = [*signed.items(), *headers, ("Content-Length", str(len(body)))]
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        head = f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in lines)
        writer.write(head.encode() + b"\r\n" + body)
        try:
            status_line = await asyncio.wait_for(reader.readline(), MARGIN_S)
        finally:
            writer.close()
        return int(status_line.split()[1])

    fits = [(f"X-Proxy-{i}", "v") for i in range(served.http.max_headers - 5)]
    assert await status_of(fits) == 202
    assert await status_of([*fits, *(("X-More", "v") for _ in range(6))]) == 400
    assert await status_of([("X-Long", "a" * (limit - 100))]) == 202
    assert await status_of([("X-Long", "a" * (limit + 1))]) == 400
