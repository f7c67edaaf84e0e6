"""The ``metrics`` handler: the series ops dashboards read, after handling real event bodies."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from handlers.builtin.metrics import (
    PUBLICATION_EVENT_TYPES,
    PublicationMetricsHandler,
    PublicationMetricsSettings,
    create,
)
from handlers.registry import load_factory
from handlers.types import ENTRY_POINT_GROUP, Event, Handler, HandlerContext
from schemas.errors import ConfigError, SkipEvent
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED
from tests.fixtures.samples import sample_publication_event

CPS = CUSTOMER_PUBLICATION_SUCCEEDED
PS = PUBLICATION_SUCCEEDED
PUBLISHED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
HANDLED = PUBLISHED + timedelta(seconds=30)


def body(n: int = 1, **overrides: Any) -> dict[str, Any]:
    """A complete ``customer.publication.succeeded`` envelope (event n)."""
    args: dict[str, Any] = {
        "event_id": f"evt_{n}",
        "delivery_id": f"whs_{n}",
        "customer_id": f"cust_{n}",
        "email": None,
        "code": f"SPRING-2024-{n:03d}",
        "created_at": PUBLISHED,
    }
    args.update(overrides)
    return sample_publication_event(**args)


def multi_code_body(n: int, codes: list[str], amount_off_cents: int) -> dict[str, Any]:
    """A ``publication.succeeded`` of several AMOUNT codes, as the publish API with count > 1."""
    event = body(n)
    event["type"] = event["event"]["type"] = PS
    data = event["data"]
    template = data.pop("voucher")
    template["discount"] = {"type": "AMOUNT", "amount_off": amount_off_cents}
    vouchers = []
    for code in codes:
        voucher = copy.deepcopy(template)
        voucher["code"] = code
        vouchers.append(voucher)
    data["vouchers"] = vouchers
    data["publication"]["vouchers"] = codes
    del data["publication"]["voucher"]
    return event


def as_event(envelope: dict[str, Any]) -> Event:
    raw = json.dumps(envelope, separators=(",", ":")).encode()
    return Event(
        id=envelope["event"]["id"],
        type=envelope["event"]["type"],
        raw=raw,
        headers=(),
        key=b"cust",
        attempt=1,
        topic="voucherify." + envelope["event"]["type"],
        partition=0,
        offset=0,
    )


def make_handler(registry: CollectorRegistry, **settings: Any) -> PublicationMetricsHandler:
    return PublicationMetricsHandler(
        "metrics",
        PublicationMetricsSettings.model_validate(settings),
        registry,
        clock=lambda: HANDLED,
    )


def publications(
    registry: CollectorRegistry,
    *,
    channel: str = "API",
    campaign: str = "Spring Discounts",
    voucher_type: str = "DISCOUNT_VOUCHER",
    event_type: str = CPS,
    metric: str = "pubrelay_publications_total",
) -> float:
    labels = {
        "event_type": event_type,
        "channel": channel,
        "campaign": campaign,
        "voucher_type": voucher_type,
    }
    return registry.get_sample_value(metric, labels) or 0.0


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_customer_publication_counts_once_with_its_channel_campaign_and_type() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body()))

    assert publications(registry) == 1
    assert publications(registry, metric="pubrelay_publication_codes_total") == 1
    # The sample's discount: 10 % off.
    assert value(registry, "pubrelay_publication_discount_percent_count") == 1
    assert value(registry, "pubrelay_publication_discount_percent_sum") == 10
    assert value(registry, "pubrelay_publication_discount_amount_count") == 0


async def test_latency_runs_from_the_event_creation_to_the_end_of_handling() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body()))

    # event.created_at is 6 ms after the publication; handled 30 s after the publication.
    assert value(
        registry, "pubrelay_publication_latency_seconds_sum", event_type=CPS
    ) == pytest.approx(29.994)
    bucket = "pubrelay_publication_latency_seconds_bucket"
    assert value(registry, bucket, event_type=CPS, le="10.0") == 0
    assert value(registry, bucket, event_type=CPS, le="30.0") == 1


async def test_an_event_from_the_future_counts_as_zero_latency_not_negative() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body(created_at=HANDLED + timedelta(minutes=5))))

    assert value(registry, "pubrelay_publication_latency_seconds_sum", event_type=CPS) == 0
    assert value(registry, "pubrelay_publication_latency_seconds_count", event_type=CPS) == 1


async def test_a_publication_of_several_codes_is_one_publication_and_n_codes() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(multi_code_body(1, ["A-1", "A-2", "A-3"], 1550)))

    assert publications(registry, event_type=PS) == 1
    assert publications(registry, event_type=PS, metric="pubrelay_publication_codes_total") == 3
    # Each code is a 15.50 amount-off discount; cents become currency units.
    assert value(registry, "pubrelay_publication_discount_amount_count") == 3
    assert value(registry, "pubrelay_publication_discount_amount_sum") == pytest.approx(46.5)
    assert value(registry, "pubrelay_publication_discount_amount_bucket", le="15.0") == 0
    assert value(registry, "pubrelay_publication_discount_amount_bucket", le="20.0") == 3
    assert value(registry, "pubrelay_publication_discount_percent_count") == 0
    assert value(registry, "pubrelay_publication_latency_seconds_count", event_type=PS) == 1


async def test_both_event_types_are_counted_apart() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body(1)))
    await handler.handle(as_event(body(2)))
    await handler.handle(as_event(multi_code_body(3, ["B-1", "B-2"], 500)))

    assert handler.event_types == {CPS, PS}
    assert publications(registry, event_type=CPS) == 2
    assert publications(registry, event_type=PS) == 1
    assert publications(registry, event_type=PS, metric="pubrelay_publication_codes_total") == 2


async def test_allowlists_keep_their_values_and_fold_the_rest_into_other() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry, channels=["API"], campaigns=["Spring Discounts"])

    await handler.handle(as_event(body(1)))
    await handler.handle(as_event(body(2, channel="Automation")))
    await handler.handle(as_event(body(3, campaign="Winter Sale")))
    await handler.handle(as_event(body(4, channel="partner-x", campaign="Summer")))

    assert publications(registry) == 1
    assert publications(registry, channel="other") == 1
    assert publications(registry, campaign="other") == 1
    assert publications(registry, channel="other", campaign="other") == 1
    capped = "pubrelay_publication_labels_capped_total"
    assert value(registry, capped, label="channel") == 2
    assert value(registry, capped, label="campaign") == 2
    assert value(registry, capped, label="voucher_type") == 0


async def test_a_campaign_allowlisted_by_id_is_shown_by_name() -> None:
    registry = CollectorRegistry()
    spring = body(1)
    handler = make_handler(registry, campaigns=[spring["data"]["campaign"]["id"]])

    await handler.handle(as_event(spring))
    await handler.handle(as_event(body(2, campaign="Winter Sale")))

    assert publications(registry, campaign="Spring Discounts") == 1
    assert publications(registry, campaign="other") == 1


async def test_without_allowlists_the_first_top_n_values_are_kept() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry, top_n=2)

    for n, channel in enumerate(["API", "Dashboard", "Automation", "API", "Dashboard", "x"]):
        await handler.handle(as_event(body(n, channel=channel)))

    assert publications(registry) == 2
    assert publications(registry, channel="Dashboard") == 2
    assert publications(registry, channel="other") == 2
    assert publications(registry, channel="Automation") == 0
    assert value(registry, "pubrelay_publication_labels_capped_total", label="channel") == 2


async def test_top_n_zero_folds_every_value_into_other() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry, top_n=0)

    await handler.handle(as_event(body(1)))

    assert publications(registry, channel="other", campaign="other") == 1


async def test_a_very_long_free_text_channel_is_never_a_label() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body(1, channel="x" * 500)))

    assert publications(registry, channel="other") == 1


async def test_a_customer_address_written_as_the_channel_is_never_a_label() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)

    await handler.handle(as_event(body(1, channel="Jane.Doe@example.com")))

    assert publications(registry, channel="other") == 1
    exposed = generate_latest(registry).decode()
    assert "example.com" not in exposed
    assert "Jane" not in exposed


async def test_missing_values_are_unknown_and_unknown_voucher_types_other() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)
    bare = body(1)
    data = bare["data"]
    del data["campaign"]
    del data["publication"]["channel"]
    for voucher in (data["voucher"], data["publication"]["voucher"]):
        del voucher["type"]
        del voucher["campaign"]
        del voucher["campaign_id"]
    odd = body(2)
    odd["data"]["voucher"]["type"] = "MYSTERY_CARD"

    await handler.handle(as_event(bare))
    await handler.handle(as_event(odd))

    assert (
        publications(registry, channel="unknown", campaign="unknown", voucher_type="unknown") == 1
    )
    assert publications(registry, voucher_type="other") == 1
    assert value(registry, "pubrelay_publication_labels_capped_total", label="voucher_type") == 1


async def test_the_campaign_name_on_the_voucher_is_used_when_the_event_has_no_campaign() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)
    event = body(1, campaign="Loyalty Welcome")
    del event["data"]["campaign"]

    await handler.handle(as_event(event))

    assert publications(registry, campaign="Loyalty Welcome") == 1


async def test_an_event_without_publication_data_is_skipped_and_not_counted() -> None:
    registry = CollectorRegistry()
    handler = make_handler(registry)
    other = body(1)
    other["event"]["type"] = "voucher.published"

    with pytest.raises(SkipEvent):
        await handler.handle(as_event(other))

    assert registry.get_sample_value("pubrelay_publications_total", {}) is None
    assert value(registry, "pubrelay_publication_discount_percent_count") == 0


def context(registry: CollectorRegistry, env: dict[str, str], tmp_path: Path) -> HandlerContext:
    return HandlerContext(
        name="metrics",
        data_dir=tmp_path,
        metrics_registry=registry,
        logger=structlog.get_logger("test"),
        topic_prefix="voucherify.",
        env=env,
    )


async def test_the_factory_reads_pubrelay_metrics_settings(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    env = {
        "PUBRELAY_METRICS__CHANNELS": '["Automation"]',
        "PUBRELAY_METRICS__TOP_N": "3",
        "PUBRELAY_METRICS__EVENT_TYPES": f'["{CPS}"]',
    }
    handler = create(context(registry, env, tmp_path))

    assert isinstance(handler, Handler)
    assert handler.name == "metrics"
    assert handler.event_types == {CPS}
    await handler.start()
    await handler.handle(as_event(body(1, channel="Automation")))
    await handler.handle(as_event(body(2)))
    await handler.stop()
    await handler.stop()

    total = sum(
        s.value
        for m in registry.collect()
        if m.name == "pubrelay_publications"
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert total == 2
    assert (
        registry.get_sample_value(
            "pubrelay_publications_total",
            {
                "event_type": CPS,
                "channel": "Automation",
                "campaign": "Spring Discounts",
                "voucher_type": "DISCOUNT_VOUCHER",
            },
        )
        == 1
    )


def test_the_entry_point_line_for_pyproject_loads_this_factory() -> None:
    # pyproject.toml: metrics = "handlers.builtin.metrics:create" in group pubrelay.handlers.
    entry = EntryPoint(
        name="metrics", value="handlers.builtin.metrics:create", group=ENTRY_POINT_GROUP
    )

    assert load_factory("metrics", {"metrics": entry}) is create


def test_the_factory_defaults_to_both_publication_events(tmp_path: Path) -> None:
    handler = create(context(CollectorRegistry(), {}, tmp_path))

    assert handler.event_types == {CPS, PS}
    assert set(PUBLICATION_EVENT_TYPES) == {CPS, PS}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PUBRELAY_METRICS__TOP_N": "-1"}, "PUBRELAY_METRICS__TOP_N"),
        ({"PUBRELAY_METRICS__EVENT_TYPES": '["voucher.published"]'}, "EVENT_TYPES"),
        ({"PUBRELAY_METRICS__CHANNELS": '"API"'}, "PUBRELAY_METRICS__CHANNELS"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_variable(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        create(context(CollectorRegistry(), env, tmp_path))
