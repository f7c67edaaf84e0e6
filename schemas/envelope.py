"""The lean envelope: the few fields the intake's hot path needs, decoded with msgspec.

The intake forwards the body bytes unchanged, so it decodes only ids, types and the
customer id; unknown fields are skipped without building objects (a full nested model
costs more than half of a request: ``docs/performance.md``). Handlers use the full
pydantic models in :mod:`schemas.events`.
"""

from __future__ import annotations

import msgspec

from schemas.surrogates import without_lone_surrogates


class LeanCustomer(msgspec.Struct):
    id: str | None = None


class LeanPublication(msgspec.Struct):
    id: str | None = None
    customer_id: str | None = None
    customer: LeanCustomer | None = None


class LeanData(msgspec.Struct):
    customer: LeanCustomer | None = None
    customer_id: str | None = None
    publication: LeanPublication | None = None


class LeanEvent(msgspec.Struct):
    id: str
    type: str
    created_at: str | None = None
    entity_id: str | None = None


class LeanSource(msgspec.Struct):
    id: str | None = None
    object: str | None = None


class LeanEnvelope(msgspec.Struct):
    """Webhook envelope v2024-01-01: delivery ``id``, ``event`` with the idempotency key."""

    id: str
    event: LeanEvent
    data: LeanData | None = None
    type: str | None = None
    project_id: str | None = None
    created_at: str | None = None
    source: LeanSource | None = None

    @property
    def customer_id(self) -> str | None:
        """The customer the event concerns, for per-customer ordering on the bus."""
        data = self.data
        if data is not None:
            if data.customer is not None and data.customer.id:
                return data.customer.id
            if data.customer_id:
                return data.customer_id
            pub = data.publication
            if pub is not None:
                if pub.customer_id:
                    return pub.customer_id
                if pub.customer is not None and pub.customer.id:
                    return pub.customer.id
        return None


lean_decoder = msgspec.json.Decoder(LeanEnvelope)


def decode_lean(body: bytes | str) -> LeanEnvelope:
    """The lean envelope of ``body``; raises :class:`msgspec.DecodeError` (or its subclass
    :class:`msgspec.ValidationError`) like :data:`lean_decoder`.

    A body refused only for a lone surrogate escape (valid JSON that msgspec rejects) is
    decoded with U+FFFD in its place (:mod:`schemas.surrogates`), so such an event is
    routed like any other.
    """
    try:
        return lean_decoder.decode(body)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:
        fixed = without_lone_surrogates(body)
        if fixed is None:
            raise
        return lean_decoder.decode(fixed)
