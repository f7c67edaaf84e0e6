"""Settings of the ``email`` handler (``PUBRELAY_EMAIL__*``) and what is derived from them.

Kept apart from the handler so the template renderer, the SMTP transport and the
``pubrelay preview-email`` command read one model without importing each other.

===============================  =======================  ====================================
variable                         default                  meaning
===============================  =======================  ====================================
``SENDER``                       (required)               ``From``: ``Shop <coupons@shop.io>``
``SMTP_URL``                     ``smtp://localhost:25``  ``smtp://host:port`` or
                                                          ``smtps://host:port`` (implicit TLS),
                                                          or ``outbox:`` (files, see outbox.py)
``STARTTLS``                     ``auto``                 ``auto`` (when offered), ``always``,
                                                          ``never``; not used with ``smtps://``
``USERNAME`` / ``PASSWORD``      (none)                   SMTP AUTH; sent only over TLS unless
                                                          ``ALLOW_PLAINTEXT_AUTH=true``
``CA_FILE``                      system CAs               PEM bundle trusted for the relay
``VERIFY_TLS``                   ``true``                 check the relay's certificate
``HELO_HOSTNAME``                the FQDN                 name sent in ``EHLO``
``REPLY_TO``                     (none)                   ``Reply-To`` header
``TEMPLATE_DIR``                 (built-ins only)         operator templates, see
                                                          :mod:`~handlers.builtin.email.rendering`
``CURRENCY_SYMBOL``              (none)                   ``$`` renders 1000 cents ``$10.00``
``DATE_FORMAT``                  ``%Y-%m-%d``             strftime format of expiry dates
``LIST_UNSUBSCRIBE``             (none)                   template of the ``List-Unsubscribe``
                                                          URI(s), comma-separated, e.g.
                                                          ``https://shop.io/unsub?c={{
                                                          customer.id }}``; every ``{{ }}``
                                                          is percent-encoded (``|urlencode``
                                                          not needed, never twice)
``LIST_UNSUBSCRIBE_ONE_CLICK``   ``false``                add ``List-Unsubscribe-Post``
                                                          (RFC 8058) for an https URI
``OPT_OUT_METADATA_KEY``         ``email_opt_out``        customer metadata key; ``true``,
                                                          ``"true"``, ``"yes"``, ``1`` opt out
``MAX_PER_S``                    ``10``                   messages per second (0: no limit)
``CONNECTIONS``                  ``1``                    SMTP connections kept open
``TIMEOUT_S``                    ``30``                   bound for one SMTP command
``EVENT_TYPES``                  both publication events  event types to act on
``SIBLING_HOLD_S``               ``20``                   how long an event lacking some of
                                                          its publication's codes waits for
                                                          the sibling event that lists them
                                                          (one retry: see ``handler.py``)
===============================  =======================  ====================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from handlers.builtin.email.outbox import OUTBOX_URL
from schemas.errors import ConfigError
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED

__all__ = [
    "EMAIL_EVENT_TYPES",
    "EmailSettings",
    "SenderAddress",
    "SmtpEndpoint",
    "parse_sender",
    "parse_smtp_url",
]

EMAIL_EVENT_TYPES: Final = frozenset({CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED})
_DEFAULT_PORTS: Final = {"smtp": 25, "smtps": 465}
_HEADER_BREAK: Final = re.compile(r"[\r\n]")


class EmailSettings(BaseModel):
    """The ``PUBRELAY_EMAIL__*`` section (the table above); unknown keys are refused so
    typos surface."""

    model_config = ConfigDict(extra="forbid")

    smtp_url: str = Field(
        default="smtp://localhost:25",
        description="`smtp://host:port`, `smtps://host:port`, or `outbox:` (write each e-mail "
        "to `<data dir>/outbox/` and send nothing; the console shows them)",
    )
    starttls: Literal["auto", "always", "never"] = Field(
        default="auto", description="`auto` (when offered), `always`, `never`"
    )
    username: str | None = Field(default=None, description="SMTP AUTH user (none: no AUTH)")
    password: SecretStr | None = Field(default=None, description="SMTP AUTH password; never logged")
    allow_plaintext_auth: bool = Field(
        default=False, description="allow AUTH over a connection without TLS"
    )
    ca_file: Path | None = Field(
        default=None,
        examples=["/etc/ssl/certs/relay-ca.pem"],
        description="PEM bundle trusted for the relay",
    )
    verify_tls: bool = Field(default=True, description="check the relay's certificate")
    helo_hostname: str | None = Field(
        default=None, description="EHLO name (default: this host's FQDN)"
    )
    sender: str | None = Field(
        default=None,
        examples=["Shop <coupons@shop.example>"],
        description=(
            "the From address, required by the handler, e.g. `Shop <coupons@shop.example>`"
        ),
    )
    reply_to: str | None = Field(default=None, description="Reply-To")
    template_dir: Path | None = Field(
        default=None,
        description="your templates, tried before the built-in ones (see the `email` handler)",
    )
    currency_symbol: str = Field(default="", description="prefix of amounts: `$` gives `$10.00`")
    date_format: str = Field(default="%Y-%m-%d", description="format of dates")
    list_unsubscribe: str | None = Field(
        default=None,
        description=(
            "List-Unsubscribe template (`mailto:` or `https:` URIs, comma-separated),"
            " e.g. `https://shop.example/unsub?c={{ customer.id }}`; each `{{ … }}` "
            "is percent-encoded"
        ),
    )
    list_unsubscribe_one_click: bool = Field(
        default=False, description="add `List-Unsubscribe-Post` (RFC 8058) for https URLs"
    )
    opt_out_metadata_key: str = Field(
        default="email_opt_out", description="customer metadata key that opts out"
    )
    max_per_s: float = Field(default=10.0, ge=0, description="messages per second; 0: no limit")
    connections: int = Field(default=1, ge=1, le=32, description="SMTP connections kept open")
    timeout_s: float = Field(default=30.0, gt=0, description="bound for one SMTP command")
    event_types: list[str] = Field(
        default_factory=lambda: sorted(EMAIL_EVENT_TYPES), description="event types to act on"
    )
    sibling_hold_s: float = Field(
        default=20.0,
        ge=0,
        description="how long an event lacking some of its publication's codes waits for the "
        "sibling event listing them all, before the API or a partial e-mail (one retry of "
        "PUBRELAY_WORKER__MAX_ATTEMPTS; capped by PUBRELAY_WORKER__RETRY_MAX_DELAY_S); 0: none",
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str) -> str:
        if value != OUTBOX_URL:
            parse_smtp_url(value)  # raises ValueError with the reason
        return value

    @field_validator("sender", "reply_to")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and _HEADER_BREAK.search(value):
            raise ValueError("must be one line")
        return value.strip() if value is not None else None


@dataclass(frozen=True, slots=True)
class SmtpEndpoint:
    """Where the relay is: ``implicit_tls`` for ``smtps://`` (TLS from the first byte)."""

    host: str
    port: int
    implicit_tls: bool


