"""A small async client of Voucherify's REST API: the publications listing and single
vouchers (``GET /v1/vouchers/{id}``), read politely.

Shared by whatever needs the API (the reconciler, ``handlers/reconcile/``; built-in
handlers may use it too). Requests carry the key pair as ``X-App-Id`` / ``X-App-Token``;
the token is a ``SecretStr`` that never reaches a log line or an error message.

Voucherify blocks a project's whole API, checkout included, once its quota is spent, so
the client spends only a share of it (``PUBRELAY_VOUCHERIFY__QUOTA_SHARE``):

* every answer's ``X-Rate-Limit-Limit`` / ``X-Rate-Limit-Remaining`` is remembered, and
  no request is made while the remaining calls are at or below the reserve
  ``limit * (1 - share)``: :class:`~schemas.errors.ApiQuotaError`;
* two requests are at least ``REQUEST_INTERVAL_S`` apart;
* a ``429`` waits its ``Retry-After`` (capped at ``MAX_PAUSE_S``, at least
  ``REQUEST_INTERVAL_S``), a 5xx, a timeout or a network error waits a doubling back-off;
  after ``MAX_RETRIES`` retries the request fails. Nothing is retried in a tight loop.

401 and 403 are :class:`~schemas.errors.ApiAuthError` at once. Page numbers above
:data:`MAX_PAGE` are refused by the API (``page_over_limit``) and by this client:
:class:`~schemas.errors.PageLimitReached`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Self
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, Field, SecretStr, model_validator

from handlers.builtin.http_client import HttpUrlStr
from handlers.builtin.retry_after import retry_after_s
from schemas.errors import (
    EXAMPLE_PLACEHOLDERS,
    ApiAuthError,
    ApiError,
    ApiQuotaError,
    ApiUnavailable,
    PageLimitReached,
)
from schemas.masking import mask_emails

__all__ = [
    "MAX_LIMIT",
    "MAX_PAGE",
    "ListedPublication",
    "PublicationsPage",
    "VoucherifyApi",
    "VoucherifySettings",
]

PUBLICATIONS_PATH: Final = "/v1/publications"
VOUCHERS_PATH: Final = "/v1/vouchers/"
MAX_PAGE: Final = 1000
MAX_LIMIT: Final = 100
HEADER_LIMIT: Final = "X-Rate-Limit-Limit"
HEADER_REMAINING: Final = "X-Rate-Limit-Remaining"
_FIRST_BACKOFF_S: Final = 1.0


class VoucherifySettings(BaseModel):
    """``PUBRELAY_VOUCHERIFY__*``: where the project's API is and the key pair to read it."""

    api_url: HttpUrlStr = Field(
        default="https://api.voucherify.io",
        description=(
            "the project's API cluster: `https://api.voucherify.io` (Europe), "
            "`https://us1.api.voucherify.io`, `https://as1.api.voucherify.io`"
        ),
    )
    app_id: str = Field(
        default="",
        description=(
            "`X-App-Id` of a read-only API key pair (see "
            "[Reconciliation](#reconciliation)); empty: no reconciliation. Set both of "
            "the pair or neither"
        ),
    )
    app_token: SecretStr = Field(
        default=SecretStr(""),
        description="`X-App-Token` of that pair; a secret, never logged nor shown in errors",
    )
    timeout_s: float = Field(default=15.0, gt=0, description="bound for one API request")
    quota_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description=(
            "share of the API quota (`X-Rate-Limit-Limit`) pubrelay may use: no "
            "request while `X-Rate-Limit-Remaining` is at or below the rest"
        ),
    )
    request_interval_s: float = Field(
        default=0.5, ge=0, description="least time between two API requests"
    )
    max_pause_s: float = Field(
        default=60.0, gt=0, description="cap of a `Retry-After` or back-off pause"
    )
    max_retries: int = Field(
        default=3, ge=0, description="retries of one request after a 429, a 5xx or a network error"
    )

    @model_validator(mode="after")
    def _whole_key_pair(self) -> Self:
        """Half a key pair, or the example's placeholders, left reconciliation silently off."""
        token = self.app_token.get_secret_value()
        if bool(self.app_id) != bool(token):
            given, missing = ("APP_ID", "APP_TOKEN") if self.app_id else ("APP_TOKEN", "APP_ID")
            raise ValueError(
                f"PUBRELAY_VOUCHERIFY__{given} is set without PUBRELAY_VOUCHERIFY__{missing}: "
                "reconciliation needs the whole key pair (or neither, to run without it)"
            )
        if self.app_id.startswith(EXAMPLE_PLACEHOLDERS) or token.startswith(EXAMPLE_PLACEHOLDERS):
            raise ValueError(
                "PUBRELAY_VOUCHERIFY__APP_ID / APP_TOKEN still hold the example's placeholders: "
                "put a read-only key pair from Project Settings > Application Keys, or neither"
            )
        return self

    @property
    def configured(self) -> bool:
        """Whether a key pair is set (the reconciler and its recorder run only then)."""
        return bool(self.app_id and self.app_token.get_secret_value())


