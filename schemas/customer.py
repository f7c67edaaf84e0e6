"""The customer of an event, in any of the spec's shapes.

``SimpleCustomer`` (event data) and ``CustomerWithSummaryLoyaltyReferrals`` (inside a
publication) share one lenient model. ``email`` is often ``null`` in the official
examples, so it is optional; it is kept as plain text (no syntax check) because a
customer record we cannot parse is worse than an address the mail relay rejects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from schemas.base import VoucherifyModel

__all__ = ["Customer", "CustomerAddress"]


class CustomerAddress(VoucherifyModel):
    """A postal address; every line may be missing."""

    city: str | None = None
    state: str | None = None
    line_1: str | None = None
    line_2: str | None = None
    country: str | None = None
    postal_code: str | None = None


class Customer(VoucherifyModel):
    """A Voucherify customer: ``id`` is Voucherify's, ``source_id`` the caller's own."""

    id: str | None = None
    source_id: str | None = None
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    description: str | None = None
    birthdate: str | None = None
    address: CustomerAddress | None = None
    metadata: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    loyalty: dict[str, Any] | None = None
    referrals: dict[str, Any] | None = None
    system_metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
