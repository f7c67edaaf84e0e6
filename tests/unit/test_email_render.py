"""What the ``email`` handler would send, rendered without sending (the preview path)."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from handlers.builtin.email.handler import create
from handlers.builtin.email.preview import format_preview, load_settings, render_preview
from handlers.builtin.email.rendering import RECHECK_S, TemplateRenderer, slug, template_bases
from handlers.builtin.email.settings import EmailSettings
from handlers.types import HandlerContext
from schemas.errors import ConfigError, HandlerError, SkipEvent
from schemas.events import PUBLICATION_SUCCEEDED
from tests.fixtures.samples import sample_publication_event

PUBLISHED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW = datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC)
SENDER = "Spring Shop <coupons@shop.example>"


def body(n: int = 1, **overrides: Any) -> dict[str, Any]:
    """A ``customer.publication.succeeded`` envelope for ``customer<n>@example.com``."""
    args: dict[str, Any] = {
        "event_id": f"evcus_{n}",
        "delivery_id": f"whs_{n}",
        "customer_id": f"cust_{n}",
        "email": f"customer{n}@example.com",
        "code": f"SPRING-{n:03d}",
        "created_at": PUBLISHED,
    }
    args.update(overrides)
    return sample_publication_event(**args)


def bare_codes_publication(codes: list[str]) -> dict[str, Any]:
    """A ``publication.succeeded`` that lists only the codes (``publication.vouchers``)."""
    event = body(9)
    event["type"] = event["event"]["type"] = PUBLICATION_SUCCEEDED
    data = event["data"]
    del data["voucher"]
    del data["publication"]["voucher"]
    data["publication"]["vouchers"] = codes
    data["campaign"]["voucher"]["discount"] = {"type": "AMOUNT", "amount_off": 2500}
    return event


def raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def settings(**values: Any) -> EmailSettings:
    values.setdefault("sender", SENDER)
    return EmailSettings.model_validate(values)


def preview(event: dict[str, Any], **values: Any) -> EmailMessage:
    return render_preview(raw(event), settings(**values), now=NOW)


def parts(message: EmailMessage) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in message.walk():
        if not part.is_multipart():
            found[part.get_content_type()] = str(part.get_content())
    return found


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# --- discount, expiry, codes ---------------------------------------------------------------


def test_the_default_message_names_the_code_the_discount_and_the_expiry() -> None:
    event = body(1)
    event["data"]["voucher"]["expiration_date"] = "2024-12-31T23:59:59.000Z"
    message = preview(event, date_format="%d %B %Y")

    assert message["Subject"] == "Your coupon code SPRING-001 for Spring Discounts"
    text, html = parts(message)["text/plain"], parts(message)["text/html"]
    for part in (text, html):
        assert "SPRING-001" in part
        assert "10% off" in part
        assert "valid until 31 December 2024" in part
    assert text.startswith("Hello Jack Webhook,\n")


def test_amounts_are_rendered_from_cents_with_the_currency_symbol() -> None:
    event = body(2)
    event["data"]["voucher"]["discount"] = {"type": "AMOUNT", "amount_off": 1000}
    assert "$10.00 off" in parts(preview(event, currency_symbol="$"))["text/plain"]
    assert "10.00 off" in parts(preview(event))["text/plain"]


def test_a_publication_of_bare_codes_lists_them_with_the_campaign_discount() -> None:
    message = preview(bare_codes_publication(["A-1", "A-2", "A-3"]), currency_symbol="EUR ")

    assert message["Subject"] == "Your 3 coupon codes for Spring Discounts"
    text = parts(message)["text/plain"]
    for code in ("A-1", "A-2", "A-3"):
        assert f"  {code}  (EUR 25.00 off)\n" in text


# --- headers -------------------------------------------------------------------------------


def test_message_id_comes_from_the_publication_and_the_sender_domain_and_is_stable() -> None:
    event = body(3)
    first = preview(event)
    second = preview(event)
    publication_id = event["data"]["publication"]["id"]
    assert first["Message-ID"] == f"<pubrelay.{publication_id}@shop.example>"
    assert second["Message-ID"] == first["Message-ID"]


def test_message_id_falls_back_to_the_event_id_without_a_publication_id() -> None:
    event = body(4)
    del event["data"]["publication"]["id"]
    assert preview(event)["Message-ID"] == "<pubrelay.event.evcus_4@shop.example>"


def test_list_unsubscribe_is_rendered_per_customer_and_wrapped() -> None:
    message = preview(
        body(5),
        list_unsubscribe="mailto:unsubscribe@shop.example?subject={{ customer.id }}, "
        "https://shop.example/u/{{ customer.id|urlencode }}",
        list_unsubscribe_one_click=True,
    )
    assert message["List-Unsubscribe"] == (
        "<mailto:unsubscribe@shop.example?subject=cust_5>, <https://shop.example/u/cust_5>"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "https://shop.example/u/cust_5" in parts(message)["text/html"]


HOSTILE_ID = 'a>b, <https://evil.example/x>\r\nBcc: "x" é'
HOSTILE_ENCODED = "a%3Eb%2C%20%3Chttps%3A%2F%2Fevil.example%2Fx%3E%0D%0ABcc%3A%20%22x%22%20%C3%A9"


def readme_list_unsubscribe() -> str:
    """The ``PUBRELAY_EMAIL__LIST_UNSUBSCRIBE`` example of the README's ``email`` section."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    found = re.search(r"^PUBRELAY_EMAIL__LIST_UNSUBSCRIBE='([^']+)'$", readme, re.MULTILINE)
    assert found, "the README's email example sets PUBRELAY_EMAIL__LIST_UNSUBSCRIBE"
    return found.group(1)


def with_customer_id(customer_id: str) -> dict[str, Any]:
    event = body(5)
    event["data"]["customer"]["id"] = customer_id
    return event


def test_the_readme_list_unsubscribe_example_renders_the_customers_url() -> None:
    message = preview(body(5), list_unsubscribe=readme_list_unsubscribe())
    assert message["List-Unsubscribe"] == "<https://shop.example/unsub?c=cust_5>"


def test_a_customer_id_holding_separators_stays_inside_one_percent_encoded_uri() -> None:
    message = preview(with_customer_id(HOSTILE_ID), list_unsubscribe=readme_list_unsubscribe())

    header = message["List-Unsubscribe"]
    assert header == f"<https://shop.example/unsub?c={HOSTILE_ENCODED}>"
    assert header.count("<") == header.count(">") == 1
    for separator in (",", " ", "\r", "\n", '"'):
        assert separator not in header
    assert f'href="https://shop.example/unsub?c={HOSTILE_ENCODED}"' in parts(message)["text/html"]


def test_mailto_and_https_uris_each_encode_the_value_once_with_or_without_urlencode() -> None:
    bare = (
        "mailto:unsub@shop.example?subject=unsubscribe%20{{ customer.id }}, "
        "https://shop.example/u/{{ customer.id }}"
    )
    filtered = bare.replace("customer.id }}", "customer.id|urlencode }}")
    for template in (bare, filtered, f"<{bare.replace(', ', '>, <')}>"):
        message = preview(
            with_customer_id(HOSTILE_ID), list_unsubscribe=template, list_unsubscribe_one_click=True
        )
        assert message["List-Unsubscribe"] == (
            f"<mailto:unsub@shop.example?subject=unsubscribe%20{HOSTILE_ENCODED}>, "
            f"<https://shop.example/u/{HOSTILE_ENCODED}>"
        ), template
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_urlencode_of_a_mapping_in_list_unsubscribe_builds_the_query_once() -> None:
    message = preview(
        with_customer_id("a&b=c"),
        list_unsubscribe="https://shop.example/u?{{ {'c': customer.id, 'n': customer.name}"
        "|urlencode }}",
    )
    assert message["List-Unsubscribe"] == "<https://shop.example/u?c=a%26b%3Dc&n=Jack+Webhook>"


def test_without_list_unsubscribe_there_is_no_such_header() -> None:
    message = preview(body(6), reply_to="help@shop.example")
    assert message["List-Unsubscribe"] is None
    assert message["Reply-To"] == "help@shop.example"
    assert message["To"] == "Jack Webhook <customer6@example.com>"
    assert message["Date"] == "Wed, 01 May 2024 12:00:01 +0000"


def test_a_multi_line_subject_template_becomes_one_header_line(tmp_path: Path) -> None:
    write(
        tmp_path, {"default.subject.txt": "Hello\n{{ customer.name }}\r\n  code {{ codes[0] }}\n"}
    )
    message = preview(body(7), template_dir=tmp_path)
    assert message["Subject"] == "Hello Jack Webhook code SPRING-007"


# --- escaping and template bugs ------------------------------------------------------------


def test_html_is_autoescaped_and_text_is_not() -> None:
    event = body(8)
    event["data"]["customer"]["name"] = "<b>Tom & Jerry</b>"
    found = parts(preview(event))
    assert "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;" in found["text/html"]
    assert "<b>Tom & Jerry</b>" in found["text/plain"]


def test_an_undefined_name_is_a_handler_error_naming_the_template(tmp_path: Path) -> None:
    write(tmp_path, {"campaign/spring-discounts.html": "<p>{{ voucher.cod }} {{ nope }}</p>"})
    with pytest.raises(HandlerError, match=r"campaign/spring-discounts\.html") as caught:
        preview(body(1), template_dir=tmp_path)
    assert "UndefinedError" in str(caught.value)


def test_a_template_syntax_error_stops_start_up_with_the_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, {"channel/api.txt": "fine\n{% if %}\n"})
    with pytest.raises(ConfigError, match=r"channel/api\.txt line 2"):
        preview(body(1), template_dir=tmp_path)


def test_a_missing_template_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TEMPLATE_DIR"):
        preview(body(1), template_dir=tmp_path / "absent")


def test_a_broken_list_unsubscribe_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LIST_UNSUBSCRIBE"):
        preview(body(1), list_unsubscribe="https://x/{{ customer.id")


# --- template lookup -----------------------------------------------------------------------


def test_lookup_order_is_campaign_id_campaign_name_channel_default_builtin(
    tmp_path: Path,
) -> None:
    event = body(1, channel="Automation")
    campaign_id = event["data"]["campaign"]["id"]
    files = {
        f"campaign/{campaign_id}.subject.txt": "by id",
        "campaign/spring-discounts.subject.txt": "by name",
        "campaign/spring-discounts.txt": "text by name {{ voucher.code }}\n",
        "channel/automation.subject.txt": "by channel",
        "channel/automation.html": "<p>html by channel</p>\n",
        "default.subject.txt": "by default",
    }
    write(tmp_path, files)
    found = preview(event, template_dir=tmp_path)
    assert found["Subject"] == "by id"
    assert parts(found)["text/plain"] == "text by name SPRING-001\n"
    assert parts(found)["text/html"] == "<p>html by channel</p>\n"

    (tmp_path / f"campaign/{campaign_id}.subject.txt").unlink()
    assert preview(event, template_dir=tmp_path)["Subject"] == "by name"
    (tmp_path / "campaign/spring-discounts.subject.txt").unlink()
    assert preview(event, template_dir=tmp_path)["Subject"] == "by channel"
    (tmp_path / "channel/automation.subject.txt").unlink()
    assert preview(event, template_dir=tmp_path)["Subject"] == "by default"
    (tmp_path / "default.subject.txt").unlink()
    builtin = preview(event, template_dir=tmp_path)
    assert builtin["Subject"] == "Your coupon code SPRING-001 for Spring Discounts"


def test_template_bases_are_slugged_and_safe() -> None:
    assert slug("Spring Discounts 2024!") == "spring-discounts-2024"
    assert slug("voucherify-web-ui") == "voucherify-web-ui"
    assert template_bases("camp_1", "Black Friday", "API") == [
        "campaign/camp_1",
        "campaign/black-friday",
        "channel/api",
        "default",
    ]
    assert template_bases("../../etc/passwd", None, None) == ["campaign/etc-passwd", "default"]


# --- who gets no e-mail --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "opted_out"),
    [
        (True, True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        (1, True),
        ("1", True),
        (False, False),
        ("false", False),
        ("no", False),
        (0, False),
        (None, False),
    ],
)
def test_the_opt_out_metadata_key_accepts_the_documented_truthy_values(
    value: Any, opted_out: bool
) -> None:
    event = body(1)
    event["data"]["customer"]["metadata"]["newsletter_stop"] = value
    values = {"opt_out_metadata_key": "newsletter_stop"}
    if opted_out:
        with pytest.raises(SkipEvent, match="opted_out"):
            preview(event, **values)
    else:
        assert preview(event, **values)["To"]


def test_a_customer_without_an_address_gets_no_email() -> None:
    with pytest.raises(SkipEvent, match="no_address"):
        preview(body(1, email=None))


def test_an_address_that_cannot_be_used_is_a_handler_error_with_it_masked() -> None:
    with pytest.raises(HandlerError, match=r"j\*\*\*@example\.com") as caught:
        preview(body(1, email="jack smith@example.com"))
    assert "jack smith" not in str(caught.value)


# --- settings ------------------------------------------------------------------------------


def context(env: dict[str, str], tmp_path: Path) -> HandlerContext:
    logger = structlog.wrap_logger(
        None, wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL)
    )
    return HandlerContext(
        name="email",
        data_dir=tmp_path,
        metrics_registry=CollectorRegistry(),
        logger=logger,
        topic_prefix="voucherify.",
        env=env,
    )