def parse_smtp_url(url: str) -> SmtpEndpoint:
    """``smtp://host[:port]`` (port 25) or ``smtps://host[:port]`` (port 465)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.username or parts.password:
        raise ValueError("must not hold credentials: set USERNAME and PASSWORD instead")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must be only scheme://host:port")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"has an invalid port: {err}") from None
    return SmtpEndpoint(parts.hostname, port or _DEFAULT_PORTS[scheme], scheme == "smtps")


@dataclass(frozen=True, slots=True)
class SenderAddress:
    """The ``From`` header as configured and the bare address for ``MAIL FROM``."""

    header: str
    address: str
    domain: str


def parse_sender(value: str | None, variable: str) -> SenderAddress:
    """Check the configured sender; :class:`ConfigError` naming ``variable`` if unusable."""
    if not value:
        raise ConfigError(
            f"{variable} is required when the email handler is enabled: the From address, "
            "such as 'Shop <coupons@shop.example>'"
        )
    _, address = parseaddr(value)
    try:
        parsed = Address(addr_spec=address)
    except (ValueError, IndexError) as err:
        raise ConfigError(f"{variable}: {value!r} is not an e-mail address ({err})") from None
    if not parsed.username or not parsed.domain:
        raise ConfigError(f"{variable}: {value!r} is not an e-mail address (user@domain)")
    return SenderAddress(value, parsed.addr_spec, parsed.domain)
