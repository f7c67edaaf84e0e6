"""The campaign a published code belongs to (the spec's ``SimpleCampaign``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from schemas.base import VoucherifyModel, Whole
from schemas.voucher import Category, Discount, Gift, LoyaltyCard, VoucherRedemption

__all__ = ["Campaign", "CampaignVoucher", "CodeConfig"]


class CodeConfig(VoucherifyModel):
    """How the campaign generates codes (``prefix`` + ``pattern`` + ``postfix``)."""

    length: Whole | None = None
    charset: str | None = None
    prefix: str | None = None
    postfix: str | None = None
    pattern: str | None = None
    initial_count: int | None = None


class CampaignVoucher(VoucherifyModel):
    """The template every code of the campaign is made from."""

    type: str | None = None
    discount: Discount | None = None
    gift: Gift | None = None
    loyalty_card: LoyaltyCard | None = None
    redemption: VoucherRedemption | None = None
    code_config: CodeConfig | None = None


class Campaign(VoucherifyModel):
    """A campaign: ``campaign_type`` is the kind (``DISCOUNT_COUPONS`` ...), ``type`` the mode."""

    id: str | None = None
    name: str | None = None
    campaign_type: str | None = None
    type: str | None = None
    description: str | None = None
    is_referral_code: bool | None = None
    voucher: CampaignVoucher | None = None
    referral_program: dict[str, Any] | None = None
    auto_join: bool | None = None
    join_once: bool | None = None
    active: bool | None = None
    category_id: str | None = None
    category: str | None = None
    categories: list[Category] | None = None
    metadata: dict[str, Any] | None = None
    start_date: datetime | None = None
    expiration_date: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
