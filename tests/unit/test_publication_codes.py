"""Every code of a publication, from whichever event carries it; the CRM's `codes` property."""

from __future__ import annotations

import json
from typing import Any

from handlers.builtin.crm.properties import PropertyMap
from handlers.builtin.publication_codes import publication_codes
from handlers.types import Event
from schemas.events import parse_event
from schemas.voucher import Voucher
from tests.fixtures.samples import sample_multi_code_events

CODES = ["PACK-1", "PACK-2", "PACK-3"]


def events() -> tuple[dict[str, Any], dict[str, Any]]:
    return sample_multi_code_events(
        publication_event_id="evpub_1",
        customer_event_id="evcus_1",
        customer_id="cust_1",
        email="jane@example.com",
        codes=CODES,
    )


def reconciled(customer_event: dict[str, Any]) -> dict[str, Any]:
    publication = customer_event["data"]["publication"]
    publication.pop("voucher")
    publication["vouchers"] = list(CODES)
    return customer_event


def data_of(event: dict[str, Any]) -> Any:
    return parse_event(json.dumps(event)).data


def as_event(body: dict[str, Any]) -> Event:
    return Event(
        id=body["event"]["id"],
        type=body["event"]["type"],
        raw=json.dumps(body).encode(),
        headers=(),
        key=b"cust_1",
        attempt=1,
        topic="t",
        partition=0,
        offset=0,
    )


def test_publication_succeeded_lists_every_code() -> None:
    publication, _ = events()
    codes = publication_codes(data_of(publication))
    assert codes.codes == CODES
    assert codes.complete


def test_the_customer_event_of_a_multi_code_publication_lacks_the_other_vouchers() -> None:
    _, customer = events()
    ids = customer["data"]["publication"]["vouchers_id"]
    codes = publication_codes(data_of(customer))
    assert codes.codes == CODES[:1]
    assert codes.missing_ids == tuple(ids[1:])
    assert not codes.complete


def test_vouchers_found_elsewhere_complete_the_set_each_code_once() -> None:
    publication, customer = events()
    codes = publication_codes(data_of(customer))
    found = [Voucher.model_validate(v) for v in publication["data"]["vouchers"]]
    completed = codes.completed_with(found)
    assert completed.codes == CODES
    assert completed.complete


def test_reconciliation_s_event_listing_every_code_is_complete() -> None:
    _, customer = events()
    codes = publication_codes(data_of(reconciled(customer)))
    assert codes.codes == CODES
    assert codes.complete


def test_the_crm_writes_codes_only_from_an_event_listing_them_all() -> None:
    properties = PropertyMap({"voucherify_last_coupon_codes": "codes"})
    publication, customer = events()
    assert properties.values(as_event(publication)) == {
        "voucherify_last_coupon_codes": "PACK-1, PACK-2, PACK-3"
    }
    assert properties.values(as_event(customer)) == {}
    assert properties.values(as_event(reconciled(customer))) == {
        "voucherify_last_coupon_codes": "PACK-1, PACK-2, PACK-3"
    }
