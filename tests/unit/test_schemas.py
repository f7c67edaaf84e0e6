"""The event models accept what Voucherify sends, and give handlers what they need.

The official examples live in the shared folder beside the repository; they are found
programmatically so a newer copy of the spec is checked without editing this file. A
missing folder fails the tests: skipping would hide that nothing was checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from pydantic import BaseModel, ValidationError

from schemas.events import (
    CUSTOMER_PUBLICATION_SUCCEEDED,
    DATA_MODELS,
    PUBLICATION_SUCCEEDED,
    CustomerPublicationSucceededData,
    CustomerPublicationSucceededEnvelope,
    PublicationSucceededData,
    PublicationSucceededEnvelope,
    UntypedEnvelope,
    WebhookEnvelope,
    envelope_model_for,
    parse_event,
)
from schemas.publication import Publication
from schemas.timestamps import utc_now_iso, utc_now_log
from schemas.voucher import AmountDiscount, OtherDiscount, Voucher, format_cents
from tests.fixtures.samples import sample_publication_body, sample_publication_event

SHARED: Final = Path(__file__).resolve().parents[3] / "shared" / "voucherify"

WEBHOOK_SPEC_FILES: Final = (
    "reference__OpenAPIWebhooks.json",
    "openapi-events__events-customer.json",
    "openapi-events__events-publication.json",
)
PUBLICATION_WEBHOOKS: Final = (
    "EVENTS.CUSTOMER.PUBLICATION.SUCCEEDED",
    "EVENTS.PUBLICATION.SUCCEEDED",
)
DATA_OBJECTS_FILE: Final = "examples__data-objects-from-OpenAPIWebhooks.json"
PUBLICATIONS_API_FILES: Final = ("openapi__publications.json", "production__readOnly-openAPI.json")
PUBLICATIONS_API_PATHS: Final = ("/v1/publications", "/v1/publications/create")

MISSING: Final = "shared-voucherify-folder-missing"
T0: Final = datetime(2024, 3, 13, 13, 45, 59, 492000, tzinfo=UTC)


# -- finding the official examples -------------------------------------------------------


def _load(name: str) -> Any:
    return json.loads((SHARED / name).read_text(encoding="utf-8"))


def _webhook_examples() -> Iterator[tuple[str, type[BaseModel], Any]]:
    """requestBody examples of the two publication webhooks in each events spec file."""
    for file_name in WEBHOOK_SPEC_FILES:
        webhooks = _load(file_name)["webhooks"]
        for webhook in PUBLICATION_WEBHOOKS:
            if webhook not in webhooks:
                continue
            event_type = webhook.removeprefix("EVENTS.").lower()
            body = webhooks[webhook]["post"]["requestBody"]["content"]["application/json"]
            for name, example in body["examples"].items():
                yield f"{file_name}:{webhook}:{name}", DATA_MODELS[event_type], example["value"]


def _data_object_examples() -> Iterator[tuple[str, type[BaseModel], Any]]:
    """Every entry of the derived data-objects file.

    ``voucher.published`` and ``manual_distribution_schedule`` carry the same
    customer / campaign / publication / voucher quartet as
    ``customer.publication.succeeded`` (plus their own extra fields), so they must
    fit that model too.
    """
    for name, value in _load(DATA_OBJECTS_FILE).items():
        yield (
            f"{DATA_OBJECTS_FILE}:{name}",
            DATA_MODELS.get(name, CustomerPublicationSucceededData),
            value,
        )


def _publications_api_examples() -> Iterator[tuple[str, type[BaseModel], Any]]:
    """Successful responses of the publications API: single publications or a list."""
    for file_name in PUBLICATIONS_API_FILES:
        paths = _load(file_name)["paths"]
        for path in PUBLICATIONS_API_PATHS:
            for method, operation in paths.get(path, {}).items():
                if not isinstance(operation, dict):
                    continue
                for status, response in operation.get("responses", {}).items():
                    if not status.startswith("2"):
                        continue
                    for content in response.get("content", {}).values():
                        for name, example in content.get("examples", {}).items():
                            value = example["value"]
                            where = f"{file_name}:{method.upper()} {path}:{status}:{name}"
                            items = value.get("publications", [value])
                            for index, item in enumerate(items):
                                yield f"{where}:{index}", Publication, item


def _params(finder: Any) -> list[Any]:
    if not SHARED.is_dir():
        return [pytest.param(None, None, id=MISSING)]
    return [pytest.param(model, value, id=name) for name, model, value in finder()]


_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def _normalise(value: Any) -> Any:
    """Compare JSON by meaning: timestamps as instants (``.161Z`` == ``.161000Z``)."""
    if isinstance(value, dict):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalise(item) for item in value]
    if isinstance(value, str) and _ISO_TIME.match(value):
        return datetime.fromisoformat(value)
    return value


def _assert_lossless(model: type[BaseModel], value: Any) -> BaseModel:
    """Validate ``value`` and check that dumping it gives back the same data, no less."""
    parsed = model.model_validate(value)
    dumped = parsed.model_dump(mode="json", exclude_unset=True)
    assert _normalise(dumped) == _normalise(value)
    return parsed


# -- the official examples ---------------------------------------------------------------


def test_shared_examples_folder_is_present_and_holds_the_publication_examples() -> None:
    assert SHARED.is_dir(), f"the official Voucherify spec folder is missing: {SHARED}"
    webhook_sources = {name.rsplit(":", 1)[0] for name, _, _ in _webhook_examples()}
    assert webhook_sources >= {
        "reference__OpenAPIWebhooks.json:EVENTS.CUSTOMER.PUBLICATION.SUCCEEDED",
        "reference__OpenAPIWebhooks.json:EVENTS.PUBLICATION.SUCCEEDED",
        "openapi-events__events-customer.json:EVENTS.CUSTOMER.PUBLICATION.SUCCEEDED",
        "openapi-events__events-publication.json:EVENTS.PUBLICATION.SUCCEEDED",
    }
    assert {name for name, _, _ in _data_object_examples()} >= {
        f"{DATA_OBJECTS_FILE}:{CUSTOMER_PUBLICATION_SUCCEEDED}",
        f"{DATA_OBJECTS_FILE}:{PUBLICATION_SUCCEEDED}",
    }
    assert len(list(_publications_api_examples())) >= 3


@pytest.mark.parametrize(
    ("model", "value"), [*_params(_webhook_examples), *_params(_data_object_examples)]
)
def test_official_event_data_example_validates_without_losing_fields(
    model: type[BaseModel] | None, value: Any
) -> None:
    if model is None:
        pytest.fail(f"the official Voucherify spec folder is missing: {SHARED}")
    parsed = _assert_lossless(model, value)
    assert isinstance(parsed, CustomerPublicationSucceededData | PublicationSucceededData)
    assert parsed.customer_id is not None
    assert parsed.customer_id.startswith("cust_")
    assert parsed.customer_email == (value["customer"] or {}).get("email")
    assert parsed.channel == value["publication"]["channel"]


@pytest.mark.parametrize(("model", "value"), _params(_publications_api_examples))
def test_official_publications_api_example_validates_without_losing_fields(
    model: type[BaseModel] | None, value: Any
) -> None:
    if model is None:
        pytest.fail(f"the official Voucherify spec folder is missing: {SHARED}")
    parsed = _assert_lossless(model, value)
    assert isinstance(parsed, Publication)
    assert parsed.id is not None
    assert parsed.id.startswith("pub_")


def test_official_examples_wrapped_in_an_envelope_parse_with_typed_data() -> None:
    examples = {name.rsplit(":", 1)[-1]: value for name, _, value in _data_object_examples()}
    for event_type, model in DATA_MODELS.items():
        body = _envelope(event_type, examples[event_type])
        envelope = parse_event(json.dumps(body).encode())
        assert isinstance(envelope.data, model)


def test_publication_succeeded_example_lists_its_code_and_voucher() -> None:
    examples = {name.rsplit(":", 1)[-1]: value for name, _, value in _data_object_examples()}
    data = PublicationSucceededData.model_validate(examples[PUBLICATION_SUCCEEDED])
    assert data.codes == ["ZERO-8"]
    assert data.user is not None
    assert data.user.id == "user_ypzfEcSAphSONMGJRlj6trzXKsh7FGX7"
    assert [v.discount_description for v in data.all_vouchers] == [
        "0 \u00d7 prod_0df14b7e7d8975079d"
    ]


# -- parse_event -------------------------------------------------------------------------


def _envelope(event_type: str, data: Any, *, label: str | None = None) -> dict[str, Any]:
    """A v2024-01-01 envelope around ``data``; ``label`` is a distribution's own type."""
    return {
        "id": "whs_0e16e42bc6e0c65b57",
        "project_id": "proj_5T4Rpl4T1nuM",
        "created_at": "2024-01-01T11:11:11.111Z",
        "type": label or event_type,
        "data": data,
        "source": {
            "id": "distr_TrJj0lHV44EMt6HvLa2pyNlHTF" if label else "wh_j56Vfy47Vx9YOX7QYD1fzHnc",
            "object": "distribution" if label else "webhook",
            "target_url": "https://relay.example.com/webhooks/voucherify",
        },
        "event": {
            "id": "evpub_1f3611301g3127begb",
            "type": event_type,
            "created_at": "2024-01-01T11:11:11.105Z",
            "entity_id": "pub_DpHmhx5uTanbM0mnndFrODi1U3MEX6rF",
            "group_id": "v-1f36113948e50fc4ge",
            "event_source": {
                "channel": "USER_PORTAL",
                "user": {"id": "user_xyzfghSTprSTUVWXYlk6tuvXYst7FGH7"},
                "api_key": {"name": "relay", "app_id": "1XXXX5XX-0XXX-XXXb-X7XX-XX2XXaXXX6XX"},
            },
        },
    }


