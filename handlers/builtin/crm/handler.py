"""The ``crm`` handler: upsert the customer of each publication as a HubSpot CRM contact.

Entry point ``crm = "handlers.builtin.crm.handler:create"`` in group ``pubrelay.handlers``. Each
``customer.publication.succeeded`` event becomes one contact upsert keyed by the
customer's e-mail address, sent in batches to HubSpot's CRM v3 endpoint
``POST {base_url}/crm/v3/objects/contacts/batch/upsert`` with
``{"inputs": [{"id": <email>, "idProperty": "email", "objectWriteTraceId": <n>,
"properties": {...}}]}`` and ``Authorization: Bearer <token>``.

Settings (``PUBRELAY_CRM__*``):

==========================  ============================  =========================================
variable                    default                       meaning
==========================  ============================  =========================================
``TOKEN``                   (required)                    HubSpot private-app access token with the
                                                          scope ``crm.objects.contacts.write``
``BASE_URL``                ``https://api.hubapi.com``    where the API lives
``PROPERTIES``              see below                     JSON map HubSpot property -> field path
``BATCH_WINDOW_S``          ``0.5``                       how long a batch collects contacts
``BATCH_SIZE``              ``100``                       contacts per request (HubSpot's maximum)
``TIMEOUT_S``               ``10``                        bound for one HubSpot request
``MAX_REQUESTS_PER_10S``    ``100``                       client-side rate limit; HubSpot's is per
                                                          portal (100 to 190 per 10 s by plan), so
                                                          leave room for other apps of the portal
``RATE_WINDOW_S``           ``10``                        the limit's window (HubSpot's is 10 s)
``AUTH_RETRY_DELAY_S``      ``300``                       pause after HubSpot rejected the token
``EVENT_TYPES``             ``customer.publication...``   event types to act on
==========================  ============================  =========================================

**Property paths.** ``PROPERTIES`` maps a HubSpot contact property (internal name; custom
properties must exist in the portal) to a dotted path resolved on the typed event
(:class:`schemas.events.CustomerPublicationSucceededData`): ``voucher.code``,
``voucher.campaign``, ``campaign.name``, ``campaign.id``, ``publication.channel``,
``publication.created_at``, ``publication.id``, ``customer.id``, ``customer.source_id``,
``customer.name``, ``customer.metadata.<key>``... A path starting with ``event.`` reads the
envelope's event instead (``event.id``, ``event.type``, ``event.created_at``). Paths are
checked against the models at start-up. Values are sent as text: date-times as ISO 8601
UTC (``2024-05-01T12:00:00.000Z``, which HubSpot date-time properties accept), booleans as
``true``/``false``, objects as compact JSON; a missing value leaves the property as it is.
The defaults (:data:`DEFAULT_PROPERTIES`) write the last published code, campaign,
channel and publication time.

**Batching.** ``handle`` adds the contact to the open batch and waits for that contact's
own result. A batch is sent when it holds ``BATCH_SIZE`` contacts or ``BATCH_WINDOW_S``
after its first one. HubSpot rejects a batch naming the same id twice, so two events for
one e-mail address in one batch are merged (property by property, the later event wins)
and both calls get the merged request's result. The worker already serialises events of
one customer, so a merge only joins different customers sharing an address.

**Outcomes per contact** (what ``handle`` raises; see :mod:`handlers.types`):

* 200, or 207 without an error naming the contact: returns (the upsert is done).
* 207 error naming the contact (its ``context`` lists our ``objectWriteTraceId`` or the
  id): :class:`HandlerError` for that contact only; the others succeed.
* 400 and other 4xx: the whole request was refused. Contacts the error names get
  :class:`HandlerError` and the rest are re-sent at once. When the error names none
  (say a property that does not exist) a lone contact gets :class:`HandlerError`; in a
  larger batch every contact gets :class:`RetryLater` and is sent alone on its next
  attempt, so one bad contact never dead-letters its batch mates.
* 429: :class:`RetryLater` with ``Retry-After`` (else HubSpot's rate-limit interval, or an
  hour for the ``DAILY`` policy) and the client-side limiter pauses for that long.
* 5xx, 408, timeouts, connection errors: :class:`RetryLater` (transient).
* 401/403 (revoked token, missing scope): :class:`RetryLater` with ``AUTH_RETRY_DELAY_S``,
  not a dead letter. A bad token is a fault of the whole handler, not of the event: it is
  logged once as ``crm_auth_rejected`` and shown by the gauge ``pubrelay_crm_auth_failed``
  (alert on it), and while it lasts ``handle`` fails fast without calling HubSpot (no
  storm of rejected requests). Events wait through the worker's retries, giving the
  operator time to rotate the token; what exhausts its attempts is dead-lettered and
  ``pubrelay replay`` sends it back once the token works.
* no customer e-mail: :class:`SkipEvent` (counted as ``skipped``).

The token is never logged, and neither are e-mail addresses: logs name event ids, and
HubSpot's error texts are masked before they reach a log line or a dead letter.
"""