def test_the_sender_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PUBRELAY_EMAIL__SENDER is required"):
        create(context({}, tmp_path))
    with pytest.raises(ConfigError, match="PUBRELAY_EMAIL__SENDER"):
        create(context({"PUBRELAY_EMAIL__SENDER": "not an address"}, tmp_path))


@pytest.mark.parametrize(
    "url", ["http://relay:25", "smtp://", "smtp://user:pw@relay:25", "smtp://relay:99999"]
)
def test_an_unusable_smtp_url_is_a_config_error(url: str, tmp_path: Path) -> None:
    env = {"PUBRELAY_EMAIL__SENDER": SENDER, "PUBRELAY_EMAIL__SMTP_URL": url}
    with pytest.raises(ConfigError, match="PUBRELAY_EMAIL__SMTP_URL"):
        create(context(env, tmp_path))


def test_settings_load_from_the_environment_with_a_secret_password() -> None:
    loaded = load_settings(
        {
            "PUBRELAY_EMAIL__SENDER": SENDER,
            "PUBRELAY_EMAIL__SMTP_URL": "smtps://relay.example:465",
            "PUBRELAY_EMAIL__PASSWORD": "hunter2-secret",
            "PUBRELAY_EMAIL__MAX_PER_S": "2.5",
        }
    )
    assert loaded.max_per_s == 2.5
    assert "hunter2-secret" not in repr(loaded)
    with pytest.raises(ConfigError, match="PUBRELAY_EMAIL__STARTTLS"):
        load_settings({"PUBRELAY_EMAIL__STARTTLS": "sometimes"})


