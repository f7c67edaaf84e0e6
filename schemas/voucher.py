"""Vouchers as Voucherify sends them in events: discount, gift card or loyalty card.

One :class:`Voucher` model serves the three shapes the spec names (``SimpleVoucher`` in
event data, ``Voucher`` inside a publication, ``ListPublicationsItemVoucher``): they
differ only in which optional fields are present. Money is integer cents, as Voucherify
sends it (``amount_off: 1000`` is 10.00); the spec types amounts as ``number``, so one with
a fraction is read as the nearest cent (:data:`schemas.base.Whole`). :func:`format_cents`
renders it for people.

The discount is a union tagged by its ``type`` (``AMOUNT``, ``PERCENT``, ``UNIT``,
``FIXED``); a type this code does not know yet becomes :class:`OtherDiscount` instead of
failing the whole event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import Discriminator, Tag

from schemas.base import VoucherifyModel, Whole

__all__ = [
    "AmountDiscount",
    "Category",
    "Discount",
    "DiscountUnitItem",
    "FixedDiscount",
    "Gift",
    "LoyaltyCard",
    "OtherDiscount",
    "PercentDiscount",
    "ProductRef",
    "UnitDiscount",
    "Voucher",
    "VoucherAsset",
    "VoucherAssets",
    "VoucherRedemption",
    "format_cents",
]

DISCOUNT_VOUCHER: Final = "DISCOUNT_VOUCHER"
GIFT_VOUCHER: Final = "GIFT_VOUCHER"
LOYALTY_CARD: Final = "LOYALTY_CARD"

_TIMES: Final = "\u00d7"  # the multiplication sign (U+00D7) of "5 \u00d7 item"


def format_cents(cents: int, currency_symbol: str | None = None) -> str:
    """Render integer cents as ``"10.00"``, or ``"$10.00"`` with ``currency_symbol="$"``.

    The symbol is prefixed verbatim (pass ``"EUR "`` to get ``"EUR 10.00"``); without one
    the bare amount is returned, because a webhook does not say which currency a
    campaign uses. No thousands separator: the text must read the same in every locale.
    """
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{currency_symbol or ''}{whole}.{frac:02d}"


class ProductRef(VoucherifyModel):
    """The product or SKU a unit discount gives away."""

    id: str | None = None
    source_id: str | None = None
    name: str | None = None


class _DiscountBase(VoucherifyModel):
    effect: str | None = None
    is_dynamic: bool | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """A short human text, such as ``"10% off"``; see :meth:`Voucher.describe`."""
        raise NotImplementedError


class AmountDiscount(_DiscountBase):
    """A fixed amount off: ``amount_off`` cents."""

    type: Literal["AMOUNT"] = "AMOUNT"
    amount_off: Whole | None = None
    amount_off_formula: str | None = None
    aggregated_amount_limit: int | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """``"$10.00 off"`` (``"amount off"`` when only a formula is known)."""
        if self.amount_off is None:
            return "amount off"
        return f"{format_cents(self.amount_off, currency_symbol)} off"


class PercentDiscount(_DiscountBase):
    """A percentage off, optionally capped at ``amount_limit`` cents."""

    type: Literal["PERCENT"] = "PERCENT"
    percent_off: float | None = None
    percent_off_formula: str | None = None
    amount_limit: Whole | None = None
    aggregated_amount_limit: int | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """``"10% off"``, ``"12.5% off"`` (``"percent off"`` when only a formula is known)."""
        if self.percent_off is None:
            return "percent off"
        return f"{self.percent_off:g}% off"


def _units_text(count: float | None, unit_type: str | None) -> str:
    what = unit_type or "item"
    if count is None:
        return f"free {what}"
    return f"{count:g} {_TIMES} {what}"


class DiscountUnitItem(VoucherifyModel):
    """One of the items of a multiple-unit discount (effect ``ADD_MANY_ITEMS``)."""

    unit_off: float | None = None
    unit_off_formula: str | None = None
    effect: str | None = None
    unit_type: str | None = None
    product: ProductRef | None = None
    sku: ProductRef | None = None


class UnitDiscount(_DiscountBase):
    """Free units of a product: one ``unit_type``, or several in ``units``."""

    type: Literal["UNIT"] = "UNIT"
    unit_off: float | None = None
    unit_off_formula: str | None = None
    unit_type: str | None = None
    product: ProductRef | None = None
    sku: ProductRef | None = None
    units: list[DiscountUnitItem] | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """``"5 \u00d7 prod_x"``; several units are joined: ``"1 \u00d7 a + 2 \u00d7 b"``."""
        if self.units:
            return " + ".join(_units_text(u.unit_off, u.unit_type) for u in self.units)
        return _units_text(self.unit_off, self.unit_type)


class FixedDiscount(_DiscountBase):
    """The order or item costs a fixed ``fixed_amount`` cents."""

    type: Literal["FIXED"] = "FIXED"
    fixed_amount: Whole | None = None
    fixed_amount_formula: str | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """``"fixed price $10.00"`` (``"fixed price"`` when only a formula is known)."""
        if self.fixed_amount is None:
            return "fixed price"
        return f"fixed price {format_cents(self.fixed_amount, currency_symbol)}"


class OtherDiscount(_DiscountBase):
    """A discount type this code does not model yet; its fields stay in ``model_extra``."""

    type: str | None = None

    def describe(self, currency_symbol: str | None = None) -> str:
        """``"<type> discount"`` in lower case, or ``"discount"``."""
        return f"{self.type.lower()} discount" if self.type else "discount"


_DISCOUNT_TAGS: Final = frozenset({"AMOUNT", "PERCENT", "UNIT", "FIXED"})
_OTHER_TAG: Final = "OTHER"


def _discount_tag(value: Any) -> str:
    """Pick the discount model by ``type``; unknown or missing types fall back to OTHER."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _DISCOUNT_TAGS else _OTHER_TAG