def _sample(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "event_id": "evpub_1",
        "delivery_id": "whs_1",
        "customer_id": "cust_42",
        "email": "jack@example.com",
        "code": "SPRING-2024-tPz",
        "created_at": T0,
    }
    args.update(overrides)
    return sample_publication_event(**args)


def test_parse_event_round_trips_a_full_envelope() -> None:
    body = _envelope(CUSTOMER_PUBLICATION_SUCCEEDED, _sample()["data"])
    envelope = parse_event(json.dumps(body).encode())

    assert type(envelope) is CustomerPublicationSucceededEnvelope
    assert envelope.id == "whs_0e16e42bc6e0c65b57"
    assert envelope.project_id == "proj_5T4Rpl4T1nuM"
    assert envelope.created_at == datetime(2024, 1, 1, 11, 11, 11, 111000, tzinfo=UTC)
    assert envelope.event_id == "evpub_1f3611301g3127begb"
    assert envelope.event_type == CUSTOMER_PUBLICATION_SUCCEEDED
    assert envelope.event.entity_id == "pub_DpHmhx5uTanbM0mnndFrODi1U3MEX6rF"
    assert envelope.event.group_id == "v-1f36113948e50fc4ge"
    source = envelope.event.event_source
    assert source is not None
    assert source.channel == "USER_PORTAL"
    assert source.user is not None
    assert source.user.id == "user_xyzfghSTprSTUVWXYlk6tuvXYst7FGH7"
    assert source.api_key is not None
    assert source.api_key.app_id == "1XXXX5XX-0XXX-XXXb-X7XX-XX2XXaXXX6XX"
    assert envelope.source is not None
    assert envelope.source.object == "webhook"
    assert not envelope.source.is_distribution
    data = envelope.data
    assert isinstance(data, CustomerPublicationSucceededData)
    assert data.customer_id == "cust_42"
    assert data.customer_email == "jack@example.com"
    assert data.voucher.code == "SPRING-2024-tPz"
    assert data.voucher.discount_description == "10% off"

    again = parse_event(envelope.model_dump_json())
    assert again == envelope
    assert _normalise(json.loads(envelope.model_dump_json(exclude_unset=True))) == _normalise(body)


