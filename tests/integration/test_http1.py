"""The webhook's own HTTP layer (consumer/http1.py) on raw sockets: the deliveries it
serves, and every other request handed to aiohttp on the same connection, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from bus.sqlite import SqliteBus
from consumer.config import HttpSettings
from pubrelay.settings import Settings
from tests.fixtures.app import WEBHOOK_PATH, Front, event_body, read_topic, signed_headers
from tests.fixtures.worker import eventually

TOPIC = "voucherify.customer.publication.succeeded"


@pytest.fixture
async def front(make_app: object, sqlite_bus: SqliteBus) -> AsyncIterator[Front]:
    app, _ = make_app(sqlite_bus)  # type: ignore[operator]
    served = Front(app, HttpSettings())
    await served.start()
    yield served
    await served.close()


def post(body: bytes, *, extra: str = "", chunked: bool = False) -> bytes:
    headers = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body).items())
    if chunked:
        return (
            (
                f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{headers}{extra}"
                f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n"
            ).encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
    return (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n{headers}{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def answers(port: int, data: bytes, count: int) -> list[int]:
    """Send ``data`` at once on one connection; the statuses of ``count`` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    statuses = []
    try:
        for _ in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            statuses.append(int(head.split()[1]))
            if statuses[-1] == 100:  # Continue: no body
                continue
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()
    return statuses


async def test_pipelined_deliveries_and_other_routes_on_one_connection_in_order(
    front: Front, sqlite_bus: SqliteBus
) -> None:
    assert front.port is not None
    first, second, third = (event_body(event_id=f"evt_{n}") for n in range(3))
    data = (
        post(first)
        + post(second)
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # handed to aiohttp from here on
        + post(third)
    )
    assert await answers(front.port, data, 4) == [202, 202, 200, 202]
    records = await read_topic(sqlite_bus, TOPIC, expect=3)
    assert [r.value for r in records] == [first, second, third]


