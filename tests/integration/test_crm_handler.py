"""The ``crm`` handler against a fake HubSpot on loopback that enforces the API contract."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import CapturingLogger

from handlers.builtin.crm.handler import HubSpotHandler, create
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, HandlerError, RetryLater, SkipEvent
from tests.fixtures.fake_hubspot import TOKEN, FakeHubSpot
from tests.fixtures.handler_harness import Harness as GenericHarness
from tests.fixtures.handler_harness import capturing_context
from tests.fixtures.process import free_port
from tests.fixtures.samples import sample_publication_body

EVENT_TYPE = "customer.publication.succeeded"
PUBLISHED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def publication(
    n: int,
    *,
    email: str | None = "",
    code: str | None = None,
    channel: str = "API",
    attempt: int = 1,
) -> Event:
    """Event ``n`` as the worker hands it over: customer ``cust_<n>``, code ``CODE-<n>``."""
    customer = f"cust_{n:04d}"
    address = f"customer{n}@example.com" if email == "" else email
    body = sample_publication_body(
        event_id=f"evcus_{n:04d}",
        delivery_id=f"whs_{n:04d}",
        customer_id=customer,
        email=address,
        code=code or f"CODE-{n}",
        channel=channel,
        created_at=PUBLISHED,
    )
    return Event(
        id=f"evcus_{n:04d}",
        type=EVENT_TYPE,
        raw=body,
        headers=(),
        key=customer.encode(),
        attempt=attempt,
        topic="voucherify." + EVENT_TYPE,
        partition=0,
        offset=n,
    )


Harness = GenericHarness[HubSpotHandler]


def crm_context(tmp_path: Path, env: dict[str, str]) -> tuple[HandlerContext, CapturingLogger]:
    return capturing_context("crm", tmp_path, env)


def crm_env(fake: FakeHubSpot, **settings: str) -> dict[str, str]:
    env = {
        "PUBRELAY_CRM__TOKEN": TOKEN,
        "PUBRELAY_CRM__BASE_URL": fake.url,
        "PUBRELAY_CRM__BATCH_WINDOW_S": "0.05",
        "PUBRELAY_CRM__TIMEOUT_S": "2",
    }
    env.update({f"PUBRELAY_CRM__{k.upper()}": v for k, v in settings.items()})
    return env


@asynccontextmanager
async def running_crm(fake: FakeHubSpot, tmp_path: Path, **settings: str) -> AsyncIterator[Harness]:
    context, logs = crm_context(tmp_path, crm_env(fake, **settings))
    handler = create(context)
    await handler.start()
    try:
        yield Harness(handler, context.metrics_registry, logs)
    finally:
        await handler.stop()


async def outcomes(handler: HubSpotHandler, events: Iterable[Event]) -> list[BaseException | None]:
    """Handle ``events`` concurrently (as the worker does for different customers)."""
    results = await asyncio.wait_for(
        asyncio.gather(*(handler.handle(e) for e in events), return_exceptions=True), 15
    )
    return [r if isinstance(r, BaseException) else None for r in results]


async def test_events_within_the_window_are_upserted_in_few_requests_with_mapped_properties(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    async with running_crm(fake_hubspot, tmp_path, batch_size="10", batch_window_s="0.2") as h:
        events = [publication(n, channel="Automation") for n in range(25)]
        assert await outcomes(h.handler, events) == [None] * 25

    assert [len(r.ids) for r in fake_hubspot.upserts] == [10, 10, 5]
    assert len(fake_hubspot.requests) == 3
    assert fake_hubspot.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert len(fake_hubspot.contacts) == 25
    assert fake_hubspot.contacts["customer7@example.com"] == {
        "email": "customer7@example.com",
        "voucherify_last_coupon_code": "CODE-7",
        "voucherify_last_campaign": "Spring Discounts",
        "voucherify_last_channel": "Automation",
        "voucherify_last_published_at": "2024-05-01T12:00:00.000Z",
    }
    assert h.metric("pubrelay_crm_contacts_total", outcome="upserted") == 25
    assert h.metric("pubrelay_crm_requests_total", result="ok") == 3
    assert "customer7@example.com" not in h.log_text()


async def test_a_lone_event_is_sent_when_the_window_closes(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    async with running_crm(fake_hubspot, tmp_path, batch_window_s="0.3") as h:
        started = time.monotonic()
        await h.handler.handle(publication(1))
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0
    assert list(fake_hubspot.contacts) == ["customer1@example.com"]


async def test_two_events_for_one_address_in_a_batch_are_merged_and_the_later_wins(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    shared = "Shared.Inbox@example.com"
    async with running_crm(fake_hubspot, tmp_path) as h:
        first = publication(1, email=shared, code="FIRST", channel="API")
        second = publication(2, email=shared.lower(), code="SECOND", channel="Dashboard")
        third = publication(3)
        assert await outcomes(h.handler, [first, second, third]) == [None, None, None]

    # HubSpot refuses duplicate ids in one batch (400); the handler sent one input.
    assert [sorted(r.ids) for r in fake_hubspot.upserts] == [
        ["customer3@example.com", "shared.inbox@example.com"]
    ]
    stored = fake_hubspot.contacts["shared.inbox@example.com"]
    assert stored["voucherify_last_coupon_code"] == "SECOND"
    assert stored["voucherify_last_channel"] == "Dashboard"
    assert h.metric("pubrelay_crm_contacts_total", outcome="upserted") == 3


async def test_a_lone_surrogate_in_a_mapped_field_is_sent_as_a_replacement_character(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    event = publication(4)
    # Half an emoji in the campaign's name: valid JSON, refused by msgspec and pydantic as is.
    raw = event.raw.replace(b'"Spring Discounts"', b'"Spring Discounts \\ud83d"')
    assert raw != event.raw
    async with running_crm(fake_hubspot, tmp_path) as h:
        odd = Event(
            id=event.id,
            type=event.type,
            raw=raw,
            headers=(),
            key=event.key,
            attempt=1,
            topic=event.topic,
            partition=0,
            offset=4,
        )
        assert await outcomes(h.handler, [odd]) == [None]

    stored = fake_hubspot.contacts["customer4@example.com"]
    assert stored["voucherify_last_campaign"] == "Spring Discounts \ufffd"
    assert stored["voucherify_last_campaign"].encode()  # no lone surrogate reached HubSpot
    assert h.metric("pubrelay_crm_contacts_total", outcome="upserted") == 1


async def test_hubspot_refuses_duplicate_ids_in_one_batch(fake_hubspot: FakeHubSpot) -> None:
    """The fake enforces the rule the merge above exists for."""
    item = {"id": "a@example.com", "idProperty": "email", "properties": {}}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            fake_hubspot.url + "/crm/v3/objects/contacts/batch/upsert",
            json={"inputs": [item, dict(item, id="A@example.com")]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response,
    ):
        body = await response.json()
    assert response.status == 400
    assert body["category"] == "VALIDATION_ERROR"
    assert "Duplicate IDs" in body["message"]
    assert fake_hubspot.contacts == {}


async def test_a_429_retries_later_with_the_delay_hubspot_asked_for(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.fail_next(1, 429, retry_after="7")
    async with running_crm(fake_hubspot, tmp_path) as h:
        results = await outcomes(h.handler, [publication(n) for n in range(3)])
    assert all(isinstance(r, RetryLater) for r in results)
    assert [r.delay_s for r in results if isinstance(r, RetryLater)] == [7.0, 7.0, 7.0]
    assert "TEN_SECONDLY_ROLLING" in str(results[0])
    assert fake_hubspot.contacts == {}
    assert h.metric("pubrelay_crm_requests_total", result="rate_limited") == 1


async def test_the_daily_limit_without_retry_after_waits_an_hour(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    daily = {
        "status": "error",
        "message": "You have reached your daily limit.",
        "errorType": "RATE_LIMIT",
        "policyName": "DAILY",
    }
    fake_hubspot.fail_next(2, 429, body=daily)
    async with running_crm(fake_hubspot, tmp_path) as h:
        (result,) = await outcomes(h.handler, [publication(1)])
    assert isinstance(result, RetryLater)
    assert result.delay_s == 3600.0
    async with running_crm(fake_hubspot, tmp_path, max_pause_s="300") as h:  # a lower cap
        (result,) = await outcomes(h.handler, [publication(2)])
    assert isinstance(result, RetryLater)
    assert result.delay_s == 300.0


HOSTILE_429S = {  # Retry-After, X-HubSpot-RateLimit-Interval-Milliseconds
    "retry-after-inf": ("inf", None),
    "retry-after-1e308": ("1e308", None),
    "retry-after-year-9999": ("Fri, 31 Dec 9999 23:59:59 GMT", None),
    "huge-interval": (None, "9" * 5000),
    "interval-of-a-century": (None, "3155760000000"),
}


@pytest.mark.parametrize(("retry_after", "interval_ms"), HOSTILE_429S.values(), ids=HOSTILE_429S)
async def test_a_hostile_429_pauses_the_handler_no_longer_than_the_cap(
    fake_hubspot: FakeHubSpot, tmp_path: Path, retry_after: str | None, interval_ms: str | None
) -> None:
    fake_hubspot.fail_next(1, 429, retry_after=retry_after, interval_ms=interval_ms)
    async with running_crm(fake_hubspot, tmp_path, batch_size="1", max_pause_s="0.5") as h:
        (limited,) = await outcomes(h.handler, [publication(1)])
        # The limiter paused for the capped delay, not forever: the next event goes
        # through (outcomes() gives up after 15 s).
        (after,) = await outcomes(h.handler, [publication(2)])
    assert isinstance(limited, RetryLater)
    assert limited.delay_s == 0.5
    assert after is None
    assert [r.status for r in fake_hubspot.requests] == [429, 200]
    assert list(fake_hubspot.contacts) == ["customer2@example.com"]
    assert h.metric("pubrelay_crm_requests_total", result="rate_limited") == 1
    assert "crm_batch_failed" not in h.log_text()  # read without an exception


async def test_a_hostile_429_is_capped_at_an_hour_by_default(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.fail_next(1, 429, retry_after="inf")
    async with running_crm(fake_hubspot, tmp_path) as h:
        (limited,) = await outcomes(h.handler, [publication(1)])
    assert isinstance(limited, RetryLater)
    assert limited.delay_s == 3600.0


async def test_the_client_side_limit_keeps_requests_under_hubspots_limit(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.rate_limit, fake_hubspot.rate_window_s = 3, 0.5
    async with running_crm(
        fake_hubspot,
        tmp_path,
        batch_size="1",
        max_requests_per_10s="3",
        rate_window_s="0.6",  # a margin over the server's 0.5 s for network jitter
    ) as h:
        started = time.monotonic()
        results = await outcomes(h.handler, [publication(n) for n in range(9)])
        elapsed = time.monotonic() - started
    assert results == [None] * 9
    assert [r.status for r in fake_hubspot.requests] == [200] * 9
    assert fake_hubspot.max_in_window(0.5) <= 3
    assert elapsed >= 1.2  # 9 requests at 3 per 0.6 s need two full windows
    assert len(fake_hubspot.contacts) == 9


async def test_without_the_client_side_limit_hubspot_answers_429(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.rate_limit, fake_hubspot.rate_window_s = 3, 5.0
    async with running_crm(fake_hubspot, tmp_path, batch_size="1") as h:
        results = await outcomes(h.handler, [publication(n) for n in range(5)])
    limited = [r for r in results if isinstance(r, RetryLater)]
    assert len(limited) == 2
    assert all(r.delay_s == 1.0 for r in limited)
    assert len(fake_hubspot.contacts) == 3


async def test_server_errors_are_retried_and_the_retry_succeeds(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.fail_next(1, 503)
    async with running_crm(fake_hubspot, tmp_path) as h:
        (first,) = await outcomes(h.handler, [publication(1)])
        assert isinstance(first, RetryLater)
        assert "503" in str(first)
        assert fake_hubspot.contacts == {}
        await h.handler.handle(publication(1, attempt=2))
    assert list(fake_hubspot.contacts) == ["customer1@example.com"]
    assert h.metric("pubrelay_crm_contacts_total", outcome="retried") == 1


async def test_a_slow_hubspot_times_out_into_a_retry(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.slow_next(1, 2.0)
    async with running_crm(fake_hubspot, tmp_path, timeout_s="0.3") as h:
        (result,) = await outcomes(h.handler, [publication(1)])
    assert isinstance(result, RetryLater)
    assert "did not answer within 0.3s" in str(result)


async def test_an_unreachable_hubspot_is_a_retry(tmp_path: Path) -> None:
    context, _ = crm_context(
        tmp_path,
        {
            "PUBRELAY_CRM__TOKEN": TOKEN,
            "PUBRELAY_CRM__BASE_URL": f"http://127.0.0.1:{free_port()}",
            "PUBRELAY_CRM__BATCH_WINDOW_S": "0",
        },
    )
    handler = create(context)
    await handler.start()
    try:
        (result,) = await outcomes(handler, [publication(1)])
    finally:
        await handler.stop()
    assert isinstance(result, RetryLater)
    assert "cannot reach HubSpot" in str(result)


async def test_one_bad_record_in_a_207_fails_only_that_record(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.reject("customer2@example.com", "Email address customer2@example.com is invalid")
    async with running_crm(fake_hubspot, tmp_path) as h:
        results = await outcomes(h.handler, [publication(n) for n in range(5)])

    assert [type(r).__name__ if r else None for r in results] == [
        None,
        None,
        "HandlerError",
        None,
        None,
    ]
    assert [r.status for r in fake_hubspot.requests] == [207]
    assert sorted(fake_hubspot.contacts) == [f"customer{n}@example.com" for n in (0, 1, 3, 4)]
    message = str(results[2])
    assert "VALIDATION_ERROR" in message
    assert "c***@example.com" in message
    assert "customer2@example.com" not in message
    assert "customer2@example.com" not in h.log_text()
    assert "crm_contact_rejected" in h.log_events()
    assert h.metric("pubrelay_crm_contacts_total", outcome="rejected") == 1
    assert h.metric("pubrelay_crm_contacts_total", outcome="upserted") == 4


async def test_a_400_naming_one_contact_rejects_it_and_resends_the_others(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.reject("customer1@example.com", whole_batch=True)
    async with running_crm(fake_hubspot, tmp_path) as h:
        results = await outcomes(h.handler, [publication(n) for n in range(4)])
    assert [type(r).__name__ if r else None for r in results] == [
        None,
        "HandlerError",
        None,
        None,
    ]
    assert [(r.status, len(r.ids)) for r in fake_hubspot.requests] == [(400, 4), (200, 3)]
    assert sorted(fake_hubspot.contacts) == [f"customer{n}@example.com" for n in (0, 2, 3)]


async def test_a_400_naming_no_contact_retries_each_contact_alone(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.fail_next(1, 400, body={"status": "error", "message": "Invalid input"})
    async with running_crm(fake_hubspot, tmp_path) as h:
        events = [publication(n) for n in range(3)]
        first = await outcomes(h.handler, events)
        assert all(isinstance(r, RetryLater) for r in first)
        retried = [publication(n, attempt=2) for n in range(3)]
        assert await outcomes(h.handler, retried) == [None, None, None]
    # One refused batch, then each contact alone: no innocent contact is dead-lettered.
    assert [len(r.ids) for r in fake_hubspot.requests] == [3, 1, 1, 1]
    assert len(fake_hubspot.contacts) == 3


async def test_a_property_missing_in_hubspot_dead_letters_with_its_name(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    properties = '{"voucherify_last_coupon_code": "voucher.code", "coupon_tier": "campaign.id"}'
    async with running_crm(fake_hubspot, tmp_path, properties=properties) as h:
        (alone,) = await outcomes(h.handler, [publication(1)])
    assert isinstance(alone, HandlerError)
    assert "coupon_tier" in str(alone)
    assert "does not exist" in str(alone)


async def test_a_customer_without_email_is_skipped_without_calling_hubspot(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    async with running_crm(fake_hubspot, tmp_path) as h:
        with pytest.raises(SkipEvent, match="no e-mail address"):
            await h.handler.handle(publication(1, email=None))
    assert fake_hubspot.requests == []
    assert h.metric("pubrelay_crm_contacts_total", outcome="skipped") == 1


async def test_a_rejected_token_pauses_the_handler_instead_of_dead_lettering(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    wrong = "pat-na1-revoked-token-9999"
    async with running_crm(fake_hubspot, tmp_path, token=wrong, auth_retry_delay_s="30") as h:
        results = await outcomes(h.handler, [publication(n) for n in range(3)])
        assert all(isinstance(r, RetryLater) for r in results)
        first = results[0]
        assert isinstance(first, RetryLater)
        assert first.delay_s == 30.0
        assert "PUBRELAY_CRM__TOKEN" in str(first)
        assert "INVALID_AUTHENTICATION" in str(first)
        assert h.metric("pubrelay_crm_auth_failed") == 1

        # While the token is known bad, events fail fast: HubSpot is not called again.
        with pytest.raises(RetryLater) as again:
            await h.handler.handle(publication(4))
        assert again.value.delay_s is not None
        assert 0 < again.value.delay_s <= 30
        assert len(fake_hubspot.requests) == 1

    assert h.log_events().count("crm_auth_rejected") == 1
    assert wrong not in h.log_text()
    assert wrong not in str(first)
    assert wrong not in repr(h.handler)
    assert fake_hubspot.contacts == {}


async def test_a_fixed_token_resumes_after_the_pause(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.token = "pat-na1-rotated-token"
    async with running_crm(fake_hubspot, tmp_path, auth_retry_delay_s="0.2") as h:
        (first,) = await outcomes(h.handler, [publication(1)])
        assert isinstance(first, RetryLater)
        assert h.metric("pubrelay_crm_auth_failed") == 1
        fake_hubspot.token = TOKEN  # the operator restored the token in HubSpot
        await asyncio.sleep(0.25)
        await h.handler.handle(publication(1, attempt=2))
        assert h.metric("pubrelay_crm_auth_failed") == 0
    assert "crm_auth_restored" in h.log_events()
    assert list(fake_hubspot.contacts) == ["customer1@example.com"]


async def test_a_token_without_the_contacts_scope_is_reported(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    fake_hubspot.scopes_ok = False
    async with running_crm(fake_hubspot, tmp_path) as h:
        (result,) = await outcomes(h.handler, [publication(1)])
    assert isinstance(result, RetryLater)
    assert "MISSING_SCOPES" in str(result)
    assert "crm.objects.contacts.write" in str(result)


async def test_stop_sends_the_open_batch_before_closing(
    fake_hubspot: FakeHubSpot, tmp_path: Path
) -> None:
    context, _ = crm_context(tmp_path, crm_env(fake_hubspot, batch_window_s="30"))
    handler = create(context)
    await handler.start()
    pending = asyncio.ensure_future(handler.handle(publication(1)))
    await asyncio.sleep(0.05)
    assert fake_hubspot.requests == []
    await asyncio.wait_for(handler.stop(), 5)
    await asyncio.wait_for(pending, 1)
    assert list(fake_hubspot.contacts) == ["customer1@example.com"]
    await handler.stop()  # twice is fine


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({}, "PUBRELAY_CRM__TOKEN is required"),
        ({"PUBRELAY_CRM__TOKEN": "  "}, "PUBRELAY_CRM__TOKEN is required"),
        (
            {"PUBRELAY_CRM__TOKEN": TOKEN, "PUBRELAY_CRM__PROPERTIES": '{"x": "voucher.cod"}'},
            "'cod' is not a field of Voucher",
        ),
        ({"PUBRELAY_CRM__TOKEN": TOKEN, "PUBRELAY_CRM__BATCH_SIZE": "101"}, "BATCH_SIZE"),
        ({"PUBRELAY_CRM__TOKEN": TOKEN, "PUBRELAY_CRM__TOKN": "x"}, "PUBRELAY_CRM__TOKN"),
        ({"PUBRELAY_CRM__TOKEN": TOKEN, "PUBRELAY_CRM__BASE_URL": "api.hubapi.com"}, "BASE_URL"),
    ],
)
def test_invalid_settings_stop_start_up_with_a_clear_error(
    tmp_path: Path, env: dict[str, str], complaint: str
) -> None:
    context, _ = crm_context(tmp_path, env)
    with pytest.raises(ConfigError, match=complaint) as caught:
        create(context)
    assert TOKEN not in str(caught.value)


def test_the_handler_is_named_after_its_entry_point_and_reads_only_publications(
    tmp_path: Path,
) -> None:
    context, _ = crm_context(tmp_path, {"PUBRELAY_CRM__TOKEN": TOKEN})
    handler = create(context)
    assert handler.name == "crm"
    assert handler.event_types == frozenset({EVENT_TYPE})
