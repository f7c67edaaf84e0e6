"""The HubSpot client of the ``crm`` handler: one batch upsert request, and its answer read
as one outcome per contact.

The request is ``POST {base_url}/crm/v3/objects/contacts/batch/upsert`` with
``Authorization: Bearer <token>`` and ``{"inputs": [{"id": <email>, "idProperty": "email",
"objectWriteTraceId": <n>, "properties": {...}}]}``, ``<n>`` being the input's position,
which HubSpot's errors cite.

**Outcomes per contact** (a :class:`Failure` becomes what ``handle`` raises; see
:mod:`handlers.types`):

* 200, or 207 without an error naming the contact: done (``None``).
* 207 error naming the contact (its ``context`` lists our ``objectWriteTraceId`` or the
  id): :class:`HandlerError` for that contact only; the others succeed.
* 400 and other 4xx: the whole request was refused. Contacts the error names get
  :class:`HandlerError` and the rest are re-sent at once. When the error names none
  (say a property that does not exist) a lone contact gets :class:`HandlerError`; in a
  larger batch every contact gets :class:`RetryLater` and is sent alone on its next
  attempt, so one bad contact never dead-letters its batch mates.
* 429: :class:`RetryLater` with ``Retry-After`` (else HubSpot's rate-limit interval, or an
  hour for the ``DAILY`` policy) and the client-side limiter pauses for that long, both at
  most ``MAX_PAUSE_S`` (a header saying ``inf``, ``1e308``, year 9999 or a huge interval
  never stops the handler for longer, nor raises).
* 5xx, 408, timeouts, connection errors: :class:`RetryLater` (transient).
* 401/403 (revoked token, missing scope): :class:`RetryLater` with ``AUTH_RETRY_DELAY_S``,
  not a dead letter. A bad token is a fault of the whole handler, not of the event: it is
  logged once as ``crm_auth_rejected`` and shown by the gauge ``pubrelay_crm_auth_failed``
  (alert on it), and while it lasts no request is sent (:meth:`HubSpotClient.auth_blocked`;
  no storm of rejected requests). Events wait through the worker's retries, giving the
  operator time to rotate the token; what exhausts its attempts is dead-lettered and
  ``pubrelay replay`` sends it back once the token works.

The token is never logged, and HubSpot's error texts are masked (e-mail addresses) before
they reach a log line or a dead letter.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from structlog.typing import FilteringBoundLogger

from handlers.builtin.crm.answers import (
    Contacts,
    Failure,
    Outcomes,
    attribute,
    error_summary,
    every,
    json_object,
    multi_status,
)
from handlers.builtin.crm.metrics import CrmMetrics
from handlers.builtin.crm.settings import CrmSettings
from handlers.builtin.http_client import client_session
from handlers.builtin.ratelimit import RateLimiter
from handlers.builtin.retry_after import retry_after_s

__all__ = ["UPSERT_PATH", "HubSpotClient"]

UPSERT_PATH: Final = "/crm/v3/objects/contacts/batch/upsert"
_DAILY_LIMIT_DELAY_S: Final = 3600.0
_INTERVAL_MAX_DIGITS: Final = 12  # milliseconds: over 30 years; longer is not a number we read


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str]


class _NoAnswer(Exception):
    """The request timed out or HubSpot could not be reached; the message says which."""


class HubSpotClient:
    """Sends batch upserts; holds the session (start to close), the client-side rate limit
    and the token's health."""

    def __init__(
        self,
        settings: CrmSettings,
        token: str,
        *,
        logger: FilteringBoundLogger,
        metrics: CrmMetrics,
    ) -> None:
        self.settings = settings
        self.url = settings.base_url + UPSERT_PATH
        self._token = token
        self._log = logger
        self._m = metrics
        self._limiter = RateLimiter(
            settings.max_requests_per_10s,
            settings.rate_window_s,
            max_pause_s=settings.max_pause_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._auth_blocked_until = 0.0
        self._auth_failed = False
        self._auth_message = ""

    def __repr__(self) -> str:  # keeps the token out of any repr
        return f"HubSpotClient(url={self.url!r})"

    @property
    def running(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = client_session(
                timeout_s=self.settings.timeout_s, user_agent="pubrelay-crm"
            )
            self._m.auth_failed.set(0)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def auth_blocked(self) -> Failure | None:
        """While HubSpot rejects the token, the failure of every contact (no request sent)."""
        blocked = self._auth_blocked_until - time.monotonic()
        return Failure("retry", self._auth_message, blocked) if blocked > 0 else None

    async def upsert(self, contacts: Contacts) -> Outcomes:
        """Upsert ``contacts`` in one request (two when a refusal names only some)."""
        return await self._upsert(contacts, resend=True)

    # --- the request -------------------------------------------------------------------------

    async def _upsert(self, contacts: Contacts, *, resend: bool) -> Outcomes:
        session = self._session
        if session is None:
            return every(contacts, Failure("retry", "the crm handler is stopping"))
        await self._limiter.acquire()
        blocked = self.auth_blocked()
        if blocked is not None:
            return every(contacts, blocked)
        try:
            answer = await self._post(session, contacts)
        except _NoAnswer as err:
            self._m.requests.labels("network_error").inc()
            self._log.warning("crm_request_failed", contacts=len(contacts), error=str(err))
            return every(contacts, Failure("retry", str(err)))
        return await self._classify(contacts, answer, resend=resend)

    async def _post(self, session: aiohttp.ClientSession, contacts: Contacts) -> _Answer:
        """Send the request and read the answer, timed; :class:`_NoAnswer` if none came."""
        payload = _payload(contacts)
        headers = {"Authorization": f"Bearer {self._token}"}
        self._m.batch_size.observe(len(contacts))
        started = time.perf_counter()
        try:
            async with session.post(self.url, json=payload, headers=headers) as response:
                status = response.status
                text = await response.text(errors="replace")
                response_headers = response.headers
        except TimeoutError:
            self._m.duration.observe(time.perf_counter() - started)
            raise _NoAnswer(f"HubSpot did not answer within {self.settings.timeout_s}s") from None
        except aiohttp.ClientError as err:
            self._m.duration.observe(time.perf_counter() - started)
            raise _NoAnswer(f"cannot reach HubSpot: {type(err).__name__}") from err
        elapsed = time.perf_counter() - started
        self._m.duration.observe(elapsed)
        answer = _Answer(status, json_object(text), response_headers)
        self._log.debug(
            "crm_batch_sent",
            contacts=len(contacts),
            status=status,
            duration_ms=round(elapsed * 1000, 1),
            correlation_id=answer.body.get("correlationId"),
        )
        return answer

    # --- the answer --------------------------------------------------------------------------

    async def _classify(self, contacts: Contacts, answer: _Answer, *, resend: bool) -> Outcomes:
        status = answer.status
        if status in (200, 201):
            return self._accepted(contacts)
        if status == 207:
            return self._partly_accepted(contacts, answer)
        if status == 429:
            return self._rate_limited(contacts, answer)
        if status in (401, 403):
            return self._auth_rejected(contacts, answer)
        if status == 408 or status >= 500:
            return self._server_error(contacts, answer)
        if 400 <= status < 500:
            return await self._client_error(contacts, answer, resend=resend)
        self._m.requests.labels("server_error").inc()
        return every(contacts, Failure("retry", f"HubSpot answered an unexpected {status}"))

    def _accepted(self, contacts: Contacts) -> Outcomes:
        self._auth_ok()
        self._m.requests.labels("ok").inc()
        return every(contacts, None)

    def _partly_accepted(self, contacts: Contacts, answer: _Answer) -> Outcomes:
        self._auth_ok()
        self._m.requests.labels("partial").inc()
        return multi_status(contacts, answer.body)

    def _server_error(self, contacts: Contacts, answer: _Answer) -> Outcomes:
        self._m.requests.labels("server_error").inc()
        delay = retry_after_s(answer.headers.get("Retry-After"))
        message = "HubSpot: " + error_summary(answer.status, answer.body)
        return every(contacts, Failure("retry", message, delay))

    async def _client_error(self, contacts: Contacts, answer: _Answer, *, resend: bool) -> Outcomes:
        """A refused request: nothing was written. Blame whom the error names, if anyone."""
        self._m.requests.labels("client_error").inc()
        summary = "HubSpot refused the request: " + error_summary(answer.status, answer.body)
        if len(contacts) == 1:
            return every(contacts, Failure("reject", summary))
        named, _ = attribute(contacts, [answer.body], answer.status)
        rest = {email: props for email, props in contacts.items() if email not in named}
        outcomes: Outcomes = dict(named)
        if not named or not rest or not resend:
            outcomes.update(every(rest, Failure("retry", summary, isolate=True)))
        else:
            outcomes.update(await self._upsert(rest, resend=False))
        return outcomes

    def _rate_limited(self, contacts: Contacts, answer: _Answer) -> Outcomes:
        self._m.requests.labels("rate_limited").inc()
        policy = str(answer.body.get("policyName") or "")
        delay = self._rate_limit_delay(policy, answer.headers)
        self._limiter.pause(delay)
        self._log.warning(
            "crm_rate_limited", contacts=len(contacts), policy=policy, retry_in_s=delay
        )
        message = f"HubSpot rate limit reached ({policy or 'unknown policy'})"
        return every(contacts, Failure("retry", message, delay))

    def _rate_limit_delay(self, policy: str, headers: Mapping[str, str]) -> float:
        """``Retry-After``, else an hour for the daily limit, else the limit's interval; at
        most ``max_pause_s``."""
        cap = self.settings.max_pause_s
        delay = retry_after_s(headers.get("Retry-After"), max_s=cap)
        if delay is not None:
            return delay
        if policy.upper() == "DAILY":
            return min(_DAILY_LIMIT_DELAY_S, cap)
        interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", "").strip()
        if interval.isascii() and interval.isdigit() and len(interval) <= _INTERVAL_MAX_DIGITS:
            return min(int(interval) / 1000, cap)
        return min(self.settings.rate_window_s, cap)

    def _auth_rejected(self, contacts: Contacts, answer: _Answer) -> Outcomes:
        self._m.requests.labels("auth_failed").inc()
        delay = self.settings.auth_retry_delay_s
        self._auth_blocked_until = time.monotonic() + delay
        self._auth_message = (
            f"HubSpot rejected the token ({error_summary(answer.status, answer.body)}): check "
            "PUBRELAY_CRM__TOKEN and the private app's scope crm.objects.contacts.write; "
            f"HubSpot is not called again for {delay:g}s"
        )
        if not self._auth_failed:
            self._auth_failed = True
            self._m.auth_failed.set(1)
            self._log.error(
                "crm_auth_rejected",
                status=answer.status,
                category=answer.body.get("category"),
                correlation_id=answer.body.get("correlationId"),
                retry_in_s=delay,
            )
        return every(contacts, Failure("retry", self._auth_message, delay))

    def _auth_ok(self) -> None:
        if self._auth_failed:
            self._auth_failed = False
            self._auth_blocked_until = 0.0
            self._m.auth_failed.set(0)
            self._log.info("crm_auth_restored")


# --- the request body --------------------------------------------------------------------


def _payload(contacts: Contacts) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "id": email,
                "idProperty": "email",
                "objectWriteTraceId": str(n),
                "properties": properties,
            }
            for n, (email, properties) in enumerate(contacts.items())
        ]
    }