def test_parse_event_routes_on_event_type_not_on_a_distribution_label() -> None:
    body = _envelope(CUSTOMER_PUBLICATION_SUCCEEDED, _sample()["data"], label="Coupon for Jack")
    envelope = parse_event(json.dumps(body))

    assert envelope.type == "Coupon for Jack"
    assert envelope.source is not None
    assert envelope.source.is_distribution
    assert isinstance(envelope.data, CustomerPublicationSucceededData)


def test_parse_event_keeps_data_of_other_event_types_as_a_plain_dict() -> None:
    data = {"customer": {"id": "cust_1", "email": None}, "anything": [1, 2.5, "x", None]}
    envelope = parse_event(json.dumps(_envelope("voucher.published", data)).encode())

    assert type(envelope) is UntypedEnvelope
    assert envelope.data == data
    assert envelope.event_type == "voucher.published"


def test_bare_envelope_accepts_any_data_untyped() -> None:
    raw = json.dumps(_sample()).encode()
    envelope = WebhookEnvelope.model_validate_json(raw)
    assert isinstance(envelope.data, dict)
    assert envelope.data["voucher"]["code"] == "SPRING-2024-tPz"
    typed = parse_event(raw).model_dump(mode="json", exclude_unset=True)
    assert _normalise(typed) == _normalise(envelope.model_dump(mode="json", exclude_unset=True))