@dataclass(frozen=True, slots=True)
class ListedPublication:
    """One item of the publications listing, with the fields reconciliation reads.

    ``raw`` is the item as the API sent it (``ListPublicationsItemValidSingleVoucher``,
    ``…MultipleVouchers`` or ``…Invalid`` in Voucherify's OpenAPI file).
    """

    id: str
    created_at: datetime
    result: str
    customer_id: str | None
    channel: str | None
    campaign: str | None
    codes: tuple[str, ...]
    raw: Mapping[str, Any]

    @property
    def succeeded(self) -> bool:
        return self.result == "SUCCESS"

    @property
    def customer_email(self) -> str | None:
        customer = self.raw.get("customer")
        email = customer.get("email") if isinstance(customer, dict) else None
        return email if isinstance(email, str) else None

    @classmethod
    def from_item(cls, item: object) -> ListedPublication:
        """Read one listed item; :class:`ApiError` when it lacks an id or a creation time."""
        if not isinstance(item, dict):
            raise ApiError("the publications listing holds an item that is not an object")
        pub_id, created = item.get("id"), item.get("created_at")
        if not isinstance(pub_id, str) or not pub_id or not isinstance(created, str):
            raise ApiError("a listed publication lacks its id or created_at")
        try:
            created_at = datetime.fromisoformat(created)
        except ValueError:
            raise ApiError(
                f"publication {pub_id}: created_at {created[:40]!r} is no date"
            ) from None
        voucher = _object(item.get("voucher"))
        listed = [voucher.get("code")] if voucher.get("code") else (item.get("vouchers") or [])
        codes = tuple(c for c in listed if isinstance(c, str) and c)
        customer = _object(item.get("customer"))
        result = item.get("result")
        if not isinstance(result, str) or not result:
            # The spec lets every kind of item have a null result: a success is one with
            # its codes and no failure; anything else is not delivered as one.
            failed = item.get("failure_code") or item.get("failure_message") or not codes
            result = "FAILURE" if failed else "SUCCESS"
        return cls(
            id=pub_id,
            created_at=created_at,
            result=result,
            customer_id=_text(item.get("customer_id")) or _text(customer.get("id")),
            channel=_text(item.get("channel")),
            campaign=_text(voucher.get("campaign")),
            codes=codes,
            raw=item,
        )


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class PublicationsPage:
    number: int
    publications: list[ListedPublication]
    total: int | None
    listed: int
    """Items on the page, the unreadable ones included (a full page has ``limit``)."""
    unreadable: list[str]
    """Why each item that could not be read was left out (no id, no creation time)."""


Sleep = Callable[[float], Awaitable[None]]


