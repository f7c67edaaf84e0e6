"""``Retry-After`` read as a delay, for the handlers that call HTTP services (``crm``, ``http``).

The header comes from a server we do not control: ``inf``, ``nan``, ``1e308``, a date in
year 9999 or one Python cannot represent are read without raising, and the delay is
always finite and at most ``max_s`` (the ``crm`` handler passes its
``PUBRELAY_CRM__MAX_PAUSE_S``; the worker caps every delay again at
``PUBRELAY_WORKER__RETRY_MAX_DELAY_S``).
"""

from __future__ import annotations

import math
import time
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

__all__ = ["RETRY_AFTER_MAX_S", "retry_after_s"]

RETRY_AFTER_MAX_S: Final = 86_400.0
"""The longest delay read from a header when the caller names no tighter cap: a day."""


def retry_after_s(
    value: str | None, now: float | None = None, *, max_s: float = RETRY_AFTER_MAX_S
) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), at most ``max_s``.

    ``None`` when absent, unreadable, negative or ``nan``; never raises.
    """
    if not value:
        return None
    value = value.strip()
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _until_date_s(value, now)
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, max_s)


def _until_date_s(value: str, now: float | None) -> float | None:
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        moment = when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    current = time.time() if now is None else now
    return max(0.0, moment - current)