def test_parse_event_types_data_even_when_the_fast_peek_cannot_read_the_body() -> None:
    # msgspec rejects NaN, pydantic accepts it: the type pydantic read must still win.
    raw = sample_publication_body(
        event_id="evpub_1", delivery_id="whs_1", customer_id="cust_42", email=None, code="C-1"
    )
    raw = raw.replace(b'"metadata":{}', b'"metadata":{"score":NaN}', 1)
    envelope = parse_event(raw)
    assert isinstance(envelope.data, CustomerPublicationSucceededData)


def test_parse_event_reads_a_lone_surrogate_in_a_free_text_field_as_a_replacement() -> None:
    # Valid JSON (half an emoji) that msgspec and pydantic refuse as it is.
    raw = sample_publication_body(
        event_id="evcus_1", delivery_id="whs_1", customer_id="cust_42", email=None, code="C-1"
    )
    raw = raw.replace(b'"name":"Jack Webhook"', b'"name":"Jack \\ud83d Webhook \\ud83d\\ude00"')

    envelope = parse_event(raw)

    data = envelope.data
    assert isinstance(data, CustomerPublicationSucceededData)
    assert data.customer is not None
    assert data.customer.name == "Jack \ufffd Webhook \U0001f600"  # the pair is kept
    assert data.customer.name.encode()  # every string a handler sees can be encoded
    assert envelope.event_id == "evcus_1"


def test_publication_succeeded_with_several_codes_lists_them_all() -> None:
    one = _sample()["data"]
    codes = ["SPRING-2024-aaa", "SPRING-2024-bbb", "SPRING-2024-ccc"]
    vouchers = [{**one["voucher"], "id": f"v_{code}", "code": code} for code in codes]
    publication = {key: value for key, value in one["publication"].items() if key != "voucher"}
    publication.update(vouchers=codes, vouchers_id=[v["id"] for v in vouchers])
    data = {
        "user": None,
        "customer": one["customer"],
        "campaign": one["campaign"],
        "publication": publication,
        "vouchers": vouchers,
    }
    envelope = parse_event(json.dumps(_envelope(PUBLICATION_SUCCEEDED, data)).encode())

    assert type(envelope) is PublicationSucceededEnvelope
    assert isinstance(envelope.data, PublicationSucceededData)
    assert envelope.data.codes == codes
    assert envelope.data.publication is not None
    assert envelope.data.publication.vouchers == codes
    assert envelope.data.customer_id == "cust_42"


def test_publication_succeeded_codes_fall_back_to_the_publication_code_list() -> None:
    data = PublicationSucceededData.model_validate(
        {"publication": {"id": "pub_1", "vouchers": ["A-1", "A-2"]}}
    )
    assert data.codes == ["A-1", "A-2"]
    assert data.all_vouchers == []


def test_unknown_fields_are_kept_at_every_level() -> None:
    body = _sample()
    body["schema_version"] = "2030"
    body["event"]["trace"] = {"span": "abc"}
    body["data"]["loyalty_hint"] = 7
    body["data"]["voucher"]["nft"] = {"chain": "none"}
    body["data"]["voucher"]["discount"]["rounding"] = "UP"
    envelope = parse_event(json.dumps(body).encode())

    assert envelope.model_extra == {"schema_version": "2030"}
    assert envelope.event.model_extra == {"trace": {"span": "abc"}}
    data = envelope.data
    assert isinstance(data, CustomerPublicationSucceededData)
    assert data.model_extra == {"loyalty_hint": 7}
    assert data.voucher.model_extra is not None
    assert data.voucher.model_extra["nft"] == {"chain": "none"}
    assert data.voucher.discount is not None
    assert data.voucher.discount.model_extra == {"rounding": "UP"}
    dumped = json.loads(envelope.model_dump_json())
    assert dumped["data"]["voucher"]["discount"]["rounding"] == "UP"


