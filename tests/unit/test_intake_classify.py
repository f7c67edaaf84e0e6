"""Routing decisions for verified bodies (no I/O)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

from consumer.routing import Quarantined, Routed, classify, json_depth_exceeds
from tests.fixtures.app import event_body


def test_envelope_routes_on_event_type_with_customer_key() -> None:
    decision = classify(
        event_body(event_id="ev_1", delivery_id="whs_1", customer_id="c_9"), max_depth=64
    )
    assert decision == Routed(
        delivery_id="whs_1",
        event_id="ev_1",
        event_type="customer.publication.succeeded",
        key="c_9",
        created_at="2024-03-13T13:45:59.515Z",
        publication_id="pub_DpHmhx5uTanbM0mnndFrODi1U3MEX6rF",  # the official example's
    )


def test_distribution_routes_on_event_type_not_the_user_label() -> None:
    envelope = json.loads(event_body(event_id="ev_2"))
    envelope["type"] = "My coupon distribution"
    envelope["source"] = {"id": "distr_1", "object": "distribution", "target_url": "x"}
    decision = classify(json.dumps(envelope).encode(), max_depth=64)
    assert isinstance(decision, Routed)
    assert decision.event_type == "customer.publication.succeeded"


def test_key_falls_back_to_entity_id_then_event_id() -> None:
    body = b'{"id":"whs","event":{"id":"ev","type":"voucher.published","entity_id":"v_1"}}'
    decision = classify(body, max_depth=64)
    assert isinstance(decision, Routed)
    assert decision.key == "v_1"
    body = b'{"id":"whs","data":{"customer":null},"event":{"id":"ev","type":"x.y"}}'
    decision = classify(body, max_depth=64)
    assert isinstance(decision, Routed)
    assert decision.key == "ev"


def test_publication_event_keys_on_the_publication_customer() -> None:
    body = (
        b'{"id":"whs","data":{"publication":{"customer_id":"cust_7","vouchers":["A","B"]}},'
        b'"event":{"id":"ev","type":"publication.succeeded"}}'
    )
    decision = classify(body, max_depth=64)
    assert isinstance(decision, Routed)
    assert decision.key == "cust_7"


def test_unknown_fields_and_missing_optional_data_are_tolerated() -> None:
    body = b'{"id":"whs","new_field":{"x":[1,2]},"event":{"id":"ev","type":"a.b","extra":1}}'
    assert isinstance(classify(body, max_depth=64), Routed)


def test_missing_event_is_quarantined_as_raw_payload() -> None:
    decision = classify(b'{"id":"whs","type":"customer.publication.succeeded"}', max_depth=64)
    assert isinstance(decision, Quarantined)
    assert decision.reason == "no_envelope"
    assert "raw" in decision.detail


def test_depth_check_ignores_brackets_inside_strings() -> None:
    assert not json_depth_exceeds(b'{"a":"' + b"[" * 500 + b'"}', 10)
    assert json_depth_exceeds(b"[" * 11 + b"]" * 11, 10)
    assert not json_depth_exceeds(b"[" * 10 + b"]" * 10, 10)
    many_shallow = b"[" + b",".join([b"{}"] * 200) + b"]"
    assert not json_depth_exceeds(many_shallow, 10)


def test_stale_only_when_a_maximum_age_is_set() -> None:
    body = event_body()
    now = datetime(2024, 3, 13, 14, 45, 59, tzinfo=UTC)  # one hour after the event
    assert isinstance(classify(body, max_depth=64, now=now), Routed)
    assert isinstance(classify(body, max_depth=64, max_event_age_s=7200, now=now), Routed)
    stale = classify(body, max_depth=64, max_event_age_s=60, now=now)
    assert isinstance(stale, Quarantined)
    assert stale.reason == "stale"


def test_event_types_naming_internal_topics_are_quarantined() -> None:
    for event_type in ("quarantine", "dlq.email", "retry.crm"):
        body = b'{"id":"w","event":{"id":"e","type":"%s"}}' % event_type.encode()
        decision = classify(body, max_depth=64)
        assert isinstance(decision, Quarantined), event_type
        assert decision.reason == "invalid_event_type"


def test_with_a_maximum_age_an_event_without_a_readable_time_is_stale() -> None:
    for created in ("", '"created_at":"yesterday",'):
        body = b'{"id":"w","event":{%s"id":"e","type":"a.b"}}' % created.encode()
        decision = classify(body, max_depth=64, max_event_age_s=60)
        assert isinstance(decision, Quarantined)
        assert decision.reason == "stale"
        assert isinstance(classify(body, max_depth=64), Routed)  # no maximum: no check


def _read_like_json(body: bytes, max_depth: int) -> tuple[bool, bool]:
    """A JSON reader's view, one byte at a time: whether brackets outside strings nest
    deeper than ``max_depth``, and whether a backslash appears outside a string."""
    depth, in_string, escaped, too_deep = 0, False, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte == ord("\\"):
            return too_deep, True
        elif byte in b"[{":
            depth += 1
            too_deep = too_deep or depth > max_depth
        elif byte in b"]}":
            depth -= 1
    return too_deep, False


def test_depth_check_agrees_with_a_byte_by_byte_reader() -> None:
    rnd = random.Random(13)
    checked = 0
    for _ in range(20_000):
        body = bytes(rnd.choice(b'[]{}"\\ax') for _ in range(rnd.randint(0, 40)))
        if _read_like_json(body, 0)[1]:
            continue  # not JSON: a backslash only appears inside a string
        checked += 1
        for max_depth in (0, 1, 2, 3, 6):
            expected = _read_like_json(body, max_depth)[0]
            assert json_depth_exceeds(body, max_depth) is expected, (body, max_depth)
    assert checked > 5_000


def test_depth_check_on_nesting_at_and_past_the_limit() -> None:
    nested = b'{"a":' * 32 + b"1" + b"}" * 32
    assert not json_depth_exceeds(nested, 32)
    assert json_depth_exceeds(b"[" + nested + b"]", 32)
    assert json_depth_exceeds(b"[" * 40, 32)  # unclosed: not JSON, and too deep
    assert not json_depth_exceeds(b"]" * 40 + b"[" * 30, 32)
    escaped = b'{"a":"\\\\","b":"\\"[[[[","c":[[[]]]}'
    assert not json_depth_exceeds(escaped, 4)
    assert json_depth_exceeds(escaped, 3)
