"""Full pydantic models of Voucherify webhook events (webhook version v2024-01-01).

Handlers call :func:`parse_event` on the raw body the bus delivered. The envelope is
generic in its ``data``: the event types listed in :data:`DATA_MODELS` get a typed model,
every other type keeps ``data`` as a plain ``dict`` so plugins still see it (nothing is
dropped silently: ``docs/architecture.md``). Routing reads ``event.type``, never the
top-level ``type``, which for distribution webhooks is only a label the user typed.

The intake's hot path does not use these models (see :mod:`schemas.envelope`); they are
for handlers, which need the whole event.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Generic

import msgspec
from pydantic import BaseModel, ValidationError
from typing_extensions import TypeVar

from schemas.base import VoucherifyModel
from schemas.campaign import Campaign
from schemas.customer import Customer
from schemas.publication import Publication
from schemas.surrogates import without_lone_surrogates
from schemas.voucher import Voucher

__all__ = [
    "CUSTOMER_PUBLICATION_SUCCEEDED",
    "DATA_MODELS",
    "PUBLICATION_SUCCEEDED",
    "SOURCE_DISTRIBUTION",
    "SOURCE_WEBHOOK",
    "ApiKey",
    "CustomerPublicationSucceededData",
    "CustomerPublicationSucceededEnvelope",
    "EventSource",
    "EventUser",
    "PublicationSucceededData",
    "PublicationSucceededEnvelope",
    "UntypedEnvelope",
    "WebhookEnvelope",
    "WebhookEvent",
    "WebhookSource",
    "envelope_model_for",
    "parse_event",
]

CUSTOMER_PUBLICATION_SUCCEEDED: Final = "customer.publication.succeeded"
PUBLICATION_SUCCEEDED: Final = "publication.succeeded"

SOURCE_WEBHOOK: Final = "webhook"
"""``source.object`` of a webhook configured in the project settings."""
SOURCE_DISTRIBUTION: Final = "distribution"
"""``source.object`` of a webhook sent by a distribution."""

DataT = TypeVar("DataT", default=Any)
"""The type of ``data``; a bare ``WebhookEnvelope`` means ``WebhookEnvelope[Any]`` (PEP 696)."""


class EventUser(VoucherifyModel):
    """The Voucherify dashboard user who caused the event."""

    id: str | None = None


class ApiKey(VoucherifyModel):
    """The API key pair whose call caused the event."""

    name: str | None = None
    app_id: str | None = None


class EventSource(VoucherifyModel):
    """What initiated the event: ``channel`` is ``API``, ``USER_PORTAL``, ``CLIENT_API``..."""

    channel: str | None = None
    user: EventUser | None = None
    api_key: ApiKey | None = None


class WebhookSource(VoucherifyModel):
    """The webhook (``wh_…``) or distribution (``distr_…``) that sent this delivery."""

    id: str | None = None
    object: str | None = None
    target_url: str | None = None

    @property
    def is_distribution(self) -> bool:
        """True when a distribution sent it: then the top-level ``type`` is a user label."""
        return self.object == SOURCE_DISTRIBUTION


class WebhookEvent(VoucherifyModel):
    """The event behind a delivery; ``id`` is stable across retries (the idempotency key)."""

    id: str
    type: str
    created_at: datetime | None = None
    entity_id: str | None = None
    group_id: str | None = None
    event_source: EventSource | None = None


class WebhookEnvelope(VoucherifyModel, Generic[DataT]):
    """One delivery of an event. ``id`` (``whs_…``) changes on each retry; ``event.id`` not.

    Only what routing and deduplication need is required (``id``, ``event.id``,
    ``event.type``, ``data``); the rest is optional because a payload missing it can
    still be handled.
    """

    id: str
    project_id: str | None = None
    created_at: datetime | None = None
    type: str | None = None
    data: DataT
    source: WebhookSource | None = None
    event: WebhookEvent

    @property
    def event_id(self) -> str:
        """The idempotency key: the same for every retry of the event."""
        return self.event.id

    @property
    def event_type(self) -> str:
        """The type to route on (``event.type``)."""
        return self.event.type


class _PublicationEventData(VoucherifyModel):
    """What both publication events carry, and the lookups handlers need on it."""

    customer: Customer | None = None
    campaign: Campaign | None = None
    publication: Publication | None = None

    @property
    def customer_id(self) -> str | None:
        """Voucherify's id of the customer (``cust_…``), wherever the payload puts it."""
        if self.customer is not None and self.customer.id:
            return self.customer.id
        pub = self.publication
        if pub is not None:
            if pub.customer_id:
                return pub.customer_id
            if pub.customer is not None and pub.customer.id:
                return pub.customer.id
        return None

    @property
    def customer_email(self) -> str | None:
        """The customer's e-mail address, or ``None`` (the examples often have ``null``)."""
        if self.customer is not None and self.customer.email:
            return self.customer.email
        pub = self.publication
        if pub is not None and pub.customer is not None and pub.customer.email:
            return pub.customer.email
        return None

    @property
    def channel(self) -> str | None:
        """The publication channel: free text (``API``, ``Dashboard``, ``Automation``...)."""
        return self.publication.channel if self.publication is not None else None


