"""Realistic webhook bodies for tests and the benchmark.

Built on the official ``customer.publication.succeeded`` example of Voucherify's
webhook spec (v2024-01-01), wrapped in a complete envelope, about 4 KB of JSON like a
real delivery. Every id derives from the arguments, so the same arguments always give
the same body: a retry of the same event is ``sample_publication_event`` with a new
``delivery_id`` only. Signing is the caller's business (the body must be serialised
first; see :func:`sample_publication_body`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Final

__all__ = ["sample_publication_body", "sample_publication_event"]

PROJECT_ID: Final = "proj_5T4Rpl4T1nuM"
WEBHOOK_ID: Final = "wh_j56Vfy47Vx9YOX7QYD1fzHnc"
TARGET_URL: Final = "https://relay.example.com/webhooks/voucherify"
CUSTOMER_NAME: Final = "Jack Webhook"
CATEGORY_ID: Final = "cat_0e156dab8f2e43873a"


def _digest(*parts: str, size: int = 32) -> str:
    """A stable pseudo-id from the arguments (not a secret; only for unique-looking ids)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:size]


def _iso(moment: datetime) -> str:
    """Voucherify's timestamp format: UTC, milliseconds, ``Z``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _discount() -> dict[str, Any]:
    return {
        "type": "PERCENT",
        "effect": "APPLY_TO_ORDER",
        "percent_off": 10,
        "amount_limit": 3000,
        "percent_off_formula": "IF(ORDER_AMOUNT > 150;15;10)",
    }


def sample_publication_event(
    *,
    event_id: str,
    delivery_id: str,
    customer_id: str,
    email: str | None,
    code: str,
    channel: str = "API",
    campaign: str = "Spring Discounts",
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """A complete v2024-01-01 envelope of a ``customer.publication.succeeded`` event.

    ``channel`` is the publication's (free text); ``email`` ``None`` gives ``"email":
    null`` as in the official example. ``created_at`` (default: now) is when the code was
    published; a naive value is taken as UTC. :func:`schemas.events.parse_event`
    accepts the result once serialised.
    """
    published = created_at if created_at is not None else datetime.now(UTC)
    voucher_created = published - timedelta(seconds=18, milliseconds=331)
    campaign_created = published - timedelta(days=21, hours=3, minutes=44)
    campaign_id = "camp_" + _digest("campaign", campaign, size=24)
    voucher_id = "v_" + _digest("voucher", code)
    publication_id = "pub_" + _digest("publication", event_id)
    source_id = email or customer_id
    metadata = {"region": "EMEA", "sign-up": "true"}
    customer_short = {
        "id": customer_id,
        "name": CUSTOMER_NAME,
        "email": email,
        "source_id": source_id,
        "metadata": dict(metadata),
        "object": "customer",
    }
    redemption = {"quantity": 1, "redeemed_quantity": 0}
    data: dict[str, Any] = {
        "customer": customer_short,
        "campaign": {
            "id": campaign_id,
            "name": campaign,
            "campaign_type": "DISCOUNT_COUPONS",
            "type": "AUTO_UPDATE",
            "is_referral_code": False,
            "voucher": {
                "type": "DISCOUNT_VOUCHER",
                "discount": {**_discount(), "units": None},
                "redemption": dict(redemption),
                "code_config": {
                    "length": 3,
                    "prefix": "SPRING-2024-",
                    "charset": "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                    "pattern": "###",
                    "postfix": "",
                },
            },
            "auto_join": False,
            "join_once": False,
            "active": True,
            "category_id": CATEGORY_ID,
            "category": None,
            "metadata": {},
            "start_date": None,
            "expiration_date": None,
            "description": f"{campaign} campaign",
            "created_at": _iso(campaign_created),
            "updated_at": _iso(campaign_created + timedelta(days=2, hours=1)),
            "object": "campaign",
        },
        "publication": {
            "id": publication_id,
            "object": "publication",
            "result": "SUCCESS",
            "channel": channel,
            "voucher": {
                "id": voucher_id,
                "code": code,
                "gift": None,
                "type": "DISCOUNT_VOUCHER",
                "active": True,
                "assets": {
                    "qr": {"id": _digest("qr", code, size=36), "url": "{{voucher_qr_code.url}}"},
                    "barcode": {
                        "id": _digest("barcode", code, size=36),
                        "url": "{{voucher_barcode.url}}",
                    },
                },
                "object": "voucher",
                "publish": {
                    "url": f"/v1/vouchers/{code}/publications?page=1&limit=10",
                    "count": 1,
                    "object": "list",
                },
                "campaign": campaign,
                "category": "Star Platinum",
                "discount": _discount(),
                "metadata": {},
                "holder_id": customer_id,
                "categories": [
                    {
                        "id": CATEGORY_ID,
                        "name": "Star Platinum",
                        "object": "category",
                        "hierarchy": 10,
                        "created_at": "2024-01-03T10:03:24.092Z",
                    }
                ],
                "created_at": _iso(voucher_created),
                "redemption": {
                    "url": f"/v1/vouchers/{code}/redemptions?page=1&limit=10",
                    "object": "list",
                    **redemption,
                },
                "start_date": None,
                "updated_at": _iso(published),
                "campaign_id": campaign_id,
                "category_id": CATEGORY_ID,
                "loyalty_card": None,
                "validity_hours": None,
                "additional_info": None,
                "expiration_date": None,
                "is_referral_code": False,
                "validity_timeframe": None,
                "validity_day_of_week": None,
            },
            "customer": {
                "id": customer_id,
                "name": CUSTOMER_NAME,
                "object": "customer",
                "address": None,
                "loyalty": None,
                "summary": None,
                "metadata": dict(metadata),
                "referrals": None,
                "source_id": source_id,
            },
            "metadata": {},
            "source_id": None,
            "created_at": _iso(published),
            "customer_id": customer_id,
            "tracking_id": source_id,
            "vouchers_id": [voucher_id],
        },
        "voucher": {
            "id": voucher_id,
            "code": code,
            "discount": _discount(),
            "type": "DISCOUNT_VOUCHER",
            "campaign": campaign,
            "campaign_id": campaign_id,
            "is_referral_code": False,
            "holder_id": customer_id,
            "category_id": CATEGORY_ID,
            "active": True,
            "created_at": _iso(voucher_created),
            "updated_at": _iso(published),
            "redemption": dict(redemption),
            "start_date": None,
            "expiration_date": None,
            "metadata": {},
            "object": "voucher",
        },
    }
    event_type = "customer.publication.succeeded"
    return {
        "id": delivery_id,
        "project_id": PROJECT_ID,
        "created_at": _iso(published + timedelta(milliseconds=212)),
        "type": event_type,
        "data": data,
        "source": {"id": WEBHOOK_ID, "object": "webhook", "target_url": TARGET_URL},
        "event": {
            "id": event_id,
            "type": event_type,
            "created_at": _iso(published + timedelta(milliseconds=6)),
            "entity_id": publication_id,
            "group_id": "v-" + _digest("group", event_id, size=18),
            "event_source": {"channel": "API"},
        },
    }


def sample_publication_body(
    *,
    event_id: str,
    delivery_id: str,
    customer_id: str,
    email: str | None,
    code: str,
    channel: str = "API",
    campaign: str = "Spring Discounts",
    created_at: datetime | None = None,
) -> bytes:
    """:func:`sample_publication_event` serialised as Voucherify sends it: compact UTF-8 JSON."""
    event = sample_publication_event(
        event_id=event_id,
        delivery_id=delivery_id,
        customer_id=customer_id,
        email=email,
        code=code,
        channel=channel,
        campaign=campaign,
        created_at=created_at,
    )
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