def test_format_preview_shows_headers_and_both_parts() -> None:
    text = format_preview(preview(body(1)))
    assert text.startswith("From: Spring Shop <coupons@shop.example>\n")
    assert "\n--- text/plain ---\n" in text
    assert "\n--- text/html ---\n" in text
    assert text.count("SPRING-001") >= 3


def test_the_preview_does_not_touch_the_event_it_was_given() -> None:
    event = body(1)
    before = copy.deepcopy(event)
    preview(event)
    assert event == before


def test_a_changed_or_added_template_is_used_once_the_recheck_interval_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "default.txt").write_text("v1 {{ code }}")
    renderer = TemplateRenderer(tmp_path)
    bases = template_bases(None, None, "api")
    clock = [1000.0]
    monkeypatch.setattr(renderer, "_clock", lambda: clock[0])
    assert renderer.render("text", bases, {"code": "A"}).text == "v1 A"
    (tmp_path / "default.txt").write_text("v2 {{ code }}")
    os.utime(tmp_path / "default.txt", (2_000_000_000, 2_000_000_000))
    clock[0] += RECHECK_S
    assert renderer.render("text", bases, {"code": "A"}).text == "v2 A"
    (tmp_path / "channel").mkdir()
    (tmp_path / "channel" / "api.txt").write_text("api {{ code }}")
    clock[0] += RECHECK_S
    rendered = renderer.render("text", bases, {"code": "A"})
    assert (rendered.name, rendered.text) == ("channel/api.txt", "api A")


@pytest.mark.parametrize(
    "name",
    [
        "Jack Webhook with a rather long display name to force folding, attacker@evil.example,",
        'Jack "x" <attacker@evil.example>; Jill',
        "Doe, Jane",
        "=?utf-8?q?Doe=2C_x=40evil=2Eexample=2C?=",  # decoded before the folding
        "Jane =?utf-8?b?LCBhdHRhY2tlckBldmlsLmV4YW1wbGUs?= Doe",
    ],
)
def test_a_customer_name_never_adds_a_recipient_to_the_to_header(name: str) -> None:
    event = body(9)
    event["data"]["customer"]["name"] = name
    message = preview(event)

    [recipient] = message["To"].addresses  # however the header was folded
    assert recipient.addr_spec == event["data"]["customer"]["email"]
    assert not set(recipient.display_name) & set(',;:<>@"')