from __future__ import annotations

import asyncio
import json
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Final, Literal, Union, get_args, get_origin

import aiohttp
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from structlog.typing import FilteringBoundLogger

from handlers.builtin.ratelimit import RateLimiter
from handlers.builtin.retry_after import retry_after_s
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, HandlerError, RetryLater, SkipEvent
from schemas.events import (
    CUSTOMER_PUBLICATION_SUCCEEDED,
    CustomerPublicationSucceededData,
    PublicationSucceededData,
    WebhookEvent,
)
from schemas.masking import mask_emails

__all__ = [
    "DEFAULT_PROPERTIES",
    "UPSERT_PATH",
    "CrmSettings",
    "HubSpotHandler",
    "create",
]

UPSERT_PATH: Final = "/crm/v3/objects/contacts/batch/upsert"
HUBSPOT_MAX_BATCH: Final = 100
DEFAULT_PROPERTIES: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "voucherify_last_coupon_code": "voucher.code",
        "voucherify_last_campaign": "campaign.name",
        "voucherify_last_channel": "publication.channel",
        "voucherify_last_published_at": "publication.created_at",
    }
)
_DAILY_LIMIT_DELAY_S: Final = 3600.0
_ISOLATE_MAX: Final = 10_000
_ID_KEYS: Final = ("ids", "id", "email", "emails", "inputs")
_TRACE_KEYS: Final = ("objectWriteTraceId", "objectWriteTraceIds")


class CrmSettings(BaseModel):
    """The ``PUBRELAY_CRM__*`` section; unknown keys are refused so typos surface."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr | None = Field(default=None, description="HubSpot private-app token")
    base_url: str = Field(default="https://api.hubapi.com", description="HubSpot API root")
    properties: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROPERTIES),
        description="HubSpot contact property -> event field path",
    )
    batch_window_s: float = Field(default=0.5, ge=0, le=60)
    batch_size: int = Field(default=HUBSPOT_MAX_BATCH, ge=1, le=HUBSPOT_MAX_BATCH)
    timeout_s: float = Field(default=10.0, gt=0)
    max_requests_per_10s: int = Field(default=100, ge=1)
    rate_window_s: float = Field(default=10.0, gt=0, description="HubSpot's window is 10 s")
    auth_retry_delay_s: float = Field(default=300.0, ge=0)
    event_types: list[str] = Field(default_factory=lambda: [CUSTOMER_PUBLICATION_SUCCEEDED])

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


# --- field paths -----------------------------------------------------------------------

_ANY: Final = object()
"""A path segment below a free-form mapping (``metadata``): anything goes from there."""


def _models_of(annotation: Any) -> tuple[type[BaseModel], ...] | object | None:
    """The models a field holds, :data:`_ANY` for a mapping or ``Any``, ``None`` for scalars."""
    if annotation is Any:
        return _ANY
    origin = get_origin(annotation)
    if origin in (dict, Mapping) or annotation is dict:
        return _ANY
    if origin in (Union, types.UnionType) or (origin is not None and get_args(annotation)):
        found: list[type[BaseModel]] = []
        for arg in get_args(annotation):
            sub = _models_of(arg)
            if sub is _ANY:
                return _ANY
            if isinstance(sub, tuple):
                found.extend(sub)
        if origin is list:
            return None
        return tuple(found) or None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return (annotation,)
    return None


def _check_path(prop: str, path: str) -> tuple[str, ...]:
    """Split ``path`` and check it names fields of the event models (ConfigError if not)."""
    parts = tuple(path.split("."))
    where = f"PUBRELAY_CRM__PROPERTIES: {prop!r} -> {path!r}"
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: a field path is dotted names such as 'voucher.code'")
    if parts[0] == "event":
        models: tuple[type[BaseModel], ...] | object | None = (WebhookEvent,)
        rest = parts[1:]
        if not rest:
            raise ConfigError(f"{where}: name a field of the event, such as 'event.id'")
    else:
        models, rest = (CustomerPublicationSucceededData,), parts
    for depth, part in enumerate(rest):
        if models is _ANY:
            break
        if not isinstance(models, tuple):
            raise ConfigError(f"{where}: {rest[depth - 1]!r} is a value, not an object")
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            names = "/".join(m.__name__ for m in models)
            raise ConfigError(f"{where}: {part!r} is not a field of {names}")
        models = _models_of(fields[0].annotation)
    return parts


def _resolve(event: Event, parts: tuple[str, ...]) -> Any:
    """The value at ``parts`` in the event, ``None`` where any step is missing."""
    envelope = event.envelope
    node: Any
    if parts[0] == "event":
        node, parts = envelope.event, parts[1:]
    else:
        node = envelope.data
    for part in parts:
        if isinstance(node, BaseModel):
            extra = node.model_extra or {}
            if part in type(node).model_fields:
                node = getattr(node, part)
            elif part in extra:
                node = extra[part]
            else:
                return None
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
        if node is None:
            return None
    return node


def _as_property(value: Any) -> str | None:
    """HubSpot property values are text; ``None`` means "leave the property alone"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