def test_amounts_the_spec_types_as_numbers_may_have_a_fraction() -> None:
    """The spec types amounts (and a code's length) as ``number``: ``1050.5`` failed the
    whole event (pydantic's int refuses a fraction), which then went to every handler's
    dead letters. It is read as the nearest whole cent."""
    event = _sample()
    event["data"]["voucher"]["discount"] = {"type": "AMOUNT", "amount_off": 1050.5}
    event["data"]["voucher"]["gift"] = {"amount": 2500.0, "balance": 1999.6}
    event["data"]["campaign"]["code_config"] = {"length": 8.0}

    envelope = parse_event(json.dumps(event).encode())

    data = envelope.data
    assert isinstance(data, CustomerPublicationSucceededData)
    assert isinstance(data.voucher.discount, AmountDiscount)
    assert data.voucher.discount.amount_off == 1051
    assert data.voucher.discount_description == "10.51 off"
    assert data.voucher.gift is not None
    assert (data.voucher.gift.amount, data.voucher.gift.balance) == (2500, 2000)
    assert data.campaign is not None
    assert data.campaign.model_dump(mode="json")["code_config"]["length"] == 8


def test_unknown_discount_type_is_kept_not_rejected() -> None:
    voucher = Voucher.model_validate(
        {"code": "SHIP-1", "discount": {"type": "SHIPPING", "shipping_off": 500}}
    )
    assert isinstance(voucher.discount, OtherDiscount)
    assert voucher.discount.model_extra == {"shipping_off": 500}
    assert voucher.discount_description == "shipping discount"


def test_null_email_is_allowed_and_reads_as_none() -> None:
    envelope = parse_event(json.dumps(_sample(email=None)).encode())
    data = envelope.data
    assert isinstance(data, CustomerPublicationSucceededData)
    assert data.customer is not None
    assert data.customer.email is None
    assert data.customer_email is None
    assert data.customer_id == "cust_42"


def test_customer_lookups_fall_back_to_the_publication() -> None:
    data = CustomerPublicationSucceededData.model_validate(
        {
            "customer": None,
            "campaign": None,
            "publication": {"customer": {"id": "cust_7", "email": "seven@example.com"}},
            "voucher": {"code": "X"},
        }
    )
    assert data.customer_id == "cust_7"
    assert data.customer_email == "seven@example.com"
    bare = CustomerPublicationSucceededData.model_validate({"voucher": {"code": "X"}})
    assert bare.customer_id is None
    assert bare.customer_email is None
    assert bare.channel is None


def test_data_models_registry_names_the_typed_event_types() -> None:
    assert dict(DATA_MODELS) == {
        CUSTOMER_PUBLICATION_SUCCEEDED: CustomerPublicationSucceededData,
        PUBLICATION_SUCCEEDED: PublicationSucceededData,
    }
    for event_type, model in DATA_MODELS.items():
        assert envelope_model_for(event_type).model_fields["data"].annotation is model
    assert envelope_model_for("customer.created") is UntypedEnvelope
    with pytest.raises(TypeError):
        DATA_MODELS["x"] = BaseModel  # type: ignore[index]  # proving it is read-only


_VALID: Final = json.dumps(
    sample_publication_event(
        event_id="evpub_1",
        delivery_id="whs_1",
        customer_id="c",
        email=None,
        code="C",
        created_at=T0,
    )
)


def _without(path: tuple[str, ...]) -> bytes:
    body = json.loads(_VALID)
    node = body
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return json.dumps(body).encode()


def _with(path: tuple[str, ...], value: Any) -> bytes:
    body = json.loads(_VALID)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"id": "whs_1", "event": ', id="truncated"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"null", id="null"),
        pytest.param(_without(("event",)), id="no-event"),
        pytest.param(_without(("event", "id")), id="no-event-id"),
        pytest.param(_without(("event", "type")), id="no-event-type"),
        pytest.param(_with(("event", "type"), 7), id="event-type-not-text"),
        pytest.param(_without(("id",)), id="no-delivery-id"),
        pytest.param(_without(("data",)), id="no-data"),
        pytest.param(_without(("data", "voucher")), id="no-voucher"),
        pytest.param(_without(("data", "voucher", "code")), id="voucher-without-code"),
        pytest.param(
            _with(("data", "voucher", "discount", "percent_off"), "ten"), id="bad-percent"
        ),
        pytest.param(_with(("created_at",), "yesterday"), id="bad-timestamp"),
        pytest.param(_with(("data",), "text"), id="data-not-an-object"),
    ],
)
def test_invalid_input_raises_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_event(raw)


