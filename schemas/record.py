"""What travels on the bus: the raw request body plus routing headers.

The value of every record is the webhook body exactly as received, so downstream consumers
can re-verify the Voucherify signature. Routing facts travel as headers; topic names are
built in :mod:`schemas.topics`.
"""

from __future__ import annotations

from typing import Final

HEADER_EVENT_ID: Final = "event-id"
HEADER_EVENT_TYPE: Final = "event-type"
HEADER_DELIVERY_ID: Final = "delivery-id"
HEADER_RECEIVED_AT: Final = "received-at"
HEADER_EVENT_CREATED_AT: Final = "event-created-at"
HEADER_PUBLICATION_ID: Final = "publication-id"
"""The body's ``event.created_at`` and ``data.publication.id``, written beside the event id
and type when the body has them: the worker identifies a record from its headers and reads
the body only when one is missing (records written before these headers existed)."""
HEADER_SIGNATURE: Final = "x-voucherify-signature"
HEADER_QUARANTINE_REASON: Final = "quarantine-reason"
HEADER_QUARANTINE_DETAIL: Final = "quarantine-detail"
HEADER_CONTENT_TYPE: Final = "content-type"
HEADER_ORIGIN: Final = "origin"
"""Set on records pubrelay made itself: ``reconciliation`` for a publication found through
Voucherify's API whose webhook never arrived (``handlers/reconcile/``), ``quarantine-release``
for a quarantined event sent on to its topic by ``pubrelay quarantine release``."""
ORIGIN_RECONCILIATION: Final = "reconciliation"
ORIGIN_QUARANTINE_RELEASE: Final = "quarantine-release"

Headers = tuple[tuple[str, bytes], ...]


def header(headers: Headers, name: str) -> bytes | None:
    """Return the first header named ``name`` (case-sensitive, as stored) or ``None``."""
    for key, value in headers:
        if key == name:
            return value
    return None


def header_text(headers: Headers, name: str) -> str | None:
    """Return the first header named ``name`` as UTF-8 text (bad bytes replaced) or ``None``."""
    value = header(headers, name)
    return value.decode("utf-8", "replace") if value is not None else None
