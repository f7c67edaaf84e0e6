"""The one timestamp format of pubrelay's record headers, and the one parser for them.

``received-at`` and the ``dlq-*-failed-at`` headers are ISO 8601 in UTC with
milliseconds; Voucherify's ``created_at`` fields are ISO 8601 too. A time without a zone
is read as UTC.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


class _SecondCache:
    """The date and time to the second, formatted once per second (once per request
    otherwise: ``docs/performance.md``). One tuple, replaced whole, so a thread never pairs
    one second with another's text."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached = (-1, "")

    def format(self, second: int) -> str:
        cached_second, text = self.cached
        if second != cached_second:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.cached = (second, text)
        return text


_headers_second = _SecondCache()
_log_second = _SecondCache()


def utc_now_iso() -> str:
    """Now, as the headers carry it: ``2026-12-02T08:15:00.123+00:00``."""
    now_ns = time.time_ns()
    second, ns = divmod(now_ns, 1_000_000_000)
    return f"{_headers_second.format(second)}.{ns // 1_000_000:03d}+00:00"


def utc_now_log() -> str:
    """Now, as log lines carry it: ``2026-12-02T08:15:00.123456Z``."""
    now_ns = time.time_ns()
    second, ns = divmod(now_ns, 1_000_000_000)
    return f"{_log_second.format(second)}.{ns // 1_000:06d}Z"


def parse_timestamp(value: str | None) -> datetime | None:
    """An aware datetime from ISO 8601 text; ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
