"""Settings of the HTTP server (``PUBRELAY_HTTP__*``) and the webhook intake
(``PUBRELAY_WEBHOOK__*``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

from pydantic import BaseModel, Field, SecretStr, field_validator


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    # Guards against clients that send slowly or not at all (consumer/body.py).
    body_read_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=9.0,
        description="a body not received within this time after its headers is cut (408) and "
        "its connection closed; with PUBRELAY_BUS__PUBLISH_TIMEOUT_S, keep it under "
        "Voucherify's 10 s",
    )
    max_concurrent_bodies: int = Field(
        default=1000,
        gt=0,
        description="bodies being received at once; one more is answered 503 busy",
    )
    max_concurrent_large_bodies: int = Field(
        default=32,
        gt=0,
        description="of those, bodies over 64 KiB; one more is answered 503 busy",
    )
    keepalive_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="a connection idle for this long, or whose request headers are not "
        "complete by then, is closed",
    )
    # What a connection's request headers may hold: at most about twice their product
    # (aiohttp keeps the raw and the decoded header), also while they are incomplete.
    max_headers: int = Field(
        default=64, gt=0, description="header lines a request may have; more is answered 400"
    )
    max_header_bytes: int = Field(
        default=4096,
        gt=0,
        description="bytes of one header line (name and value); longer is answered 400",
    )


class WebhookSettings(BaseModel):
    path: str = "/webhooks/voucherify"
    secrets: list[SecretStr] = Field(
        default_factory=list,
        description="webhook secrets from Voucherify; several during rotation",
    )
    allow_unsigned: bool = Field(
        default=False,
        description="DANGER: accept requests without a valid signature (local testing only)",
    )
    # Handlers parse with pydantic, whose JSON parser stops at about 200 levels: keep the
    # intake's limit well below, so what is accepted can always be parsed downstream.
    max_json_depth: int = Field(default=64, gt=0, le=128)
    max_event_age_s: float | None = Field(
        default=None, gt=0, description="quarantine events whose event.created_at is older"
    )
    allowed_networks: list[IPv4Network | IPv6Network] = Field(
        default_factory=list, description="source IP allowlist; empty allows every address"
    )
    trust_forwarded_for: bool = Field(
        default=False, description="take the client address from X-Forwarded-For (behind a proxy)"
    )
    trusted_proxy_hops: int = Field(
        default=1,
        ge=1,
        le=16,
        description="with TRUST_FORWARDED_FOR: the proxies in front of pubrelay that each "
        "append to X-Forwarded-For; the client address is the entry that many from the right",
    )
    retry_after_s: int = Field(default=30, gt=0)

    @field_validator("secrets")
    @classmethod
    def _no_empty_secret(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty HMAC key is a key anyone can sign with.
        if any(not s.get_secret_value().strip() for s in value):
            raise ValueError("a webhook secret must not be empty")
        return value
