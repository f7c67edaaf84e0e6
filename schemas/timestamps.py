"""The one timestamp format of pubrelay's record headers, and the one parser for them.

``received-at`` and the ``dlq-*-failed-at`` headers are ISO 8601 in UTC with
milliseconds; Voucherify's ``created_at`` fields are ISO 8601 too. A time without a zone
is read as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now_iso() -> str:
    """Now, as the headers carry it: ``2026-12-02T08:15:00.123+00:00``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_timestamp(value: str | None) -> datetime | None:
    """An aware datetime from ISO 8601 text; ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
