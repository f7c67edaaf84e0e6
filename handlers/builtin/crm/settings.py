"""Settings of the ``crm`` handler: the ``PUBRELAY_CRM__*`` section.

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
``MAX_PAUSE_S``             ``3600``                      longest rate-limit pause, whatever
                                                          HubSpot's 429 asks (``Retry-After``,
                                                          the interval header, the daily limit)
``EVENT_TYPES``             ``customer.publication...``   event types to act on
==========================  ============================  =========================================

``PROPERTIES`` and its defaults are described in :mod:`handlers.builtin.crm.properties`.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from handlers.builtin.crm.properties import DEFAULT_PROPERTIES
from handlers.builtin.http_client import HttpUrlStr
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED

__all__ = ["HUBSPOT_MAX_BATCH", "CrmSettings"]

HUBSPOT_MAX_BATCH: Final = 100
"""HubSpot's limit of inputs in one batch upsert."""


class CrmSettings(BaseModel):
    """The ``PUBRELAY_CRM__*`` section; unknown keys are refused so typos surface."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr | None = Field(default=None, description="HubSpot private-app token")
    base_url: HttpUrlStr = Field(default="https://api.hubapi.com", description="HubSpot API root")
    properties: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROPERTIES),
        description="HubSpot contact property -> event field path",
    )
    batch_window_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        description="events arriving within this time share one batch request (at most 60)",
    )
    batch_size: int = Field(
        default=HUBSPOT_MAX_BATCH,
        ge=1,
        le=HUBSPOT_MAX_BATCH,
        description="contacts per batch upsert request (HubSpot's limit: 100)",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="bound for one HubSpot request")
    max_requests_per_10s: int = Field(
        default=100,
        ge=1,
        description=(
            "client-side limit of HubSpot requests per `RATE_WINDOW_S` (HubSpot "
            "allows 100 or 190 per 10 s by plan)"
        ),
    )
    rate_window_s: float = Field(
        default=10.0, gt=0, description="the window of `MAX_REQUESTS_PER_10S` (HubSpot's is 10 s)"
    )
    auth_retry_delay_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "after a rejected token (401/403), retry this long later without calling "
            "HubSpot in between; `pubrelay_crm_auth_failed` is 1 meanwhile"
        ),
    )
    max_pause_s: float = Field(
        default=3600.0,
        gt=0,
        le=86_400,
        description="longest pause after a 429, in seconds, whatever HubSpot's headers ask",
    )
    event_types: list[str] = Field(
        default_factory=lambda: [CUSTOMER_PUBLICATION_SUCCEEDED],
        description="event types to act on",
    )

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")
