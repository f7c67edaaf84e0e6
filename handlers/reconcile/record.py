"""The format of reconciliation: the record injected for a missing publication, and the
publication id read back from any publication event.

An injected record is what the intake would have published had the webhook arrived: a
``customer.publication.succeeded`` envelope (v2024-01-01 shape) on the same topic, keyed by
the customer, with the intake's headers plus ``origin: reconciliation``. Its event id is
``evrec_<publication id>``: every run and every runner derives the same one, so the
worker's ledger lets each handler act on it once, however often it is injected. The
e-mail handler also keys its e-mail on the publication id, so a webhook that arrives
after all still sends no second e-mail.

A multi-code publication (``ListPublicationsItemValidMultipleVouchers``) becomes one
record whose ``voucher`` is its first code and whose ``publication.vouchers`` lists all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from handlers.builtin.voucherify_api import ListedPublication
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED
from schemas.record import (
    HEADER_DELIVERY_ID,
    HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGIN,
    HEADER_PUBLICATION_ID,
    HEADER_RECEIVED_AT,
    ORIGIN_RECONCILIATION,
    Headers,
)
from schemas.timestamps import utc_now_iso
from schemas.topics import topic_for

EVENT_ID_PREFIX: Final = "evrec_"
_PUBLICATION_FIELDS: Final = (
    "id",
    "object",
    "created_at",
    "customer_id",
    "tracking_id",
    "metadata",
    "channel",
    "source_id",
    "result",
    "customer",
    "vouchers",
    "vouchers_id",
)


def event_id_for(publication_id: str) -> str:
    """The event id of the record injected for ``publication_id`` (stable across runs)."""
    return EVENT_ID_PREFIX + publication_id


@dataclass(frozen=True, slots=True)
class InjectedRecord:
    topic: str
    key: bytes
    value: bytes
    headers: Headers
    event_id: str


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_record(pub: ListedPublication, *, topic_prefix: str) -> InjectedRecord:
    """The record the intake would have published for ``pub`` (a ``SUCCESS`` item)."""
    raw = pub.raw
    listed_voucher = raw.get("voucher")
    voucher: dict[str, Any] = (
        dict(listed_voucher) if isinstance(listed_voucher, dict) else {"object": "voucher"}
    )
    voucher.setdefault("code", pub.codes[0] if pub.codes else "")
    publication = {name: raw[name] for name in _PUBLICATION_FIELDS if name in raw}
    if isinstance(listed_voucher, dict):
        publication["voucher"] = dict(voucher)
    else:
        publication["vouchers"] = list(pub.codes)
    event_id = event_id_for(pub.id)
    created_at = _iso(pub.created_at)
    customer = raw.get("customer") if isinstance(raw.get("customer"), dict) else None
    envelope = {
        "id": event_id,
        "created_at": utc_now_iso(),
        "type": CUSTOMER_PUBLICATION_SUCCEEDED,
        "data": {
            "customer": customer,
            "campaign": {"name": pub.campaign} if pub.campaign else None,
            "publication": publication,
            "voucher": voucher,
        },
        "source": {"id": None, "object": ORIGIN_RECONCILIATION, "target_url": None},
        "event": {
            "id": event_id,
            "type": CUSTOMER_PUBLICATION_SUCCEEDED,
            "created_at": created_at,
            "entity_id": pub.id,
            "group_id": None,
            "event_source": {"channel": ORIGIN_RECONCILIATION},
        },
    }
    value = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    headers: Headers = (
        (HEADER_EVENT_ID, event_id.encode()),
        (HEADER_EVENT_TYPE, CUSTOMER_PUBLICATION_SUCCEEDED.encode()),
        (HEADER_DELIVERY_ID, event_id.encode()),
        (HEADER_RECEIVED_AT, utc_now_iso().encode()),
        (HEADER_ORIGIN, ORIGIN_RECONCILIATION.encode()),
        (HEADER_EVENT_CREATED_AT, created_at.encode()),
        (HEADER_PUBLICATION_ID, pub.id.encode()),
    )
    key = (pub.customer_id or pub.id).encode()
    return InjectedRecord(
        topic=topic_for(topic_prefix, CUSTOMER_PUBLICATION_SUCCEEDED),
        key=key,
        value=value,
        headers=headers,
        event_id=event_id,
    )


class _Publication(msgspec.Struct):
    id: str | None = None
    created_at: str | None = None


class _Data(msgspec.Struct):
    publication: _Publication | None = None


class _Body(msgspec.Struct):
    data: _Data | None = None


_DECODER: Final = msgspec.json.Decoder(_Body)


def publication_of(raw: bytes) -> tuple[str, float] | None:
    """``(data.publication.id, its created_at as epoch seconds, 0 when absent)`` of a
    publication event body, or ``None`` when it names no publication (or is not JSON)."""
    try:
        body = _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    pub = body.data.publication if body.data is not None else None
    if pub is None or not pub.id:
        return None
    created = 0.0
    if pub.created_at:
        try:
            created = datetime.fromisoformat(pub.created_at).timestamp()
        except ValueError:
            created = 0.0
    return pub.id, created
