"""A publication: the assignment of one or more codes to a customer.

``channel`` is free text: ``API`` by default, ``Dashboard``, ``Automation``,
``voucherify-web-ui``, or whatever the caller passed to the publish API. A publication
of one code carries it in ``voucher``; one of several codes (the publish API with
``campaign.count > 1``) lists the codes in ``vouchers`` and their ids in ``vouchers_id``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from schemas.base import VoucherifyModel
from schemas.customer import Customer
from schemas.voucher import Voucher

__all__ = ["Publication"]


class Publication(VoucherifyModel):
    """One publication (``pub_…``); ``result`` is ``SUCCESS`` or ``FAILURE``."""

    id: str | None = None
    created_at: datetime | None = None
    customer_id: str | None = None
    tracking_id: str | None = None
    metadata: dict[str, Any] | None = None
    channel: str | None = None
    source_id: str | None = None
    result: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    customer: Customer | None = None
    voucher: Voucher | None = None
    vouchers: list[str] | None = None
    vouchers_id: list[str] | None = None
