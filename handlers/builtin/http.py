"""The ``http`` handler: POST each event, signed, to a downstream URL of your own.

Entry point ``http = "handlers.builtin.http:create"`` in group ``pubrelay.handlers``.

**Settings section.** The handler is enabled as ``http`` but reads ``PUBRELAY_FORWARD__*``:
``PUBRELAY_HTTP__*`` already configures pubrelay's own web server, and one variable must
not mean two things (``PUBRELAY_HTTP__TIMEOUT_S`` would otherwise be ambiguous).

=====================  ===========  ====================================================
variable               default      meaning
=====================  ===========  ====================================================
``URL``                (required)   where to POST, ``http://`` or ``https://``
``SECRET``             (required)   HMAC key of the signature (use 32+ random bytes)
``TIMEOUT_S``          ``10``       bound for one request
``HEADERS``            ``{}``       JSON map of extra headers (``Authorization``...)
``EVENT_TYPES``        ``[]``       event types to forward; empty: every typed one
=====================  ===========  ====================================================

**The request.** ``POST <URL>`` whose body is the webhook body exactly as Voucherify
sent it (the bytes on the bus, never re-serialised), with these headers:

* ``Content-Type: application/json``
* ``X-Pubrelay-Event-Id``: Voucherify's event id, stable across retries and redeliveries:
  de-duplicate on it, delivery is at least once.
* ``X-Pubrelay-Event-Type``: e.g. ``customer.publication.succeeded``.
* ``X-Pubrelay-Attempt``: 1 for the first attempt of this delivery, then 2, 3...
* ``X-Pubrelay-Timestamp``: unix seconds when this attempt was signed.
* ``X-Pubrelay-Signature: v1=<hex>``: lowercase hex HMAC-SHA256, keyed with ``SECRET``
  (UTF-8), over ``f"{timestamp}.".encode() + body``, the timestamp being the
  ``X-Pubrelay-Timestamp`` text. Several ``v1=`` entries separated by commas may appear
  (secret rotation): accept the request when any one matches.

**Verifying, on the receiving side** (what :func:`verify_forward_signature` does): read the
raw body before parsing it; recompute the HMAC over ``timestamp + "." + body``; compare in
constant time; refuse a timestamp more than 5 minutes (300 s) from your clock, either way,
which bounds replays of a captured request. Each attempt is signed afresh, so a retry
hours later still carries a current timestamp.

**Outcomes.** 2xx: done. 408, 429, 5xx, timeouts and connection errors:
:class:`RetryLater`, honouring ``Retry-After``. Other statuses (4xx, or a redirect, which
is never followed because a POST must not silently change target): :class:`HandlerError`
with the status and the start of the answer (e-mail addresses masked), so the event is
dead-lettered and can be replayed once the receiver is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import replace
from typing import Final

import aiohttp
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from structlog.typing import FilteringBoundLogger

from handlers.builtin.http_client import HttpUrlStr, client_session
from handlers.builtin.retry_after import retry_after_s
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, HandlerError, RetryLater
from schemas.masking import mask_emails

__all__ = [
    "SETTINGS_SECTION",
    "SIGNATURE_VERSION",
    "ForwardSettings",
    "HttpHandler",
    "create",
    "sign_forward",
    "verify_forward_signature",
]

SETTINGS_SECTION: Final = "forward"
"""The handler reads ``PUBRELAY_FORWARD__*`` (``PUBRELAY_HTTP__*`` is the web server's)."""
SIGNATURE_VERSION: Final = "v1"
DEFAULT_TOLERANCE_S: Final = 300.0

HEADER_EVENT_ID: Final = "X-Pubrelay-Event-Id"
HEADER_EVENT_TYPE: Final = "X-Pubrelay-Event-Type"
HEADER_ATTEMPT: Final = "X-Pubrelay-Attempt"
HEADER_TIMESTAMP: Final = "X-Pubrelay-Timestamp"
HEADER_SIGNATURE: Final = "X-Pubrelay-Signature"

_RESERVED: Final = frozenset({"content-type", "content-length", "host", "transfer-encoding"})
_SNIPPET_CHARS: Final = 200


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign_forward(secret: str | bytes, timestamp: str | int, body: bytes) -> str:
    """The ``X-Pubrelay-Signature`` value for ``body`` signed at ``timestamp``: ``v1=<hex>``."""
    digest = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={digest.hexdigest()}"


def verify_forward_signature(
    secret: str | bytes,
    timestamp: str | int | None,
    body: bytes,
    header: str | None,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (``X-Pubrelay-Signature``) signs ``body`` at a recent ``timestamp``.

    ``timestamp`` is the ``X-Pubrelay-Timestamp`` value; it must be an integer within
    ``tolerance_s`` of ``now`` (default: the current time), in the past or the future.
    Every ``v1=`` entry of the header is compared in constant time.
    """
    if timestamp is None or not header:
        return False
    text = str(timestamp).strip()
    # ASCII digits only, and short: "²" is a digit to str.isdigit, and a 5,000-digit
    # number overflows float arithmetic or int() itself.
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        return False
    current = time.time() if now is None else now
    if abs(current - int(text)) > tolerance_s:
        return False
    expected = hmac.digest(_key(secret), text.encode() + b"." + body, "sha256")
    ok = False
    for part in header.split(","):
        version, _, value = part.strip().partition("=")
        if version != SIGNATURE_VERSION:
            continue
        try:
            given = bytes.fromhex(value.strip())
        except ValueError:
            continue
        ok |= hmac.compare_digest(expected, given)
    return ok


class ForwardSettings(BaseModel):
    """The ``http`` handler's section, ``PUBRELAY_FORWARD__*``; unknown keys are refused so
    typos surface.

    Not ``PUBRELAY_HTTP__*``, although the handler is named ``http``: that section
    configures pubrelay's own web server, and one variable must not mean two things.
    """

    model_config = ConfigDict(extra="forbid")

    url: HttpUrlStr = Field(
        description="downstream endpoint, http:// or https://",
        examples=["https://notifications.internal/voucherify"],
    )
    secret: SecretStr = Field(description="HMAC-SHA256 key of X-Pubrelay-Signature")
    timeout_s: float = Field(default=10.0, gt=0, description="bound for one request to `URL`")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="JSON map of extra request headers, e.g. `Authorization`",
        examples=[{"Authorization": "Bearer a-token"}],
    )
    event_types: list[str] = Field(
        default_factory=list,
        description=(
            "empty: the types pubrelay models (`customer.publication.succeeded`, "
            "`publication.succeeded`)"
        ),
    )

    @field_validator("secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("headers")
    @classmethod
    def _allowed_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            lowered = name.lower()
            if lowered in _RESERVED or lowered.startswith("x-pubrelay-"):
                raise ValueError(f"header {name!r} is set by pubrelay and cannot be overridden")
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of header {name!r} contains a line break")
        return value


class HttpHandler:
    """Signs and POSTs every event; one ``aiohttp`` session between start and stop."""

    def __init__(
        self,
        *,
        name: str,
        settings: ForwardSettings,
        logger: FilteringBoundLogger,
        requests: Counter,
        duration: Histogram,
    ) -> None:
        self.name = name
        self.event_types = frozenset(settings.event_types)
        self.settings = settings
        self._secret = settings.secret.get_secret_value().encode()
        self._log = logger
        self._requests = requests
        self._duration = duration
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # keeps the secret and any credentials in headers out
        return f"HttpHandler(name={self.name!r})"

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = client_session(
                timeout_s=self.settings.timeout_s, user_agent="pubrelay-forward"
            )

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def signed_headers(self, event: Event, timestamp: int) -> dict[str, str]:
        """Every header of the request for ``event`` signed at ``timestamp``."""
        return {
            **self.settings.headers,
            "Content-Type": "application/json",
            HEADER_EVENT_ID: event.id,
            HEADER_EVENT_TYPE: event.type,
            HEADER_ATTEMPT: str(event.attempt),
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: sign_forward(self._secret, timestamp, event.raw),
        }

    async def handle(self, event: Event) -> None:
        session = self._session
        if session is None:
            raise RetryLater("the http handler is not running")
        headers = self.signed_headers(event, int(time.time()))
        started = time.perf_counter()
        try:
            async with session.post(
                self.settings.url, data=event.raw, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = retry_after_s(response.headers.get("Retry-After"))
                location = response.headers.get("Location", "")
                head = await response.content.read(_SNIPPET_CHARS * 4)
        except TimeoutError:
            self._count("network_error", started)
            raise RetryLater(
                f"the receiver did not answer within {self.settings.timeout_s}s"
            ) from None
        except aiohttp.ClientError as err:
            self._count("network_error", started)
            raise RetryLater(f"cannot reach the receiver: {type(err).__name__}") from err
        snippet = mask_emails(head.decode("utf-8", "replace"), max_chars=_SNIPPET_CHARS).strip()
        if 200 <= status < 300:
            self._count("ok", started)
            return
        if status in (408, 429) or status >= 500:
            self._count("retried", started)
            self._log.warning(
                "forward_retry", event_id=event.id, status=status, retry_in_s=retry_after
            )
            raise RetryLater(f"the receiver answered {status}: {snippet}", delay_s=retry_after)
        self._count("rejected", started)
        if 300 <= status < 400:
            raise HandlerError(
                f"the receiver answered {status} (redirect to {location!r} not followed for a "
                "POST): fix PUBRELAY_FORWARD__URL"
            )
        raise HandlerError(f"the receiver refused the event with {status}: {snippet}")

    def _count(self, result: str, started: float) -> None:
        self._duration.observe(time.perf_counter() - started)
        self._requests.labels(result).inc()


def create(context: HandlerContext) -> HttpHandler:
    """Entry point ``http = "handlers.builtin.http:create"`` in group ``pubrelay.handlers``.

    The settings come from ``PUBRELAY_FORWARD__*``: the context is copied under the section
    name (the handler keeps its own name, ``http``, for the ledger, topics and metrics).
    """
    section = replace(context, name=SETTINGS_SECTION)
    try:
        settings = section.settings(ForwardSettings)
    except ConfigError as err:
        text = str(err).replace(f"handler {SETTINGS_SECTION!r}", f"handler {context.name!r}")
        raise ConfigError(
            f"{text} (the {context.name!r} handler reads {section.env_prefix}*; "
            f"{context.env_prefix}* configures pubrelay's web server)"
        ) from None
    registry = context.metrics_registry
    return HttpHandler(
        name=context.name,
        settings=settings,
        logger=context.logger,
        requests=Counter(
            "pubrelay_forward_requests_total",
            "Forwarded event requests by result (ok, retried, rejected, network_error).",
            ["result"],
            registry=registry,
        ),
        duration=Histogram(
            "pubrelay_forward_request_duration_seconds",
            "Time of one forwarded event request.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
    )
