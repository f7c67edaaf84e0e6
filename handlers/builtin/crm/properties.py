"""Which HubSpot contact properties the ``crm`` handler writes, and their values for an event.

``PUBRELAY_CRM__PROPERTIES`` maps a HubSpot contact property (internal name; custom
properties must exist in the portal) to a dotted path resolved on the typed event
(:class:`schemas.events.CustomerPublicationSucceededData`): ``voucher.code``,
``voucher.campaign``, ``campaign.name``, ``campaign.id``, ``publication.channel``,
``publication.created_at``, ``publication.id``, ``customer.id``, ``customer.source_id``,
``customer.name``, ``customer.metadata.<key>``... A path starting with ``event.`` reads the
envelope's event instead (``event.id``, ``event.type``, ``event.created_at``). ``codes`` is
every code of the publication, comma-separated (``A-1, A-2, A-3``), written only from an
event that lists them all (:mod:`handlers.builtin.publication_codes`): a
``customer.publication.succeeded`` of a multi-code publication carries one code, so to record
all of them add ``publication.succeeded`` to ``PUBRELAY_CRM__EVENT_TYPES``. Paths are
checked against the models at start-up (:class:`PropertyMap`). Values are sent as text:
date-times as ISO 8601 UTC (``2024-05-01T12:00:00.000Z``, which HubSpot date-time
properties accept), booleans as ``true``/``false``, objects as compact JSON; a missing
value leaves the property as it is. The defaults (:data:`DEFAULT_PROPERTIES`) write the
last published code, campaign, channel and publication time.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Final, Union, get_args, get_origin

from pydantic import BaseModel

from handlers.builtin.publication_codes import PublicationData, publication_codes
from handlers.types import Event
from schemas.errors import ConfigError
from schemas.events import CustomerPublicationSucceededData, WebhookEvent

__all__ = ["DEFAULT_PROPERTIES", "PropertyMap"]

DEFAULT_PROPERTIES: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "voucherify_last_coupon_code": "voucher.code",
        "voucherify_last_campaign": "campaign.name",
        "voucherify_last_channel": "publication.channel",
        "voucherify_last_published_at": "publication.created_at",
    }
)

CODES_PATH: Final = "codes"
"""The derived path of every code of the publication (not a model field)."""

_ANY: Final = object()
"""A path segment below a free-form mapping (``metadata``): anything goes from there."""


class PropertyMap:
    """``PROPERTIES`` checked against the event models; the property values of an event."""

    def __init__(self, properties: Mapping[str, str]) -> None:
        """Raises :class:`ConfigError` naming the first path that is not a field."""
        self.paths = {prop: _check_path(prop, path) for prop, path in properties.items()}

    def values(self, event: Event) -> dict[str, str]:
        """Each mapped property's value in ``event``; one without a value is left out."""
        properties: dict[str, str] = {}
        for prop, parts in self.paths.items():
            value = _as_property(_resolve(event, parts))
            if value is not None:
                properties[prop] = value
        return properties


def _models_of(annotation: Any) -> tuple[type[BaseModel], ...] | object | None:
    """The models a field holds, :data:`_ANY` for a mapping or ``Any``, ``None`` for scalars."""
    if annotation is Any:
        return _ANY
    origin = get_origin(annotation)
    if origin in (dict, Mapping) or annotation is dict:
        return _ANY
    if origin in (Union, types.UnionType) or (origin is not None and get_args(annotation)):
        found: list[type[BaseModel]] = []
        for arg in get_args(annotation):
            sub = _models_of(arg)
            if sub is _ANY:
                return _ANY
            if isinstance(sub, tuple):
                found.extend(sub)
        if origin is list:
            return None
        return tuple(found) or None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return (annotation,)
    return None


def _check_path(prop: str, path: str) -> tuple[str, ...]:
    """Split ``path`` and check it names fields of the event models (ConfigError if not)."""
    parts = tuple(path.split("."))
    where = f"PUBRELAY_CRM__PROPERTIES: {prop!r} -> {path!r}"
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: a field path is dotted names such as 'voucher.code'")
    if path == CODES_PATH:
        return parts
    if parts[0] == "event":
        models: tuple[type[BaseModel], ...] | object | None = (WebhookEvent,)
        rest = parts[1:]
        if not rest:
            raise ConfigError(f"{where}: name a field of the event, such as 'event.id'")
    else:
        models, rest = (CustomerPublicationSucceededData,), parts
    for depth, part in enumerate(rest):
        if models is _ANY:
            break
        if not isinstance(models, tuple):
            raise ConfigError(f"{where}: {rest[depth - 1]!r} is a value, not an object")
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:
            names = "/".join(m.__name__ for m in models)
            raise ConfigError(f"{where}: {part!r} is not a field of {names}")
        models = _models_of(fields[0].annotation)
    return parts


def _resolve(event: Event, parts: tuple[str, ...]) -> Any:
    """The value at ``parts`` in the event, ``None`` where any step is missing."""
    envelope = event.envelope
    node: Any
    if parts == (CODES_PATH,):
        if not isinstance(envelope.data, PublicationData):
            return None
        codes = publication_codes(envelope.data)
        return ", ".join(codes.codes) if codes.complete and codes.vouchers else None
    if parts[0] == "event":
        node, parts = envelope.event, parts[1:]
    else:
        node = envelope.data
    for part in parts:
        if isinstance(node, BaseModel):
            extra = node.model_extra or {}
            if part in type(node).model_fields:
                node = getattr(node, part)
            elif part in extra:
                node = extra[part]
            else:
                return None
        elif isinstance(node, Mapping):
            node = node.get(part)
        else:
            return None
        if node is None:
            return None
    return node


def _as_property(value: Any) -> str | None:
    """HubSpot property values are text; ``None`` means "leave the property alone"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
