"""The Voucherify API client against the contract server: paging, auth, quota, back-off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from handlers.builtin import voucherify_api
from handlers.builtin.voucherify_api import VoucherifyApi, VoucherifySettings
from schemas.errors import (
    ApiAuthError,
    ApiError,
    ApiQuotaError,
    ApiUnavailable,
    PageLimitReached,
)
from tests.fixtures.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    FakeVoucherify,
    failed_item,
    list_item_from_event,
)
from tests.fixtures.samples import sample_publication_event

START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def item(n: int, **kwargs: Any) -> dict[str, Any]:
    event = sample_publication_event(
        event_id=f"evcus_{n}",
        delivery_id=f"whs_{n}",
        customer_id=f"cust_{n}",
        email=f"c{n}@example.com",
        code=f"CODE-{n:04d}",
        created_at=START + timedelta(minutes=n),
    )
    return list_item_from_event(event, **kwargs)


class Pauses:
    """A recording ``sleep``: the client's pauses, without waiting for them."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def settings(fake: FakeVoucherify, **overrides: Any) -> VoucherifySettings:
    values: dict[str, Any] = {
        "api_url": fake.url,
        "app_id": APP_ID,
        "app_token": APP_TOKEN,
        "request_interval_s": 0.0,
    }
    values.update(overrides)
    return VoucherifySettings(**values)


async def test_pages_list_publications_newest_first_with_the_key_pair(
    fake_voucherify: FakeVoucherify,
) -> None:
    fake_voucherify.publications = [item(n) for n in range(150)]
    async with VoucherifyApi(settings(fake_voucherify)) as api:
        first = await api.list_publications(1)
        second = await api.list_publications(2)

    assert [p.id for p in first.publications[:1]] == [item(149)["id"]]
    assert len(first.publications) == 100
    assert len(second.publications) == 50
    assert first.total == 150
    created = [p.created_at for p in first.publications + second.publications]
    assert created == sorted(created, reverse=True)
    assert fake_voucherify.requests[0] == {"page": "1", "limit": "100", "order": "-created_at"}
    assert api.rate_limit == (10_000, 9_998)


async def test_single_and_multi_code_and_failed_items_are_read(
    fake_voucherify: FakeVoucherify,
) -> None:
    fake_voucherify.publications = [
        item(1),
        item(2, codes=["MULTI-A", "MULTI-B"]),
        failed_item("pub_failed", "cust_9", "2026-11-20T09:03:00.000Z"),
    ]
    async with VoucherifyApi(settings(fake_voucherify)) as api:
        page = await api.list_publications(1)

    by_id = {p.id: p for p in page.publications}
    single, multi = by_id[item(1)["id"]], by_id[item(2)["id"]]
    assert single.codes == ("CODE-0001",)
    assert single.campaign == "Spring Discounts"
    assert single.customer_email == "c1@example.com"
    assert multi.codes == ("MULTI-A", "MULTI-B")
    assert not by_id["pub_failed"].succeeded
    assert single.succeeded


async def test_a_refused_token_is_an_auth_error_that_never_shows_the_token(
    fake_voucherify: FakeVoucherify,
) -> None:
    wrong = "wrong-token-do-not-print"
    async with VoucherifyApi(settings(fake_voucherify, app_token=wrong)) as api:
        with pytest.raises(ApiAuthError) as caught:
            await api.list_publications(1)
    assert "401" in str(caught.value)
    assert wrong not in str(caught.value)
    assert len(fake_voucherify.requests) == 1


async def test_a_429_waits_its_retry_after_then_succeeds(fake_voucherify: FakeVoucherify) -> None:
    fake_voucherify.publications = [item(1)]
    fake_voucherify.fail_next(429, retry_after="7")
    pauses = Pauses()
    async with VoucherifyApi(settings(fake_voucherify), sleep=pauses) as api:
        page = await api.list_publications(1)
    assert len(page.publications) == 1
    assert pauses.seconds == [7.0]
    assert len(fake_voucherify.requests) == 2


async def test_429s_past_the_retries_are_a_quota_error_with_capped_pauses(
    fake_voucherify: FakeVoucherify,
) -> None:
    fake_voucherify.fail_next(429, times=10, retry_after="86400")
    pauses = Pauses()
    api_settings = settings(fake_voucherify, max_retries=3, max_pause_s=30)
    async with VoucherifyApi(api_settings, sleep=pauses) as api:
        with pytest.raises(ApiQuotaError, match="429"):
            await api.list_publications(1)
    assert pauses.seconds == [30.0, 30.0, 30.0]
    assert len(fake_voucherify.requests) == 4