class CustomerPublicationSucceededData(_PublicationEventData):
    """``customer.publication.succeeded``: a code was assigned to a customer.

    The spec's ``EventCustomerPublicationSucceededData``. Its ``voucher`` is the code
    published; ``publication.voucher`` repeats it with more detail.
    """

    voucher: Voucher


class PublicationSucceededData(_PublicationEventData):
    """``publication.succeeded`` (project-level): one publication, one or more codes.

    The spec's ``EventPublicationSucceededData``. A publication of several codes (the
    publish API with ``count > 1``) lists them in ``vouchers``; ``user`` is ``None`` when
    the publication came through the API.
    """

    user: EventUser | None = None
    voucher: Voucher | None = None
    vouchers: list[Voucher] | None = None

    @property
    def all_vouchers(self) -> list[Voucher]:
        """Every voucher of the publication, whichever field carries them."""
        found = list(self.vouchers or ())
        if self.voucher is not None and all(v.code != self.voucher.code for v in found):
            found.append(self.voucher)
        pub_voucher = self.publication.voucher if self.publication is not None else None
        if not found and pub_voucher is not None:
            found.append(pub_voucher)
        return found

    @property
    def codes(self) -> list[str]:
        """The published codes, in the order Voucherify listed them."""
        codes = [v.code for v in self.all_vouchers]
        if not codes and self.publication is not None:
            codes = list(self.publication.vouchers or ())
        return codes


CustomerPublicationSucceededEnvelope = WebhookEnvelope[CustomerPublicationSucceededData]
PublicationSucceededEnvelope = WebhookEnvelope[PublicationSucceededData]
UntypedEnvelope = WebhookEnvelope[dict[str, Any]]
"""The envelope of every event type without a model in :data:`DATA_MODELS`."""

DATA_MODELS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType(
    {
        CUSTOMER_PUBLICATION_SUCCEEDED: CustomerPublicationSucceededData,
        PUBLICATION_SUCCEEDED: PublicationSucceededData,
    }
)
"""The event types (``event.type``) whose ``data`` :func:`parse_event` types, and how."""

_ENVELOPES: Final[Mapping[str, type[WebhookEnvelope[Any]]]] = MappingProxyType(
    {
        CUSTOMER_PUBLICATION_SUCCEEDED: CustomerPublicationSucceededEnvelope,
        PUBLICATION_SUCCEEDED: PublicationSucceededEnvelope,
    }
)


class _PeekEvent(msgspec.Struct):
    type: str | None = None


class _PeekEnvelope(msgspec.Struct):
    event: _PeekEvent | None = None


_peek_decoder: Final = msgspec.json.Decoder(_PeekEnvelope)


def _peek_event_type(raw: bytes | bytearray | str) -> str | None:
    """Read only ``event.type``, skipping the rest without building objects.

    ``None`` when the body cannot be read that way; pydantic then has the last word.
    """
    try:
        peek = _peek_decoder.decode(raw)
    except msgspec.MsgspecError:
        return None
    return peek.event.type if peek.event is not None else None


def envelope_model_for(event_type: str | None) -> type[WebhookEnvelope[Any]]:
    """The envelope model :func:`parse_event` uses for ``event_type``."""
    if event_type is None:
        return UntypedEnvelope
    return _ENVELOPES.get(event_type, UntypedEnvelope)


def parse_event(raw: bytes | bytearray | str) -> WebhookEnvelope[Any]:
    """Validate a webhook body into an envelope whose ``data`` is typed by ``event.type``.

    ``data`` is the model in :data:`DATA_MODELS` for that type, else a ``dict``; narrow
    it with ``isinstance``. Raises :class:`pydantic.ValidationError` for a body that is
    not JSON, not an envelope, or whose data does not fit its model; the caller decides
    what that means (retry, dead letter, quarantine).

    The type is peeked with msgspec first so the body is validated once, by
    ``model_validate_json`` on the right model. Should the peek and pydantic disagree
    (a body only one of the two parsers accepts), the type pydantic read wins.

    A lone surrogate escape (``"\\ud83d"``, half an emoji in a free-text field) is valid
    JSON that both parsers refuse: such a body is parsed again with U+FFFD in its place
    (:mod:`schemas.surrogates`), so every string a handler sees can be encoded. Only a
    body that failed as JSON pays for that second try.
    """
    try:
        return _parse(raw)
    except ValidationError as err:
        if not _invalid_json(err):
            raise
        fixed = without_lone_surrogates(raw)
        if fixed is None:
            raise
        return _parse(fixed)


def _parse(raw: bytes | bytearray | str) -> WebhookEnvelope[Any]:
    model = envelope_model_for(_peek_event_type(raw))
    envelope = model.model_validate_json(raw)
    typed = envelope_model_for(envelope.event.type)
    if typed is not model:
        envelope = typed.model_validate_json(raw)
    return envelope


def _invalid_json(err: ValidationError) -> bool:
    """Whether pydantic refused the JSON itself, not what it holds."""
    return any(error["type"] == "json_invalid" for error in err.errors(include_url=False))
