"""What the worker knows of a record before handling it: event id and type, creation time,
the key the ledger claims (:mod:`handlers.worker.attempts`), and the :class:`Event` a
handler receives."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from bus.types import Message
from handlers.types import Event
from schemas.envelope import decode_lean
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED
from schemas.record import (
    HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_PUBLICATION_ID,
)
from schemas.timestamps import parse_timestamp


@dataclass(slots=True)
class Identity:
    event_id: str
    event_type: str
    created_at: str | None
    key: str
    """What the ledger claims: the event id, or for ``customer.publication.succeeded`` (one
    per publication) ``customer.publication.succeeded:<publication id>``, so the webhook's
    event and the event reconciliation injected for the same publication (another event
    id) are handled once between them, whichever comes first."""


class Unidentified(Exception):
    """The record has no event id or type: it cannot be routed or deduplicated."""


def identify(message: Message) -> Identity:
    """The event's id and type from the headers, else from the body; its creation time.

    The intake writes everything this needs as headers (:mod:`schemas.record`); the body is
    read only for a record that lacks one of them (written by an older pubrelay, or by
    hand), which spares the worker a JSON parse per record and handler.
    """
    headers = dict(reversed(message.headers))  # the first of a name, as header() reads
    event_id = headers.get(HEADER_EVENT_ID)
    event_type = headers.get(HEADER_EVENT_TYPE)
    created_at = headers.get(HEADER_EVENT_CREATED_AT)
    publication_id = headers.get(HEADER_PUBLICATION_ID)
    if event_id and event_type and created_at:
        type_text = event_type.decode("utf-8", "replace")
        if publication_id or type_text != CUSTOMER_PUBLICATION_SUCCEEDED:
            return _identity(
                event_id.decode("utf-8", "replace"),
                type_text,
                created_at.decode("utf-8", "replace"),
                publication_id.decode("utf-8", "replace") if publication_id else None,
            )
    return _from_body(message.value, event_id, event_type)


def _from_body(value: bytes, event_id: bytes | None, event_type: bytes | None) -> Identity:
    try:
        lean = decode_lean(value)
    except msgspec.DecodeError:
        lean = None
    body = lean.event if lean is not None else None
    publication = lean.data.publication if lean is not None and lean.data is not None else None
    return _identity(
        _header_or_body(
            event_id,
            body.id if body is not None else None,
            "the record has no event id (no event-id header, no event.id)",
        ),
        _header_or_body(
            event_type,
            body.type if body is not None else None,
            "the record has no event type (no event-type header)",
        ),
        body.created_at if body is not None else None,
        publication.id if publication is not None else None,
    )


def _identity(
    event_id: str, event_type: str, created_at: str | None, publication_id: str | None
) -> Identity:
    key = event_id
    if event_type == CUSTOMER_PUBLICATION_SUCCEEDED and publication_id:
        key = f"{CUSTOMER_PUBLICATION_SUCCEEDED}:{publication_id}"
    return Identity(event_id, event_type, created_at, key)


def _header_or_body(from_header: bytes | None, from_body: str | None, missing: str) -> str:
    if from_header:
        return from_header.decode("utf-8", "replace")
    if from_body:
        return from_body
    raise Unidentified(missing)


def to_event(message: Message, ident: Identity) -> Event:
    """The event as the handler receives it, before its first attempt."""
    return Event(
        id=ident.event_id,
        type=ident.event_type,
        raw=message.value,
        headers=message.headers,
        key=message.key,
        attempt=0,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
    )


def age_s(event: Event, ident: Identity) -> float | None:
    """Seconds since the event was created at the source, when the record says."""
    created: datetime | None = None
    if event.parsed:
        value = getattr(getattr(event.envelope, "event", None), "created_at", None)
        if isinstance(value, datetime):
            created = value
    if created is None:
        created = parse_timestamp(ident.created_at)
    if created is None:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - created).total_seconds())