@pytest.mark.parametrize(
    ("shape", "status"),
    [
        ("chunked", 202),  # aiohttp reads it
        ("expect", 202),  # Expect: 100-continue: aiohttp answers 100, then 202
        ("bad signature", 401),  # served here
        ("two lengths", 400),  # ambiguous framing: aiohttp refuses it
        ("upgrade", 202),  # curl --http2 asks for h2c: aiohttp ignores it
        ("no host", 400),  # HTTP/1.1 requires one Host
        ("two hosts", 400),
        ("long request line", 400),  # past aiohttp's 8190 bytes
    ],
)
async def test_other_shapes_get_the_same_answers_as_on_aiohttp(
    front: Front, shape: str, status: int
) -> None:
    assert front.port is not None
    body = event_body(event_id=f"evt_{shape.replace(' ', '_')}")
    target = f"{WEBHOOK_PATH} HTTP/1.1".encode()
    data = {
        "chunked": post(body, chunked=True),
        "expect": post(body, extra="Expect: 100-continue\r\n"),
        "bad signature": post(body).replace(
            b"x-voucherify-signature: ", b"x-voucherify-signature: 0"
        ),
        "two lengths": post(body, extra=f"Content-Length: {len(body) + 1}\r\n"),
        "upgrade": post(body, extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"),
        "no host": post(body).replace(b"Host: x\r\n", b""),
        "two hosts": post(body, extra="Host: y\r\n"),
        "long request line": post(body).replace(
            target, f"{WEBHOOK_PATH}?q={'q' * 8200} HTTP/1.1".encode()
        ),
    }[shape]
    got = await answers(front.port, data, 2 if shape == "expect" else 1)
    assert got[-1] == status


async def test_a_delivery_connection_lives_while_used_and_closes_after_the_keepalive_time(
    make_app: object, sqlite_bus: SqliteBus
) -> None:
    """Deliveries closer together than the keep-alive time keep the connection, however
    long it lives; idle for that time after an answer, it is closed."""
    from consumer.config import HttpSettings  # noqa: PLC0415

    app, _ = make_app(sqlite_bus)  # type: ignore[operator]
    served = Front(app, HttpSettings(keepalive_timeout_s=0.8))
    await served.start()
    assert served.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    loop = asyncio.get_running_loop()  # the server's too: one clock
    sent_at = 0.0
    try:
        for _ in range(5):  # 1 s in all, longer than the keep-alive time
            sent_at = loop.time()  # the server is idle from after this on
            writer.write(post(event_body()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 202")
            assert b"Connection: close" not in head
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            await asyncio.sleep(0.2)
        closed = await asyncio.wait_for(reader.read(), 10)
        open_s = loop.time() - sent_at
    finally:
        writer.close()
        await served.close()
    assert closed == b""
    assert open_s >= 0.78  # closed for being idle the keep-alive time, not before
    assert len(await read_topic(sqlite_bus, TOPIC)) == 5


async def test_an_http_1_0_delivery_asking_to_keep_alive_is_answered_and_closed(
    front: Front, sqlite_bus: SqliteBus
) -> None:
    """An HTTP/1.0 connection stays open only if the answer says ``keep-alive``: this one
    says ``close``, and closes, so the client does not wait on an open connection."""
    assert front.port is not None
    request = post(event_body()).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        writer.write(request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: keep-alive\r\n"))
        answer = await asyncio.wait_for(reader.read(), 10)  # to the end: the server closed
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 202")
    assert b"Connection: close" in head
    assert len(await read_topic(sqlite_bus, TOPIC)) == 1


async def test_a_pipelined_burst_of_requests_answered_at_once_is_served_in_order(
    front: Front, sqlite_bus: SqliteBus
) -> None:
    # A refused request is answered before the intake returns (no publish to wait for):
    # the next one must wait for a later loop turn, not recurse (a read holds a thousand of
    # these small ones: that deep overflows the stack) nor starve the connections around it.
    assert front.port is not None
    refused = post(b"{}").replace(b"x-voucherify-signature: ", b"x-voucherify-signature: 0")
    accepted, beside = event_body(event_id="evt_after_the_burst"), event_body(event_id="evt_2")
    data = refused * 2000 + post(accepted)
    other = asyncio.create_task(answers(front.port, post(beside), 1))
    assert await answers(front.port, data, 2001) == [401] * 2000 + [202]
    assert await other == [202]
    records = await read_topic(sqlite_bus, TOPIC, expect=2)
    assert {r.value for r in records} == {accepted, beside}


class BrokenOnceBus(SqliteBus):
    """A bus whose first publish fails with a bug (not a bus error)."""

    broken = True

    def submit(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        if not self.broken:
            return super().submit(*args, **kwargs)
        self.broken = False
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("a bug in the bus"))
        return failed


async def test_a_bug_after_the_publish_still_answers_counts_and_logs(
    make_app: object, settings: Settings
) -> None:
    bus = BrokenOnceBus(settings.sqlite_bus_path)
    await bus.start()
    app, _ = make_app(bus)  # type: ignore[operator]
    served = Front(app, HttpSettings())
    await served.start()
    try:
        assert served.port is not None
        first, second = event_body(event_id="evt_bug"), event_body(event_id="evt_after_bug")
        with capture_logs() as logs:
            got = await answers(served.port, post(first) + post(second), 2)
        assert got == [500, 202]  # and the connection serves the next request
        failed = [e for e in logs if e["event"] == "webhook_request_failed"]
        assert [e["event_id"] for e in failed] == ["evt_bug"]
        lines = [e for e in logs if e["event"] == "webhook_request"]
        assert [(e["status"], e["event_id"]) for e in lines] == [
            (500, "evt_bug"),
            (202, "evt_after_bug"),
        ]
        records = await read_topic(bus, TOPIC, expect=1)
        assert [r.value for r in records] == [second]
    finally:
        await served.close()
        await bus.close()


UNSIGNED = (
    f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx".encode() * 1000
)  # 64 KB of requests each refused (401) at once


async def _flood(port: int, limit_bytes: int) -> tuple[int, asyncio.StreamWriter]:
    """Pipeline refused requests on one connection without reading a single answer, until
    the server stops taking them (a write waits 2 s) or ``limit_bytes`` are sent."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    deadline = asyncio.get_running_loop().time() + 30
    while sent < limit_bytes and asyncio.get_running_loop().time() < deadline:
        writer.write(UNSIGNED)
        try:
            await asyncio.wait_for(writer.drain(), 2)
        except (TimeoutError, ConnectionResetError):  # reset: cut off (keep-alive time)
            break
        sent += len(UNSIGNED)
    return sent, writer


async def test_a_client_that_stops_reading_is_cut_off_after_the_keepalive_time(
    make_app: object, sqlite_bus: SqliteBus
) -> None:
    """Its answers can never be written, so closing gracefully would wait forever: the
    connection is aborted once it has been idle for the keep-alive time."""
    app, _ = make_app(sqlite_bus)  # type: ignore[operator]
    served = Front(app, HttpSettings(keepalive_timeout_s=0.5))
    await served.start()
    assert served.port is not None
    sent, writer = await _flood(served.port, 64 * 1024 * 1024)
    try:
        assert sent > 0
        await eventually(
            lambda: not served.front.connections, timeout_s=10, what="the connection's end"
        )
    finally:
        writer.close()
        await served.close()


class SlowBus(SqliteBus):
    """Publishes that take 0.3 s to be answered (each still committed)."""

    def submit(self, *args: Any, **kwargs: Any) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[None] = loop.create_future()
        committed = super().submit(*args, **kwargs)

        def settle() -> None:
            if committed.exception() is None:
                answer.set_result(None)
            else:
                answer.set_exception(committed.exception())  # type: ignore[arg-type]

        loop.call_later(0.3, lambda: committed.add_done_callback(lambda _: settle()))
        return answer


async def test_shutdown_closes_after_the_answer_under_way_and_takes_no_pipelined_request(
    make_app: object, settings: Settings
) -> None:
    """A delivery answered during shutdown goes with ``Connection: close``; the one
    pipelined behind it is neither stored nor answered (Voucherify sends it again)."""
    bus = SlowBus(settings.sqlite_bus_path)
    await bus.start()
    app, _ = make_app(bus)  # type: ignore[operator]
    served = Front(app, HttpSettings())
    await served.start()
    assert served.port is not None
    first, second = event_body(event_id="evt_before"), event_body(event_id="evt_behind")
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(post(first) + post(second))
        await eventually(lambda: served.front.answering > 0, what="the first being answered")
        served.listener.close()
        stopping = asyncio.create_task(served.front.shutdown(5.0))
        got = await asyncio.wait_for(reader.read(), 10)  # up to the server's close
        await stopping
        heads = [part for part in got.split(b"\r\n\r\n") if part.startswith(b"HTTP/1.1")]
        assert [head.split(b"\r\n")[0] for head in heads] == [b"HTTP/1.1 202 Accepted"]
        assert b"Connection: close" in heads[0]
        records = await read_topic(bus, TOPIC, expect=1)
        await asyncio.sleep(0.5)  # a second record, if taken, would be committed by now
        assert [r.value for r in await read_topic(bus, TOPIC)] == [first]
        assert len(records) == 1
    finally:
        writer.close()
        await served.runner.cleanup()
        await bus.close()
