"""The ``http`` handler against a receiver on loopback that verifies every request."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from handlers.builtin.http import (
    HttpHandler,
    create,
    sign_forward,
    verify_forward_signature,
)
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, HandlerError, RetryLater
from tests.fixtures.fake_receiver import SECRET, FakeReceiver
from tests.fixtures.handler_harness import capturing_context
from tests.fixtures.process import free_port
from tests.fixtures.samples import sample_publication_event

EVENT_TYPE = "customer.publication.succeeded"


def publication(n: int, *, indent: int | None = None, attempt: int = 1) -> Event:
    """Event ``n``; ``indent`` gives a pretty-printed body, which must arrive unchanged."""
    envelope = sample_publication_event(
        event_id=f"evcus_{n:04d}",
        delivery_id=f"whs_{n:04d}",
        customer_id=f"cust_{n:04d}",
        email=f"customer{n}@example.com",
        code=f"CODE-{n}",
    )
    separators = (",", ":") if indent is None else None
    raw = json.dumps(envelope, indent=indent, separators=separators, ensure_ascii=False).encode()
    return Event(
        id=f"evcus_{n:04d}",
        type=EVENT_TYPE,
        raw=raw,
        headers=(),
        key=f"cust_{n:04d}".encode(),
        attempt=attempt,
        topic="voucherify." + EVENT_TYPE,
        partition=0,
        offset=n,
    )


def forward_context(tmp_path: Path, env: dict[str, str]) -> HandlerContext:
    return capturing_context("http", tmp_path, env)[0]


def forward_env(url: str, **settings: str) -> dict[str, str]:
    env = {
        "PUBRELAY_FORWARD__URL": url,
        "PUBRELAY_FORWARD__SECRET": SECRET,
        "PUBRELAY_FORWARD__TIMEOUT_S": "2",
    }
    env.update({f"PUBRELAY_FORWARD__{k.upper()}": v for k, v in settings.items()})
    return env


@asynccontextmanager
async def running_forward(url: str, tmp_path: Path, **settings: str) -> AsyncIterator[HttpHandler]:
    handler = create(forward_context(tmp_path, forward_env(url, **settings)))
    await handler.start()
    try:
        yield handler
    finally:
        await handler.stop()


async def test_the_receiver_verifies_the_signature_and_stores_the_exact_bytes(
    fake_receiver: FakeReceiver, tmp_path: Path
) -> None:
    compact, pretty = publication(1), publication(2, indent=2)
    async with running_forward(
        fake_receiver.url, tmp_path, headers='{"Authorization": "Bearer downstream"}'
    ) as handler:
        await handler.handle(compact)
        await handler.handle(pretty)

    assert fake_receiver.refused == []
    assert [r.body for r in fake_receiver.received] == [compact.raw, pretty.raw]
    first = fake_receiver.received[0].headers
    assert first["X-Pubrelay-Event-Id"] == "evcus_0001"
    assert first["X-Pubrelay-Event-Type"] == EVENT_TYPE
    assert first["X-Pubrelay-Attempt"] == "1"
    assert first["Content-Type"] == "application/json"
    assert first["Authorization"] == "Bearer downstream"
    assert abs(int(first["X-Pubrelay-Timestamp"]) - time.time()) < 5
    assert first["X-Pubrelay-Signature"].startswith("v1=")
    assert verify_forward_signature(
        SECRET, first["X-Pubrelay-Timestamp"], compact.raw, first["X-Pubrelay-Signature"]
    )


@pytest.mark.parametrize(
    ("status", "retry_after", "delay_s"),
    [(503, None, None), (500, "3", 3.0), (429, "7", 7.0), (408, None, None)],
)
async def test_transient_answers_are_retried_honouring_retry_after(
    fake_receiver: FakeReceiver,
    tmp_path: Path,
    status: int,
    retry_after: str | None,
    delay_s: float | None,
) -> None:
    fake_receiver.fail_next(1, status, retry_after=retry_after)
    async with running_forward(fake_receiver.url, tmp_path) as handler:
        with pytest.raises(RetryLater, match=str(status)) as caught:
            await handler.handle(publication(1))
        assert caught.value.delay_s == delay_s
        assert fake_receiver.received == []
        await handler.handle(publication(1, attempt=2))
    assert fake_receiver.event_ids == ["evcus_0001"]
    assert fake_receiver.received[0].headers["X-Pubrelay-Attempt"] == "2"


async def test_a_client_error_dead_letters_with_the_status_and_a_masked_snippet(
    fake_receiver: FakeReceiver, tmp_path: Path
) -> None:
    fake_receiver.fail_next(1, 422, body="unknown campaign for customer1@example.com " + "x" * 500)
    async with running_forward(fake_receiver.url, tmp_path) as handler:
        with pytest.raises(HandlerError) as caught:
            await handler.handle(publication(1))
    message = str(caught.value)
    assert "422" in message
    assert "unknown campaign for c***@example.com" in message
    assert "customer1@example.com" not in message
    assert len(message) < 300
    assert fake_receiver.received == []


async def test_a_receiver_with_another_secret_refuses_and_the_event_is_dead_lettered(
    fake_receiver: FakeReceiver, tmp_path: Path
) -> None:
    fake_receiver.secret = "the-receiver-rotated-its-secret"
    async with running_forward(fake_receiver.url, tmp_path) as handler:
        with pytest.raises(HandlerError, match="401"):
            await handler.handle(publication(1))
    assert fake_receiver.refused == [(401, "bad signature")]


async def test_a_slow_receiver_times_out_into_a_retry(
    fake_receiver: FakeReceiver, tmp_path: Path
) -> None:
    fake_receiver.slow_next(1, 2.0)
    async with running_forward(fake_receiver.url, tmp_path, timeout_s="0.3") as handler:
        with pytest.raises(RetryLater, match=r"did not answer within 0\.3s"):
            await handler.handle(publication(1))


async def test_an_unreachable_receiver_is_a_retry(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"
    async with running_forward(url, tmp_path) as handler:
        with pytest.raises(RetryLater, match="cannot reach the receiver"):
            await handler.handle(publication(1))


async def test_a_wrong_path_is_a_permanent_error(
    fake_receiver: FakeReceiver, tmp_path: Path
) -> None:
    async with running_forward(fake_receiver.url + "-typo", tmp_path) as handler:
        with pytest.raises(HandlerError, match="404"):
            await handler.handle(publication(1))


def test_the_signature_verifier_accepts_fresh_signatures_and_rotated_secrets() -> None:
    body = b'{"event":{"id":"evcus_1"}}'
    stamp = 1_700_000_000
    header = sign_forward(SECRET, stamp, body)
    assert verify_forward_signature(SECRET, str(stamp), body, header, now=stamp + 10)
    assert verify_forward_signature(SECRET.encode(), stamp, body, header, now=stamp - 10)
    rotated = sign_forward("old-secret", stamp, body) + ", " + header
    assert verify_forward_signature(SECRET, stamp, body, rotated, now=stamp)


@pytest.mark.parametrize(
    ("timestamp", "body", "secret", "header_for", "now_offset"),
    [
        ("1700000000", b"{}", SECRET, b"{}", 301),  # too old
        ("1700000000", b"{}", SECRET, b"{}", -301),  # too far in the future
        ("1700000000", b'{"a":2}', SECRET, b'{"a":1}', 0),  # tampered body
        ("1700000000", b"{}", "another-secret", b"{}", 0),  # wrong secret
        ("17e8", b"{}", SECRET, b"{}", 0),  # malformed timestamp
        ("\u00b2", b"{}", SECRET, b"{}", 0),  # a digit to str.isdigit, not to int()
        ("9" * 400, b"{}", SECRET, b"{}", 0),  # overflows float arithmetic
        ("9" * 5000, b"{}", SECRET, b"{}", 0),  # over int()'s digit limit
        (None, b"{}", SECRET, b"{}", 0),  # no timestamp
    ],
)
def test_the_signature_verifier_rejects_old_tampered_and_foreign_requests(
    timestamp: str | None, body: bytes, secret: str, header_for: bytes, now_offset: int
) -> None:
    header = sign_forward(SECRET, "1700000000", header_for)
    now = 1_700_000_000 + now_offset
    assert not verify_forward_signature(secret, timestamp, body, header, now=now)


@pytest.mark.parametrize("header", [None, "", "v1=zz", "v0=abcd", "sha256=" + "0" * 64])
def test_the_signature_verifier_rejects_malformed_headers(header: str | None) -> None:
    assert not verify_forward_signature(SECRET, "1700000000", b"{}", header, now=1_700_000_000)


def test_settings_come_from_the_forward_section_not_the_web_servers(tmp_path: Path) -> None:
    env = {"PUBRELAY_HTTP__URL": "http://127.0.0.1:1/x", "PUBRELAY_HTTP__SECRET": SECRET}
    with pytest.raises(ConfigError, match="PUBRELAY_FORWARD__URL") as caught:
        create(forward_context(tmp_path, env))
    assert "PUBRELAY_HTTP__*" in str(caught.value)
    handler = create(forward_context(tmp_path, forward_env("https://example.invalid/hook")))
    assert handler.name == "http"
    assert handler.event_types == frozenset()
    assert SECRET not in repr(handler)


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"url": "ftp://example.invalid/"}, "URL"),
        ({"secret": ""}, "SECRET"),
        ({"headers": '{"X-Pubrelay-Signature": "forged"}'}, "cannot be overridden"),
        ({"headers": '{"Content-Type": "text/plain"}'}, "cannot be overridden"),
        ({"headers": '{"X-Trace": "a\\r\\nInjected: 1"}'}, "line break"),
        ({"timeout_s": "0"}, "TIMEOUT_S"),
    ],
)
def test_invalid_forward_settings_stop_start_up(
    tmp_path: Path, settings: dict[str, str], complaint: str
) -> None:
    env = forward_env("https://example.invalid/hook")
    env.update({f"PUBRELAY_FORWARD__{k.upper()}": v for k, v in settings.items()})
    with pytest.raises(ConfigError, match=complaint) as caught:
        create(forward_context(tmp_path, env))
    assert SECRET not in str(caught.value)
