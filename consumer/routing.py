"""Deciding where a verified body goes: its event topic, or quarantine with a reason.

Pure functions, no I/O: the web layer verifies the signature first, then calls
:func:`classify`, then publishes what it returns.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

import msgspec

from schemas.envelope import LeanEnvelope, decode_lean
from schemas.frozen import frozen
from schemas.record import (
    HEADER_DELIVERY_ID,
    HEADER_EVENT_CREATED_AT,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_PUBLICATION_ID,
    HEADER_RECEIVED_AT,
    HEADER_SIGNATURE,
    Headers,
)
from schemas.timestamps import parse_timestamp
from schemas.topics import INTERNAL_TOPICS

_TOPIC_SAFE: Final = re.compile(r"[A-Za-z0-9._-]{1,200}")
# Brackets outside strings, as one byte each: "(" opens an array or object, ")" closes one.
_TO_PARENS: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_MARKS: Final = bytes(b for b in range(256) if b not in b'[]{}"')
_NOT_OPENING: Final = bytes(b for b in range(256) if b not in b"[{")


def json_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """Whether ``body`` nests arrays/objects deeper than ``max_depth`` (strings ignored).

    Bytes operations at C speed (``docs/performance.md``): the brackets outside strings
    become a string of parentheses, and each ``replace(b"()", b"")`` removes the innermost
    pairs, one level of nesting per pass. Empty after ``max_depth`` passes means balanced
    and no deeper than that; anything else (too deep, or not balanced: not JSON) is
    settled by counting the depth bracket by bracket.
    """
    if len(body.translate(None, _NOT_OPENING)) <= max_depth:
        # Not enough brackets to be that deep: the common, cheap case (one pass; two
        # bytes.count passes took 60% longer: docs/performance.md).
        return False
    marks = _quotes_and_brackets(body)
    if marks.count(b"{") + marks.count(b"[") <= max_depth:
        return False
    parens = _outside_strings(marks).translate(_TO_PARENS)
    remaining = parens
    for _ in range(max_depth):
        shorter = remaining.replace(b"()", b"")
        if not shorter:
            return False
        if len(shorter) == len(remaining):
            break
        remaining = shorter
    depth = 0
    for paren in parens:
        depth += 1 if paren == 0x28 else -1  # "("
        if depth > max_depth:
            return True
    return False


def _quotes_and_brackets(body: bytes) -> bytes:
    """The body's string delimiters and brackets, in order, and nothing else.

    Escaped backslashes, then escaped quotes, are removed first (pairing backslashes from
    the left, as a JSON reader does), so the quotes left are exactly the string
    delimiters; ``consumer/signature.py`` masks strings the same way.
    """
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    return body.translate(None, _NOT_MARKS)


def _outside_strings(marks: bytes) -> bytes:
    """The brackets of :func:`_quotes_and_brackets` that are outside strings.

    Adjacent quote pairs are dropped first: each is an empty string or the gap between
    two strings, so every bracket keeps its side. Splitting what is left at its quotes
    puts the brackets outside strings at even positions (an unclosed string runs to the
    end); with no brackets inside strings, nothing is left to split.
    """
    marks = marks.replace(b'""', b"")
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[0::2])
    return marks


@frozen
class Routed:
    """A verified event with an envelope: goes to its event topic."""

    delivery_id: str
    event_id: str
    event_type: str
    key: str
    created_at: str | None
    publication_id: str | None = None


@frozen
class Quarantined:
    """A verified body we cannot route; kept on the quarantine topic with ``reason``."""

    reason: str
    detail: str
    delivery_id: str | None = None
    event_id: str | None = None
    event_type: str | None = None


Decision = Routed | Quarantined


def classify(
    body: bytes,
    *,
    max_depth: int,
    max_event_age_s: float | None = None,
    now: datetime | None = None,
) -> Decision:
    """Route a verified body, or say why it must be quarantined."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return Quarantined("not_utf8", f"body is not UTF-8 at byte {err.start}")
    if json_depth_exceeds(body, max_depth):
        return Quarantined("too_deep", f"JSON nests deeper than {max_depth} levels")
    try:
        envelope: LeanEnvelope = decode_lean(text)
    except msgspec.ValidationError as err:
        return Quarantined(
            "no_envelope",
            f"JSON without the webhook envelope ({err}); a distribution sending a raw or "
            "edited payload cannot be routed or de-duplicated: switch it to the default payload",
        )
    except (msgspec.DecodeError, RecursionError) as err:
        return Quarantined("not_json", f"body is not JSON: {err}")

    event = envelope.event
    if (
        not event.id
        or not _TOPIC_SAFE.fullmatch(event.type)
        or event.type.startswith(INTERNAL_TOPICS)
    ):
        return Quarantined(
            "invalid_event_type",
            "event.id is empty, or event.type is not a valid topic name or names one of "
            "pubrelay's own topics (quarantine, dlq., retry.)",
            delivery_id=envelope.id,
            event_id=event.id or None,
        )
    if max_event_age_s is not None:
        created = parse_timestamp(event.created_at)
        current = now or datetime.now(UTC)
        if created is None or (current - created).total_seconds() > max_event_age_s:
            # With a maximum age set, an event without a readable time cannot prove it is
            # fresh: a replayed capture must not pass by dropping the field.
            return Quarantined(
                "stale",
                f"event.created_at {event.created_at!r} is missing, unreadable or older "
                f"than {max_event_age_s:g}s",
                delivery_id=envelope.id,
                event_id=event.id,
                event_type=event.type,
            )
    return Routed(
        delivery_id=envelope.id,
        event_id=event.id,
        event_type=event.type,
        key=envelope.customer_id or event.entity_id or event.id,
        created_at=event.created_at,
        publication_id=_publication_id(envelope),
    )


def _publication_id(envelope: LeanEnvelope) -> str | None:
    publication = envelope.data.publication if envelope.data is not None else None
    return publication.id if publication is not None and publication.id else None


def routed_headers(routed: Routed, *, received_at: bytes, signature: bytes) -> Headers:
    """The headers of a routed event's record (the intake's, and a quarantine release's
    before its ``origin``)."""
    headers = [
        (HEADER_EVENT_ID, routed.event_id.encode()),
        (HEADER_EVENT_TYPE, routed.event_type.encode()),
        (HEADER_DELIVERY_ID, routed.delivery_id.encode()),
        (HEADER_RECEIVED_AT, received_at),
        (HEADER_SIGNATURE, signature),
    ]
    if routed.created_at:
        headers.append((HEADER_EVENT_CREATED_AT, routed.created_at.encode()))
    if routed.publication_id:
        headers.append((HEADER_PUBLICATION_ID, routed.publication_id.encode()))
    return tuple(headers)
