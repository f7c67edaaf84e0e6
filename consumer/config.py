"""Settings of the HTTP server (``PUBRELAY_HTTP__*``) and the webhook intake
(``PUBRELAY_WEBHOOK__*``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Final

from pydantic import BaseModel, Field, SecretStr, field_validator

from schemas.errors import EXAMPLE_PLACEHOLDERS


class HttpSettings(BaseModel):
    host: str = Field(
        default="127.0.0.1", description="address to listen on (`0.0.0.0` in a container)"
    )
    port: int = Field(default=8080, ge=0, le=65535, description="port to listen on")
    max_body_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description=(
            "larger bodies get 413; on Kafka at most `PUBRELAY_BUS__MAX_RECORD_BYTES`"
            " minus 65536 (checked at start)"
        ),
    )
    shutdown_timeout_s: float = Field(
        default=10.0, ge=0, description="time for open requests on stop"
    )
    # Guards against clients that send slowly or not at all (consumer/body.py).
    body_read_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=9.0,
        description=(
            "a body not received within this time after its headers is answered 408 "
            "and its connection closed (at most 9; it plus "
            "`PUBRELAY_BUS__PUBLISH_TIMEOUT_S` must stay under Voucherify's 10 s)"
        ),
    )
    max_concurrent_bodies: int = Field(
        default=1000,
        gt=0,
        description="bodies being received at once; one more is answered 503 `busy` at once",
    )
    max_concurrent_large_bodies: int = Field(
        default=32,
        gt=0,
        description=(
            "of those, bodies over 64 KiB (each may grow to `MAX_BODY_BYTES`); one "
            "more is answered 503 `busy` at once"
        ),
    )
    keepalive_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description=(
            "a connection idle this long, or whose request headers are not complete "
            "by then, is closed; behind a load balancer that keeps connections open, "
            "set it above the balancer's idle timeout (AWS ALB and nginx: 60 s), e.g."
            " `75`"
        ),
    )
    # What a connection's request headers may hold: at most about twice their product
    # (aiohttp keeps the raw and the decoded header), also while they are incomplete.
    max_headers: int = Field(
        default=64,
        gt=0,
        description=(
            "header lines a request may have; more is answered 400 (aiohttp's default: 128)"
        ),
    )
    max_header_bytes: int = Field(
        default=4096,
        gt=0,
        description=(
            "bytes of one header line; longer is answered 400 (aiohttp's default: "
            "8190). With `MAX_HEADERS` it bounds what a connection holds before its "
            "headers are complete: about 512 KiB"
        ),
    )


_SERVED_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


class WebhookSettings(BaseModel):
    path: str = Field(
        default="/webhooks/voucherify",
        description="the webhook path (not `/healthz`, `/readyz`, `/metrics` or under `/console/`)",
    )
    secrets: list[SecretStr] = Field(
        default_factory=list,
        description=(
            "JSON list of the webhook secrets from Voucherify (several during a "
            "rotation); empty: generated in the data dir on the embedded bus (to try "
            "pubrelay); on Kafka none is generated (a file already there is used, with "
            "the warning `webhook_secret_from_file`)"
        ),
    )
    allow_unsigned: bool = Field(
        default=False,
        description="DANGER: accept unsigned requests (local experiments only; logged loudly)",
    )
    # Handlers parse with pydantic, whose JSON parser stops at about 200 levels: keep the
    # intake's limit well below, so what is accepted can always be parsed downstream.
    max_json_depth: int = Field(
        default=64,
        gt=0,
        le=128,
        description=("deeper bodies are quarantined (at most 128, which handlers can still parse)"),
    )
    max_event_age_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "quarantine events whose `event.created_at` is older, missing or "
            "unreadable (replay protection; Voucherify retries for about a day, so "
            "e.g. `259200`, and keep it below `PUBRELAY_LEDGER__RETENTION_S`)"
        ),
    )
    allowed_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="JSON list of addresses/networks allowed to post; empty allows all",
    )
    trust_forwarded_for: bool = Field(
        default=False,
        description=(
            "take the client address from `X-Forwarded-For` (every line of it, in "
            "order): the entry your proxy appended, the last one by default; without "
            "the header, the peer's address"
        ),
    )
    trusted_proxy_hops: int = Field(
        default=1,
        ge=1,
        le=16,
        description=(
            "with `TRUST_FORWARDED_FOR`: how many proxies in front of pubrelay append"
            " to `X-Forwarded-For`; the client address is the entry that many from "
            "the right (fewer entries: 403)"
        ),
    )
    retry_after_s: int = Field(default=30, gt=0, description="`Retry-After` of a 503")

    @field_validator("path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        # Matched byte for byte against the request line (consumer/http1.py).
        plain = value.isascii() and value.isprintable() and not set(value) & set(" ?#")
        if not value.startswith("/") or not plain:
            raise ValueError(
                "must start with / and hold only printable ASCII without spaces, ? or #"
            )
        # The same port serves these (consumer/app.py); a webhook on one of them would
        # shadow the console's forms or share a path with a probe.
        if value in _SERVED_PATHS or value == "/console" or value.startswith("/console/"):
            raise ValueError(
                "is served already: choose a path other than /healthz, /readyz, /metrics"
                " and /console/"
            )
        return value

    @field_validator("secrets")
    @classmethod
    def _no_empty_secret(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty HMAC key is a key anyone can sign with.
        if any(not s.get_secret_value().strip() for s in value):
            raise ValueError("a webhook secret must not be empty")
        if any(s.get_secret_value().startswith(EXAMPLE_PLACEHOLDERS) for s in value):
            raise ValueError(
                "still the example's placeholder: put the secret Voucherify shows in Project "
                "Settings > Webhooks"
            )
        return value