# --- helpers shared by the request paths ---------------------------------------------------


# --- batching --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one contact failed: ``reject`` dead-letters it, ``retry`` retries it."""

    kind: Literal["reject", "retry"]
    message: str
    delay_s: float | None = None
    isolate: bool = False

    def error(self) -> HandlerError | RetryLater:
        if self.kind == "reject":
            return HandlerError(self.message)
        return RetryLater(self.message, delay_s=self.delay_s)


@dataclass(slots=True)
class _Contact:
    """One upsert input: the merged properties of every event for this address."""

    email: str
    properties: dict[str, str]
    event_ids: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    contacts: dict[str, _Contact] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True, slots=True)
class _Metrics:
    requests: Counter
    contacts: Counter
    batch_size: Histogram
    duration: Histogram
    auth_failed: Gauge


def _metrics(context: HandlerContext) -> _Metrics:
    registry = context.metrics_registry
    return _Metrics(
        requests=Counter(
            "pubrelay_crm_requests_total",
            "HubSpot batch upsert requests by result (ok, partial, rate_limited, auth_failed, "
            "client_error, server_error, network_error)",
            ["result"],
            registry=registry,
        ),
        contacts=Counter(
            "pubrelay_crm_contacts_total",
            "Contacts by outcome (upserted, rejected, retried, skipped)",
            ["outcome"],
            registry=registry,
        ),
        batch_size=Histogram(
            "pubrelay_crm_batch_size",
            "Contacts per HubSpot batch upsert request",
            buckets=(1, 2, 5, 10, 25, 50, 100),
            registry=registry,
        ),
        duration=Histogram(
            "pubrelay_crm_request_duration_seconds",
            "Time of one HubSpot batch upsert request",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
        auth_failed=Gauge(
            "pubrelay_crm_auth_failed",
            "1 while HubSpot rejects the configured token (401/403), else 0",
            registry=registry,
        ),
    )


def _error_summary(status: int | None, body: Mapping[str, Any]) -> str:
    """``400 VALIDATION_ERROR: <masked message> (correlationId ...)``, bounded."""
    category = body.get("category") or body.get("errorType") or ""
    message = mask_emails(str(body.get("message") or "")[:300])
    text = f"{status or ''} {category}".strip()
    if message:
        text += f": {message}"
    correlation = body.get("correlationId")
    if correlation:
        text += f" (correlationId {correlation})"
    return text


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, str | int):
                yield str(item)