async def test_5xx_backs_off_doubling_then_gives_up(fake_voucherify: FakeVoucherify) -> None:
    fake_voucherify.fail_next(503, times=10, retry_after=None)
    pauses = Pauses()
    async with VoucherifyApi(settings(fake_voucherify, max_retries=3), sleep=pauses) as api:
        with pytest.raises(ApiUnavailable, match="503"):
            await api.list_publications(1)
    assert pauses.seconds == [1.0, 2.0, 4.0]


async def test_no_request_is_made_once_only_the_reserved_quota_remains(
    fake_voucherify: FakeVoucherify,
) -> None:
    fake_voucherify.rate_limit = 1000
    fake_voucherify.remaining = 752  # after this request: 751, above the 750 reserve
    fake_voucherify.publications = [item(1)]
    async with VoucherifyApi(settings(fake_voucherify, quota_share=0.25)) as api:
        await api.list_publications(1)
        await api.list_publications(1)  # 750 left now: the reserve
        with pytest.raises(ApiQuotaError, match="750 of 1000"):
            await api.list_publications(1)
    assert len(fake_voucherify.requests) == 2


async def test_pages_past_1000_are_refused_by_the_client_and_by_the_api(
    fake_voucherify: FakeVoucherify, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with VoucherifyApi(settings(fake_voucherify)) as api:
        with pytest.raises(PageLimitReached, match="page 1000"):
            await api.list_publications(1001)
        assert fake_voucherify.requests == []
        monkeypatch.setattr(voucherify_api, "MAX_PAGE", 5000)
        with pytest.raises(PageLimitReached, match="over the limit"):
            await api.list_publications(1001)
    assert fake_voucherify.requests == [{"page": "1001", "limit": "100", "order": "-created_at"}]


async def test_requests_are_kept_apart_by_the_interval(fake_voucherify: FakeVoucherify) -> None:
    pauses = Pauses()
    api_settings = settings(fake_voucherify, request_interval_s=60.0)
    async with VoucherifyApi(api_settings, sleep=pauses) as api:
        await api.list_publications(1)
        await api.list_publications(2)
    assert len(pauses.seconds) == 1
    assert 59.0 < pauses.seconds[0] <= 60.0


def test_without_a_key_pair_the_client_refuses_to_start() -> None:
    with pytest.raises(ApiAuthError, match="PUBRELAY_VOUCHERIFY__APP_ID"):
        VoucherifyApi(VoucherifySettings())


async def test_the_contract_server_enforces_what_the_openapi_file_documents(
    fake_voucherify: FakeVoucherify,
) -> None:
    auth = {"X-App-Id": APP_ID, "X-App-Token": APP_TOKEN}
    cases = [
        ({}, {}, 401, "unauthorized"),
        (auth, {"limit": "101"}, 400, "invalid_query_params"),
        (auth, {"page": "1001"}, 400, "page_over_limit"),
        (auth, {"order": "-amount"}, 400, "invalid_query_params"),
    ]
    async with aiohttp.ClientSession(base_url=fake_voucherify.url) as session:
        for headers, params, status, key in cases:
            async with session.get("/v1/publications", headers=headers, params=params) as answer:
                body = await answer.json()
                assert (answer.status, body["key"], body["code"]) == (status, key, status)
                assert "X-Rate-Limit-Remaining" in answer.headers
        async with session.get("/v1/publications", headers=auth) as answer:
            body = await answer.json()
    assert set(body) == {"object", "data_ref", "publications", "total"}
    assert (body["object"], body["data_ref"]) == ("list", "publications")


async def test_a_proxy_page_instead_of_json_is_an_error_not_a_retry_loop(
    fake_voucherify: FakeVoucherify,
) -> None:
    fake_voucherify.fail_next(404, retry_after=None)
    pauses = Pauses()
    async with VoucherifyApi(settings(fake_voucherify), sleep=pauses) as api:
        with pytest.raises(ApiError, match="404"):
            await api.list_publications(1)
    assert pauses.seconds == []
    assert len(fake_voucherify.requests) == 1