def test_a_validation_error_names_the_field_but_never_the_value() -> None:
    # pydantic cuts a long value to its ends ("Contact: margaret.hamilt...NW1 6XE"): cut
    # before the "@", no masking can find the address in the error a dead letter keeps.
    value = "Contact: margaret.hamilton@example.com, 221B Baker Street, London NW1 6XE"
    with pytest.raises(ValidationError) as raised:
        parse_event(_with(("data", "customer", "address"), value))

    text = str(raised.value)
    assert "data.customer.address" in text
    assert "margaret" not in text
    assert "Baker" not in text


def test_invalid_data_of_an_untyped_event_still_needs_an_object() -> None:
    with pytest.raises(ValidationError):
        parse_event(json.dumps(_envelope("customer.created", ["not", "an", "object"])))


# -- discount descriptions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("voucher", "currency", "expected"),
    [
        ({"discount": {"type": "PERCENT", "percent_off": 10}}, None, "10% off"),
        ({"discount": {"type": "PERCENT", "percent_off": 12.5}}, "$", "12.5% off"),
        ({"discount": {"type": "PERCENT", "percent_off_formula": "X"}}, None, "percent off"),
        ({"discount": {"type": "AMOUNT", "amount_off": 1000}}, None, "10.00 off"),
        ({"discount": {"type": "AMOUNT", "amount_off": 1000}}, "$", "$10.00 off"),
        ({"discount": {"type": "AMOUNT", "amount_off": 5}}, "EUR ", "EUR 0.05 off"),
        ({"discount": {"type": "AMOUNT", "amount_off": 123456}}, "\u20ac", "\u20ac1234.56 off"),
        ({"discount": {"type": "AMOUNT"}}, None, "amount off"),
        (
            {"discount": {"type": "UNIT", "unit_off": 5, "unit_type": "prod_x"}},
            None,
            "5 \u00d7 prod_x",
        ),
        ({"discount": {"type": "UNIT", "unit_type": "prod_x"}}, None, "free prod_x"),
        (
            {
                "discount": {
                    "type": "UNIT",
                    "effect": "ADD_MANY_ITEMS",
                    "units": [
                        {"unit_off": 1, "unit_type": "prod_a", "effect": "ADD_NEW_ITEMS"},
                        {"unit_off": 2, "unit_type": "prod_b", "effect": "ADD_MISSING_ITEMS"},
                    ],
                }
            },
            None,
            "1 \u00d7 prod_a + 2 \u00d7 prod_b",
        ),
        ({"discount": {"type": "FIXED", "fixed_amount": 1000}}, None, "fixed price 10.00"),
        ({"discount": {"type": "FIXED", "fixed_amount": 999}}, "$", "fixed price $9.99"),
        (
            {"type": "GIFT_VOUCHER", "gift": {"amount": 5000, "balance": 5000, "effect": None}},
            "$",
            "$50.00 gift card",
        ),
        ({"type": "GIFT_VOUCHER", "gift": {"amount": 2000}}, None, "20.00 gift card"),
        (
            {"type": "LOYALTY_CARD", "loyalty_card": {"points": 120}},
            None,
            "loyalty card with 120 points",
        ),
        ({"type": "LOYALTY_CARD", "loyalty_card": {}}, None, "loyalty card"),
        ({"type": "DISCOUNT_VOUCHER", "gift": None, "loyalty_card": None}, None, None),
    ],
)
def test_voucher_describes_its_value_for_people(
    voucher: dict[str, Any], currency: str | None, expected: str | None
) -> None:
    parsed = Voucher.model_validate({"code": "CODE-1", **voucher})
    assert parsed.describe(currency) == expected
    if currency is None:
        assert parsed.discount_description == expected


def test_discount_type_picks_the_model_and_amounts_stay_integer_cents() -> None:
    """Whole cents, also from a number with a fraction (the nearest, halves up)."""
    voucher = Voucher.model_validate(
        {"code": "A", "discount": {"type": "AMOUNT", "amount_off": 1000.0}}
    )
    assert isinstance(voucher.discount, AmountDiscount)
    assert voucher.discount.amount_off == 1000
    assert isinstance(voucher.discount.amount_off, int)
    half = Voucher.model_validate({"code": "A", "discount": {"type": "AMOUNT", "amount_off": 10.5}})
    assert isinstance(half.discount, AmountDiscount)
    assert half.discount.amount_off == 11
    with pytest.raises(ValidationError):  # not a number at all
        Voucher.model_validate({"code": "A", "discount": {"type": "AMOUNT", "amount_off": "ten"}})