def _targets(error: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The trace ids and ids an error names (in its ``context`` or its sub-errors')."""
    traces: set[str] = set()
    ids: set[str] = set()
    contexts: list[Any] = [error.get("context")]
    for sub in error.get("errors") or ():
        if isinstance(sub, Mapping):
            contexts.append(sub.get("context"))
    for context in contexts:
        if not isinstance(context, Mapping):
            continue
        for key in _TRACE_KEYS:
            traces.update(_strings(context.get(key)))
        for key in _ID_KEYS:
            ids.update(s.strip().lower() for s in _strings(context.get(key)))
    if isinstance(error.get("id"), str):
        ids.add(error["id"].strip().lower())
    return traces, ids


class HubSpotHandler:
    """Batches contact upserts to HubSpot; one ``aiohttp`` session between start and stop."""

    def __init__(
        self,
        *,
        name: str,
        settings: CrmSettings,
        token: str,
        paths: Mapping[str, tuple[str, ...]],
        logger: FilteringBoundLogger,
        metrics: _Metrics,
    ) -> None:
        self.name = name
        self.event_types = frozenset(settings.event_types)
        self.settings = settings
        self._token = token
        self._paths = dict(paths)
        self._url = settings.base_url + UPSERT_PATH
        self._log = logger
        self._m = metrics
        self._limiter = RateLimiter(settings.max_requests_per_10s, settings.rate_window_s)
        self._session: aiohttp.ClientSession | None = None
        self._batch: _Batch | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._isolate: set[str] = set()
        self._auth_blocked_until = 0.0
        self._auth_failed = False
        self._auth_message = ""

    def __repr__(self) -> str:  # keeps the token out of any repr
        return f"HubSpotHandler(name={self.name!r}, url={self._url!r})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                headers={"User-Agent": "pubrelay-crm"},
            )
            self._m.auth_failed.set(0)

    async def stop(self) -> None:
        """Send the open batch, wait (bounded) for requests in flight, close the session."""
        self._flush()
        if self._tasks:
            bound = self.settings.timeout_s + self.settings.rate_window_s
            _, pending = await asyncio.wait(set(self._tasks), timeout=bound)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- handling ----------------------------------------------------------------------------

    async def handle(self, event: Event) -> None:
        email, properties = self._contact(event)
        if self._session is None:
            raise RetryLater("the crm handler is not running")
        blocked = self._auth_blocked_until - time.monotonic()
        if blocked > 0:
            self._m.contacts.labels("retried").inc()
            raise RetryLater(self._auth_message, delay_s=blocked)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if event.id in self._isolate:
            self._isolate.discard(event.id)
            solo = _Batch({email: _Contact(email, properties, [event.id], [waiter])})
            self._launch(solo)
        else:
            self._add(email, properties, event.id, waiter)
        await waiter

    def _contact(self, event: Event) -> tuple[str, dict[str, str]]:
        """The address and the mapped properties of ``event``; SkipEvent without an address."""
        data = event.envelope.data
        if not isinstance(data, CustomerPublicationSucceededData | PublicationSucceededData):
            self._m.contacts.labels("skipped").inc()
            raise SkipEvent(f"event type {event.type!r} names no customer to upsert")
        email = (data.customer_email or "").strip().lower()
        if not email:
            self._m.contacts.labels("skipped").inc()
            raise SkipEvent("the customer has no e-mail address; HubSpot contacts are keyed by it")
        properties: dict[str, str] = {}
        for prop, parts in self._paths.items():
            value = _as_property(_resolve(event, parts))
            if value is not None:
                properties[prop] = value
        return email, properties

    def _add(
        self, email: str, properties: dict[str, str], event_id: str, waiter: asyncio.Future[None]
    ) -> None:
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(self.settings.batch_window_s, self._flush_if, batch)
        contact = batch.contacts.get(email)
        if contact is None:
            batch.contacts[email] = _Contact(email, properties, [event_id], [waiter])
        else:  # one id per batch for HubSpot: merge, the later event wins per property
            contact.properties.update(properties)
            contact.event_ids.append(event_id)
            contact.waiters.append(waiter)
        if len(batch.contacts) >= self.settings.batch_size:
            self._flush()

    def _flush_if(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            self._launch(batch)

    def _launch(self, batch: _Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        contacts = list(batch.contacts.values())
        try:
            outcomes = await self._upsert(contacts, resend=True)
        except asyncio.CancelledError:
            self._settle(contacts, {}, _Failure("retry", "the crm handler is stopping"))
            raise
        except Exception as err:  # a bug here must not leave callers waiting forever
            self._log.exception("crm_batch_failed", error_type=type(err).__name__)
            failure = _Failure("retry", f"unexpected error: {type(err).__name__}")
            self._settle(contacts, {}, failure)
            return
        self._settle(contacts, outcomes, None)

    def _settle(
        self,
        contacts: list[_Contact],
        outcomes: Mapping[str, _Failure | None],
        default: _Failure | None,
    ) -> None:
        for contact in contacts:
            failure = outcomes.get(contact.email, default)
            if failure is None:
                self._m.contacts.labels("upserted").inc(len(contact.waiters))
            elif failure.kind == "reject":
                self._m.contacts.labels("rejected").inc(len(contact.waiters))
                self._log.warning(
                    "crm_contact_rejected", event_ids=contact.event_ids, error=failure.message
                )
            else:
                self._m.contacts.labels("retried").inc(len(contact.waiters))
                if failure.isolate and len(self._isolate) < _ISOLATE_MAX:
                    self._isolate.update(contact.event_ids)
            for waiter in contact.waiters:
                if waiter.done():
                    continue
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure.error())

    # --- one request ---------------------------------------------------------------------

    async def _upsert(
        self, contacts: list[_Contact], *, resend: bool
    ) -> dict[str, _Failure | None]:
        """Send ``contacts`` in one request; the outcome of each, keyed by address."""
        session = self._session
        if session is None:
            return self._all(contacts, _Failure("retry", "the crm handler is stopping"))
        await self._limiter.acquire()
        blocked = self._auth_blocked_until - time.monotonic()
        if blocked > 0:
            return self._all(contacts, _Failure("retry", self._auth_message, blocked))
        payload = {
            "inputs": [
                {
                    "id": c.email,
                    "idProperty": "email",
                    "objectWriteTraceId": str(n),
                    "properties": c.properties,
                }
                for n, c in enumerate(contacts)
            ]
        }
        headers = {"Authorization": f"Bearer {self._token}"}
        self._m.batch_size.observe(len(contacts))
        started = time.perf_counter()
        try:
            async with session.post(self._url, json=payload, headers=headers) as response:
                status = response.status
                text = await response.text(errors="replace")
                response_headers = response.headers
        except TimeoutError:
            return self._transient(
                contacts, started, f"HubSpot did not answer within {self.settings.timeout_s}s"
            )
        except aiohttp.ClientError as err:
            return self._transient(contacts, started, f"cannot reach HubSpot: {type(err).__name__}")
        elapsed = time.perf_counter() - started
        self._m.duration.observe(elapsed)
        body = _json_object(text)
        self._log.debug(
            "crm_batch_sent",
            contacts=len(contacts),
            status=status,
            duration_ms=round(elapsed * 1000, 1),
            correlation_id=body.get("correlationId"),
        )
        if status in (200, 201):
            self._auth_ok()
            self._m.requests.labels("ok").inc()
            return dict.fromkeys((c.email for c in contacts), None)
        if status == 207:
            self._auth_ok()
            self._m.requests.labels("partial").inc()
            return self._multi_status(contacts, body)
        if status == 429:
            return self._rate_limited(contacts, body, response_headers)
        if status in (401, 403):
            return self._auth_rejected(contacts, status, body)
        if status == 408 or status >= 500:
            self._m.requests.labels("server_error").inc()
            delay = retry_after_s(response_headers.get("Retry-After"))
            return self._all(
                contacts, _Failure("retry", "HubSpot: " + _error_summary(status, body), delay)
            )
        if 400 <= status < 500:
            self._m.requests.labels("client_error").inc()
            return await self._client_error(contacts, status, body, resend=resend)
        self._m.requests.labels("server_error").inc()
        return self._all(contacts, _Failure("retry", f"HubSpot answered an unexpected {status}"))

    @staticmethod
    def _all(contacts: list[_Contact], failure: _Failure | None) -> dict[str, _Failure | None]:
        return dict.fromkeys((c.email for c in contacts), failure)

    def _transient(
        self, contacts: list[_Contact], started: float, message: str
    ) -> dict[str, _Failure | None]:
        self._m.duration.observe(time.perf_counter() - started)
        self._m.requests.labels("network_error").inc()
        self._log.warning("crm_request_failed", contacts=len(contacts), error=message)
        return self._all(contacts, _Failure("retry", message))

    def _attribute(
        self, contacts: list[_Contact], errors: Iterable[Any], status: int | None
    ) -> tuple[dict[str, _Failure], list[str]]:
        """Map errors to the contacts they name; the summaries of errors naming none."""
        by_trace = {str(n): c.email for n, c in enumerate(contacts)}
        by_email = {c.email for c in contacts}
        named: dict[str, _Failure] = {}
        unnamed: list[str] = []
        for error in errors:
            if not isinstance(error, Mapping):
                continue
            summary = "HubSpot rejected the contact: " + _error_summary(status, error)
            traces, ids = _targets(error)
            emails = {by_trace[t] for t in traces if t in by_trace} | (ids & by_email)
            if not emails:
                unnamed.append(summary)
            for email in emails:
                named.setdefault(email, _Failure("reject", summary))
        return named, unnamed

    def _multi_status(
        self, contacts: list[_Contact], body: Mapping[str, Any]
    ) -> dict[str, _Failure | None]:
        errors = body.get("errors")
        named, unnamed = self._attribute(contacts, errors if isinstance(errors, list) else (), None)
        outcomes: dict[str, _Failure | None] = self._all(contacts, None)
        outcomes.update(named)
        results = body.get("results")
        done = len(results) if isinstance(results, list) else 0
        if unnamed and done + len(named) < len(contacts):
            # Some contact failed without being named: retry the unnamed ones alone
            # (an upsert repeated is harmless), so the culprit is found on its own.
            failure = _Failure("retry", unnamed[0], isolate=True)
            for contact in contacts:
                if contact.email not in named:
                    outcomes[contact.email] = failure
        return outcomes

    async def _client_error(
        self, contacts: list[_Contact], status: int, body: Mapping[str, Any], *, resend: bool
    ) -> dict[str, _Failure | None]:
        """A refused request: nothing was written. Blame whom the error names, if anyone."""
        summary = "HubSpot refused the request: " + _error_summary(status, body)
        if len(contacts) == 1:
            return self._all(contacts, _Failure("reject", summary))
        named, _ = self._attribute(contacts, [body], status)
        rest = [c for c in contacts if c.email not in named]
        if not named or not rest or not resend:
            outcomes: dict[str, _Failure | None] = self._all(
                rest, _Failure("retry", summary, isolate=True)
            )
            outcomes.update(named)
            return outcomes
        outcomes = dict(named)
        outcomes.update(await self._upsert(rest, resend=False))
        return outcomes

    def _rate_limited(
        self, contacts: list[_Contact], body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> dict[str, _Failure | None]:
        self._m.requests.labels("rate_limited").inc()
        policy = str(body.get("policyName") or "")
        delay = retry_after_s(headers.get("Retry-After"))
        if delay is None and policy.upper() == "DAILY":
            delay = _DAILY_LIMIT_DELAY_S
        if delay is None:
            interval = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds", "")
            delay = int(interval) / 1000 if interval.isdigit() else self.settings.rate_window_s
        self._limiter.pause(delay)
        self._log.warning(
            "crm_rate_limited", contacts=len(contacts), policy=policy, retry_in_s=delay
        )
        message = f"HubSpot rate limit reached ({policy or 'unknown policy'})"
        return self._all(contacts, _Failure("retry", message, delay))

    def _auth_rejected(
        self, contacts: list[_Contact], status: int, body: Mapping[str, Any]
    ) -> dict[str, _Failure | None]:
        self._m.requests.labels("auth_failed").inc()
        delay = self.settings.auth_retry_delay_s
        self._auth_blocked_until = time.monotonic() + delay
        self._auth_message = (
            f"HubSpot rejected the token ({_error_summary(status, body)}): check "
            "PUBRELAY_CRM__TOKEN and the private app's scope crm.objects.contacts.write; "
            f"HubSpot is not called again for {delay:g}s"
        )
        if not self._auth_failed:
            self._auth_failed = True
            self._m.auth_failed.set(1)
            self._log.error(
                "crm_auth_rejected",
                status=status,
                category=body.get("category"),
                correlation_id=body.get("correlationId"),
                retry_in_s=delay,
            )
        return self._all(contacts, _Failure("retry", self._auth_message, delay))

    def _auth_ok(self) -> None:
        if self._auth_failed:
            self._auth_failed = False
            self._auth_blocked_until = 0.0
            self._m.auth_failed.set(0)
            self._log.info("crm_auth_restored")


def _json_object(text: str) -> dict[str, Any]:
    """HubSpot's JSON answer, or ``{}`` for anything else (a proxy's HTML page...)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def create(context: HandlerContext) -> HubSpotHandler:
    """Entry point ``crm`` in group ``pubrelay.handlers`` (see ``pyproject.toml``)."""
    settings = context.settings(CrmSettings)
    token = settings.token.get_secret_value().strip() if settings.token is not None else ""
    if not token:
        raise ConfigError(
            f"{context.env_prefix}TOKEN is required when the crm handler is enabled: a HubSpot "
            "private-app access token with the scope crm.objects.contacts.write"
        )
    if not settings.properties:
        raise ConfigError(f"{context.env_prefix}PROPERTIES maps no property: nothing to write")
    paths = {prop: _check_path(prop, path) for prop, path in settings.properties.items()}
    return HubSpotHandler(
        name=context.name,
        settings=settings,
        token=token,
        paths=paths,
        logger=context.logger,
        metrics=_metrics(context),
    )
