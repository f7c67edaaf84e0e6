"""The base of every Voucherify model: lenient, because the official examples are.

Voucherify adds fields over time and its own examples break its schema (``email: null``,
missing "required" fields), so every model keeps unknown fields (``extra="allow"``) and
the models declare as optional everything the examples show as null or missing. A
webhook we cannot parse is a webhook a handler cannot act on, so strictness here would
only move events to the dead-letter topic for no benefit.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["VoucherifyModel", "Whole"]


def _nearest_whole(value: Any) -> Any:
    """A finite float rounded to the nearest whole number (halves up); anything else
    unchanged."""
    if isinstance(value, float) and math.isfinite(value):
        return math.floor(value + 0.5)
    return value


Whole = Annotated[int, BeforeValidator(_nearest_whole)]
"""An integer field the spec types as ``number`` (amounts in cents, a code's length):
``1050.5`` is read as ``1051`` rather than failing the whole event, which would send it
to every handler's dead letters."""


class VoucherifyModel(BaseModel):
    """Keeps unknown fields: they are still reachable through ``model_extra``.

    A validation error names the field and what was wrong, never the value: the error
    reaches logs, dead letters' headers and the console, and pydantic cuts a long value to
    its two ends, where a customer's address cut before its ``@`` escapes masking."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True)
