"""The reconciliation formats: list items read, records built, publication ids read back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from handlers.builtin.voucherify_api import ListedPublication
from handlers.reconcile.reconciler import Summary
from handlers.reconcile.record import build_record, event_id_for, publication_of
from schemas.errors import ApiError
from schemas.events import CustomerPublicationSucceededData, parse_event
from schemas.record import header
from tests.fixtures.fake_voucherify import failed_item, list_item_from_event
from tests.fixtures.samples import sample_publication_body, sample_publication_event

CREATED = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)


def sample(**kwargs: object) -> dict[str, object]:
    event = sample_publication_event(
        event_id="evcus_1",
        delivery_id="whs_1",
        customer_id="cust_1",
        email="jane.doe@example.com",
        code="SPRING-001",
        channel="Automation",
        created_at=CREATED,
    )
    return list_item_from_event(event, **kwargs)  # type: ignore[arg-type]


def test_a_single_code_item_becomes_the_event_the_intake_would_have_published() -> None:
    item = sample()
    record = build_record(ListedPublication.from_item(item), topic_prefix="voucherify.")

    parsed = parse_event(record.value)
    assert isinstance(parsed.data, CustomerPublicationSucceededData)
    assert record.topic == "voucherify.customer.publication.succeeded"
    assert record.key == b"cust_1"
    assert record.event_id == f"evrec_{item['id']}"
    assert parsed.event_id == record.event_id
    assert parsed.event_type == "customer.publication.succeeded"
    assert parsed.event.entity_id == item["id"]
    assert parsed.data.voucher.code == "SPRING-001"
    assert parsed.data.customer_email == "jane.doe@example.com"
    assert parsed.data.channel == "Automation"
    assert parsed.data.campaign is not None
    assert parsed.data.campaign.name == "Spring Discounts"
    assert parsed.data.publication is not None
    assert parsed.data.publication.id == item["id"]
    assert parsed.data.publication.metadata == {}
    assert header(record.headers, "origin") == b"reconciliation"
    assert header(record.headers, "event-id") == record.event_id.encode()
    assert header(record.headers, "x-voucherify-signature") is None
    assert header(record.headers, "publication-id") == str(item["id"]).encode()
    body_created_at = json.loads(record.value)["event"]["created_at"]
    assert header(record.headers, "event-created-at") == body_created_at.encode()


def test_a_multi_code_item_names_its_first_code_and_lists_them_all() -> None:
    pub = ListedPublication.from_item(sample(codes=["A-1", "A-2"]))
    parsed = parse_event(build_record(pub, topic_prefix="p.").value)
    assert parsed.data.voucher.code == "A-1"
    assert parsed.data.publication.vouchers == ["A-1", "A-2"]


def test_the_event_id_is_the_same_for_every_run() -> None:
    pub = ListedPublication.from_item(sample())
    first = build_record(pub, topic_prefix="voucherify.")
    second = build_record(pub, topic_prefix="voucherify.")
    assert first.event_id == second.event_id == event_id_for(pub.id)


def test_a_failed_item_is_read_but_not_a_success() -> None:
    pub = ListedPublication.from_item(failed_item("pub_x", "cust_2", "2026-11-20T09:00:00Z"))
    assert not pub.succeeded
    assert pub.codes == ()
    assert pub.created_at == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "item",
    [
        None,
        [],
        {"id": "pub_1"},
        {"created_at": "2026-11-20T09:00:00Z"},
        {"id": "p", "created_at": "x"},
    ],
)
def test_an_item_without_id_or_creation_time_is_an_api_error(item: object) -> None:
    with pytest.raises(ApiError):
        ListedPublication.from_item(item)


def test_publication_ids_are_read_from_webhook_bodies() -> None:
    body = sample_publication_body(
        event_id="evcus_1",
        delivery_id="whs_1",
        customer_id="c",
        email=None,
        code="X",
        created_at=CREATED,
    )
    assert publication_of(body) == (
        json.loads(body)["data"]["publication"]["id"],
        CREATED.timestamp(),
    )
    assert publication_of(b'{"data": {"customer": {}}}') is None
    assert publication_of(b"not json") is None


def test_the_summary_line_says_what_the_run_did() -> None:
    summary = Summary(since=CREATED - timedelta(days=3), dry_run=False, pages=2, seen=150)
    summary.injected = 1
    summary.failures = 2
    line = summary.line()
    assert "2 page(s) read, 150 publication(s) seen, 0 missing, injected 1, 2 failure(s)" in line
    summary.stopped = "the window is deeper than the API lists"
    assert summary.line().endswith("incomplete: the window is deeper than the API lists")
