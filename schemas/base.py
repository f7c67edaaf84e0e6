"""The base of every Voucherify model: lenient, because the official examples are.

Voucherify adds fields over time and its own examples break its schema (``email: null``,
missing "required" fields), so every model keeps unknown fields (``extra="allow"``) and
the models declare as optional everything the examples show as null or missing. A
webhook we cannot parse is a webhook a handler cannot act on, so strictness here would
only move events to the dead-letter topic for no benefit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["VoucherifyModel"]


class VoucherifyModel(BaseModel):
    """Keeps unknown fields: they are still reachable through ``model_extra``."""

    model_config = ConfigDict(extra="allow")