Discount = Annotated[
    Annotated[AmountDiscount, Tag("AMOUNT")]
    | Annotated[PercentDiscount, Tag("PERCENT")]
    | Annotated[UnitDiscount, Tag("UNIT")]
    | Annotated[FixedDiscount, Tag("FIXED")]
    | Annotated[OtherDiscount, Tag(_OTHER_TAG)],
    Discriminator(_discount_tag),
]
"""Any discount; ``isinstance`` against the member classes to narrow it."""


class Gift(VoucherifyModel):
    """A gift card's value in cents: ``amount`` loaded, ``balance`` left to spend."""

    amount: Whole | None = None
    balance: Whole | None = None
    effect: str | None = None


class LoyaltyCard(VoucherifyModel):
    """A loyalty card's points; on a campaign template only ``points`` is set."""

    points: int | None = None
    balance: int | None = None
    next_expiration_date: str | None = None
    next_expiration_points: int | None = None
    pending_points: int | None = None
    expired_points: int | None = None
    subtracted_points: int | None = None


class VoucherRedemption(VoucherifyModel):
    """Redemption limits: ``quantity`` ``None`` means unlimited."""

    quantity: int | None = None
    redeemed_quantity: int | None = None
    redeemed_amount: int | None = None
    redeemed_points: int | None = None


class Category(VoucherifyModel):
    """A campaign or voucher category."""

    id: str | None = None
    name: str | None = None
    hierarchy: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class VoucherAsset(VoucherifyModel):
    """A generated image of the code (QR code or barcode)."""

    id: str | None = None
    url: str | None = None


class VoucherAssets(VoucherifyModel):
    """The QR code and barcode images of a voucher."""

    qr: VoucherAsset | None = None
    barcode: VoucherAsset | None = None


class Voucher(VoucherifyModel):
    """A voucher code; only ``code`` is required, everything else may be null or absent."""

    id: str | None = None
    code: str
    type: str | None = None
    campaign: str | None = None
    campaign_id: str | None = None
    category: str | None = None
    category_id: str | None = None
    categories: list[Category] | None = None
    discount: Discount | None = None
    gift: Gift | None = None
    loyalty_card: LoyaltyCard | None = None
    start_date: datetime | None = None
    expiration_date: datetime | None = None
    validity_timeframe: dict[str, Any] | None = None
    validity_day_of_week: list[int] | None = None
    validity_hours: dict[str, Any] | None = None
    active: bool | None = None
    additional_info: str | None = None
    metadata: dict[str, Any] | None = None
    assets: VoucherAssets | None = None
    is_referral_code: bool | None = None
    holder_id: str | None = None
    referrer_id: str | None = None
    redemption: VoucherRedemption | None = None
    publish: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def describe(self, currency_symbol: str | None = None) -> str | None:
        """What the code is worth, for a message to the customer.

        ``"10% off"``, ``"$10.00 off"`` / ``"10.00 off"`` (amounts are cents; the symbol
        is prefixed verbatim, none by default because the event carries no currency),
        ``"5 \u00d7 <unit_type>"``, ``"fixed price 10.00"``, ``"50.00 gift card"``,
        ``"loyalty card with 120 points"``. ``None`` when the voucher carries none of
        discount, gift or loyalty card. The voucher ``type`` decides when several are set.
        """
        gift, card, discount = self.gift, self.loyalty_card, self.discount
        if gift is not None and (self.type == GIFT_VOUCHER or discount is None):
            value = gift.balance if gift.balance is not None else gift.amount
            return (
                "gift card"
                if value is None
                else f"{format_cents(value, currency_symbol)} gift card"
            )
        if card is not None and (self.type == LOYALTY_CARD or discount is None):
            return (
                "loyalty card" if card.points is None else f"loyalty card with {card.points} points"
            )
        if discount is not None:
            return discount.describe(currency_symbol)
        return None

    @property
    def discount_description(self) -> str | None:
        """:meth:`describe` without a currency symbol (``"10.00 off"``)."""
        return self.describe()