def test_format_cents_handles_negative_and_small_amounts() -> None:
    assert format_cents(0) == "0.00"
    assert format_cents(7) == "0.07"
    assert format_cents(-1050, "$") == "-$10.50"


# -- the sample generator ----------------------------------------------------------------


def test_sample_event_is_a_realistic_4kb_envelope_parse_event_accepts() -> None:
    raw = sample_publication_body(
        event_id="evpub_9",
        delivery_id="whs_9",
        customer_id="cust_9",
        email="nine@example.com",
        code="SPRING-2024-n9n",
        channel="Automation",
        campaign="Autumn Deals",
        created_at=T0,
    )
    assert 3500 <= len(raw) <= 5000
    envelope = parse_event(raw)

    assert type(envelope) is CustomerPublicationSucceededEnvelope
    assert envelope.id == "whs_9"
    assert envelope.event_id == "evpub_9"
    assert envelope.event_type == CUSTOMER_PUBLICATION_SUCCEEDED
    assert envelope.type == CUSTOMER_PUBLICATION_SUCCEEDED
    assert envelope.source is not None
    assert envelope.source.object == "webhook"
    data = envelope.data
    assert data.customer_id == "cust_9"
    assert data.customer_email == "nine@example.com"
    assert data.channel == "Automation"
    assert data.campaign is not None
    assert data.campaign.name == "Autumn Deals"
    assert data.voucher.code == "SPRING-2024-n9n"
    assert data.voucher.campaign == "Autumn Deals"
    assert data.publication is not None
    assert data.publication.voucher is not None
    assert data.publication.voucher.code == "SPRING-2024-n9n"
    assert data.publication.created_at == T0
    assert data.voucher.discount_description == "10% off"
    assert envelope.event.entity_id == data.publication.id
    assert envelope.model_extra == {}
    assert json.loads(raw) == sample_publication_event(
        event_id="evpub_9",
        delivery_id="whs_9",
        customer_id="cust_9",
        email="nine@example.com",
        code="SPRING-2024-n9n",
        channel="Automation",
        campaign="Autumn Deals",
        created_at=T0,
    )


def test_sample_event_is_deterministic_and_a_retry_differs_only_in_delivery_id() -> None:
    first = _sample(delivery_id="whs_a")
    assert first == _sample(delivery_id="whs_a")
    retry = _sample(delivery_id="whs_b")
    assert retry["id"] == "whs_b"
    assert {**retry, "id": "whs_a"} == first
    other = _sample(event_id="evpub_2", code="SPRING-2024-zzz")
    assert other["event"]["id"] == "evpub_2"
    assert other["event"]["entity_id"] != first["event"]["entity_id"]
    assert other["data"]["voucher"]["id"] != first["data"]["voucher"]["id"]


def test_sample_event_defaults_follow_the_official_example() -> None:
    before = datetime.now(UTC)
    body = sample_publication_event(
        event_id="evpub_1", delivery_id="whs_1", customer_id="cust_1", email=None, code="C-1"
    )
    after = datetime.now(UTC)
    assert body["data"]["customer"]["email"] is None
    assert body["data"]["publication"]["channel"] == "API"
    assert body["data"]["campaign"]["name"] == "Spring Discounts"
    published = datetime.fromisoformat(body["data"]["publication"]["created_at"])
    assert before - timedelta(milliseconds=1) <= published <= after


def test_sample_event_treats_a_naive_time_as_utc() -> None:
    naive = _sample(created_at=T0.replace(tzinfo=None))
    assert naive == _sample(created_at=T0)
    assert naive["data"]["publication"]["created_at"] == "2024-03-13T13:45:59.492Z"


def test_header_and_log_times_are_now_in_their_formats() -> None:
    before = datetime.now(UTC)
    header, line = utc_now_iso(), utc_now_log()
    after = datetime.now(UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", header), header
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line), line
    for text in (header, line.replace("Z", "+00:00")):
        when = datetime.fromisoformat(text)
        assert before - timedelta(milliseconds=1) <= when <= after
