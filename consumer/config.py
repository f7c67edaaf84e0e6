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
    retry_after_s: int = Field(default=30, gt=0)

    @field_validator("secrets")
    @classmethod
    def _no_empty_secret(cls, value: list[SecretStr]) -> list[SecretStr]:
        # An empty HMAC key is a key anyone can sign with.
        if any(not s.get_secret_value().strip() for s in value):
            raise ValueError("a webhook secret must not be empty")
        return value
