"""The fields the console searches and shows, read from a verified event body.

Read by the index recorder on its own thread, never on the request path. Unknown shapes
give empty fields: a body is attacker-controlled text until verified and free text after
(every value is escaped where it is shown, see ``pubrelay/console/templates/``). Each value is cut
to ``MAX_FIELD_CHARS``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec

MAX_FIELD_CHARS: Final = 200
MAX_CODES: Final = 50


@dataclass(frozen=True, slots=True)
class EventFields:
    customer_id: str = ""
    customer_email: str = ""
    publication_id: str = ""
    voucher_code: str = ""
    """The first code; every code is searchable (``terms``)."""
    campaign: str = ""
    channel: str = ""


def _text(value: Any) -> str:
    return value[:MAX_FIELD_CHARS] if isinstance(value, str) else ""


def _object(value: Any, *path: str) -> dict[str, Any]:
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def _codes(publication: dict[str, Any]) -> Iterator[str]:
    """The publication's voucher code, and each of ``vouchers`` (multi-code publications)."""
    code = _text(_object(publication, "voucher").get("code"))
    if code:
        yield code
    vouchers = publication.get("vouchers")
    if isinstance(vouchers, list):
        for voucher in vouchers[:MAX_CODES]:
            code = _text(voucher.get("code")) if isinstance(voucher, dict) else ""
            if code:
                yield code


class _Voucher(msgspec.Struct):
    code: str | None = None


class _Publication(msgspec.Struct):
    id: str | None = None
    channel: str | None = None
    voucher: _Voucher | None = None
    vouchers: list[_Voucher] | None = None


class _Customer(msgspec.Struct):
    id: str | None = None
    email: str | None = None


class _Campaign(msgspec.Struct):
    name: str | None = None


class _Data(msgspec.Struct):
    customer: _Customer | None = None
    publication: _Publication | None = None
    campaign: _Campaign | None = None


class _Body(msgspec.Struct):
    data: _Data | None = None


_decoder = msgspec.json.Decoder(_Body)


def read_fields(body: bytes) -> tuple[EventFields, frozenset[str]]:
    """The event's fields and its search terms (lower-cased); empty for a body that is
    not a JSON object.

    The usual body is decoded with msgspec, skipping every other field without building
    objects (a few microseconds for the 4 KB example); a body of another shape (a number
    where a text is expected, a lone surrogate escape) is read with :mod:`json` instead.
    """
    try:
        data = _decoder.decode(body).data or _Data()
    except msgspec.MsgspecError:
        return _read_any(body)
    customer = data.customer or _Customer()
    publication = data.publication or _Publication()
    codes = [v.code[:MAX_FIELD_CHARS] for v in (publication.voucher,) if v and v.code]
    codes += [v.code[:MAX_FIELD_CHARS] for v in (publication.vouchers or ())[:MAX_CODES] if v.code]
    return _with_terms(
        EventFields(
            customer_id=_text(customer.id),
            customer_email=_text(customer.email),
            publication_id=_text(publication.id),
            voucher_code=codes[0] if codes else "",
            campaign=_text(data.campaign.name if data.campaign else None),
            channel=_text(publication.channel),
        ),
        codes,
    )


def _with_terms(fields: EventFields, codes: list[str]) -> tuple[EventFields, frozenset[str]]:
    """The search terms beside the event id (looked up as it is) and the delivery ids
    (added with each delivery): customer id and e-mail, publication id, every code."""
    values = [fields.customer_id, fields.customer_email, fields.publication_id, *codes]
    return fields, frozenset(v.lower() for v in values if v)


def _read_any(body: bytes) -> tuple[EventFields, frozenset[str]]:
    """:func:`read_fields` for a body of any shape."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return EventFields(), frozenset()
    data = _object(doc, "data")
    customer = _object(data, "customer")
    publication = _object(data, "publication")
    codes = list(_codes(publication))
    fields = EventFields(
        customer_id=_text(customer.get("id")),
        customer_email=_text(customer.get("email")),
        publication_id=_text(publication.get("id")),
        voucher_code=codes[0] if codes else "",
        campaign=_text(_object(data, "campaign").get("name")),
        channel=_text(publication.get("channel")),
    )
    return _with_terms(fields, codes)