class VoucherifyApi:
    """The API with one session, used as ``async with VoucherifyApi(settings) as api``."""

    def __init__(
        self,
        settings: VoucherifySettings,
        *,
        sleep: Sleep = asyncio.sleep,
        user_agent: str = "pubrelay-reconcile",
    ) -> None:
        if not settings.configured:
            raise ApiAuthError(
                "PUBRELAY_VOUCHERIFY__APP_ID and PUBRELAY_VOUCHERIFY__APP_TOKEN must be set"
            )
        self.settings = settings
        self.requests = 0
        """Requests sent (retries included)."""
        self.rate_limit: tuple[int, int] | None = None
        """The last ``(X-Rate-Limit-Limit, X-Rate-Limit-Remaining)`` the API sent."""
        self._sleep = sleep
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._last_request = -math.inf

    async def __aenter__(self) -> VoucherifyApi:
        self._session = aiohttp.ClientSession(
            base_url=self.settings.api_url.rstrip("/") + "/",
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            headers={
                "X-App-Id": self.settings.app_id,
                "X-App-Token": self.settings.app_token.get_secret_value(),
                "Accept": "application/json",
                "User-Agent": self._user_agent,
            },
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def list_publications(
        self, page: int, *, limit: int = MAX_LIMIT, order: str = "-created_at"
    ) -> PublicationsPage:
        """One page of ``GET /v1/publications`` (newest first with the default order)."""
        if page > MAX_PAGE:
            raise PageLimitReached(
                f"the publications listing ends at page {MAX_PAGE} ({MAX_PAGE * limit} "
                "publications); older ones cannot be read through this API"
            )
        params = {"page": str(page), "limit": str(min(limit, MAX_LIMIT)), "order": order}
        body = await self._get_json(PUBLICATIONS_PATH, params)
        items = body.get("publications")
        if body.get("object") != "list" or not isinstance(items, list):
            raise ApiError("GET /v1/publications answered something that is not a list body")
        total = body.get("total")
        publications: list[ListedPublication] = []
        unreadable: list[str] = []
        for item in items:  # one bad item must not stop every run at this page
            try:
                publications.append(ListedPublication.from_item(item))
            except ApiError as err:
                unreadable.append(str(err))
        return PublicationsPage(
            number=page,
            publications=publications,
            total=total if isinstance(total, int) else None,
            listed=len(items),
            unreadable=unreadable,
        )

    async def get_voucher(self, voucher_id: str) -> dict[str, Any]:
        """``GET /v1/vouchers/{id}``: the voucher (``VouchersGetResponseBody``) as sent; an
        unknown id is an :class:`ApiError` (404 ``not_found``)."""
        body = await self._get_json(VOUCHERS_PATH + quote(voucher_id, safe=""), {})
        if not isinstance(body.get("code"), str):
            raise ApiError(f"GET {VOUCHERS_PATH}{{id}} answered a body without a code")
        return body

    async def _get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        assert self._session is not None, "use VoucherifyApi in 'async with'"
        where = f"GET {path}"
        failure = ""
        for attempt in range(self.settings.max_retries + 1):
            await self._pace()
            self.requests += 1
            try:
                async with self._session.get(path.lstrip("/"), params=params) as response:
                    self._read_rate_limit(response.headers)
                    status = response.status
                    body = _json_or_none(await response.read()) if status < 500 else None
                    retry_after = response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as err:
                failure = f"{where}: {type(err).__name__}: {_safe(err, self.settings)}"
                await self._back_off(attempt, None)
                continue
            if status == 200 and isinstance(body, dict):
                return body
            error = body if isinstance(body, dict) else {}
            key = error.get("key")
            if status in (401, 403):
                raise ApiAuthError(
                    f"{where}: {status} {key or ''}: Voucherify refused the key pair "
                    f"(X-App-Id {self.settings.app_id!r}); check PUBRELAY_VOUCHERIFY__APP_ID, "
                    "PUBRELAY_VOUCHERIFY__APP_TOKEN and PUBRELAY_VOUCHERIFY__API_URL (region)"
                )
            if status == 400 and key == "page_over_limit":
                raise PageLimitReached(f"{where}: page {params.get('page')} is over the limit")
            if status == 429:
                failure = f"{where}: 429 too many requests (the project's API quota)"
                await self._back_off(attempt, retry_after)
                continue
            if status >= 500:
                failure = f"{where}: {status} from Voucherify"
                await self._back_off(attempt, retry_after)
                continue
            message = error.get("message") or error.get("details") or ""
            raise ApiError(
                f"{where}: {status} {key or ''} {mask_emails(str(message), max_chars=200)}".strip()
            )
        if failure.startswith(f"{where}: 429"):
            raise ApiQuotaError(f"{failure}, still after {self.settings.max_retries} retries")
        raise ApiUnavailable(f"{failure}, still after {self.settings.max_retries} retries")

    def _read_rate_limit(self, headers: Mapping[str, str]) -> None:
        try:
            limit, remaining = int(headers[HEADER_LIMIT]), int(headers[HEADER_REMAINING])
        except (KeyError, ValueError):
            return
        self.rate_limit = (limit, remaining)

    async def _pace(self) -> None:
        """Keep requests apart, and refuse to spend the reserve of the quota."""
        if self.rate_limit is not None:
            limit, remaining = self.rate_limit
            reserve = limit * (1 - self.settings.quota_share)
            if remaining <= reserve:
                raise ApiQuotaError(
                    f"the API quota has {remaining} of {limit} calls left, not more than the "
                    f"{reserve:.0f} kept for the rest of the project "
                    f"(PUBRELAY_VOUCHERIFY__QUOTA_SHARE={self.settings.quota_share}): "
                    "stopped to keep checkout working; try again later"
                )
        loop = asyncio.get_running_loop()
        wait = self._last_request + self.settings.request_interval_s - loop.time()
        if wait > 0:
            await self._sleep(wait)
        self._last_request = loop.time()

    async def _back_off(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.settings.max_retries:
            return
        cap = self.settings.max_pause_s
        asked = retry_after_s(retry_after, max_s=cap)
        pause = asked if asked is not None else min(cap, _FIRST_BACKOFF_S * 2**attempt)
        await self._sleep(max(pause, self.settings.request_interval_s))


def _json_or_none(raw: bytes) -> object:
    """The body as JSON, or ``None`` (a proxy's HTML error page, a cut body)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _safe(err: BaseException, settings: VoucherifySettings) -> str:
    """An error's text with the token masked, whatever the library put in it."""
    text = str(err) or type(err).__name__
    token = settings.app_token.get_secret_value()
    return text.replace(token, "***") if token else text
