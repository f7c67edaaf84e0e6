"""`pubrelay config` and the configuration errors show values with every secret masked:
SecretStr fields, URL credentials and query strings, every value of a map (README
"Configuration")."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from handlers.config_errors import shown
from pubrelay.config_command import shown_value


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("PUBRELAY_CRM__TOKEN", SecretStr("pat-eu1-x"), "****"),
        ("PUBRELAY_WEBHOOK__SECRETS", [SecretStr("a"), SecretStr("b")], '["****", "****"]'),
        ("PUBRELAY_VOUCHERIFY__APP_TOKEN", SecretStr(""), ""),
        (
            "PUBRELAY_LEDGER__URL",
            "rediss://:pw@redis.internal:6380/0",
            "rediss://:****@redis.internal:6380/0",
        ),
        (
            "PUBRELAY_BUS__URL",
            "kafka://user:pw@b1:9092,b2:9092",
            "kafka://user:****@b1:9092,b2:9092",
        ),
        ("PUBRELAY_FORWARD__URL", "https://tok@hooks.example/x", "https://****@hooks.example/x"),
        (
            "PUBRELAY_FORWARD__HEADERS",
            {"Authorization": "Bearer t", "X-Api-Key": "k", "X-Trace": "1"},
            '{"Authorization": "****", "X-Api-Key": "****", "X-Trace": "****"}',
        ),
        (
            "PUBRELAY_LEDGER__URL",  # a password with "/" and "@" unencoded
            "redis://:Zm9v/Y@mFy@redis.internal:6379/0",
            "redis://:****@redis.internal:6379/0",
        ),
        (
            "PUBRELAY_FORWARD__URL",
            "https://hooks.example/x?access_token=sk_live_1&v=2",
            "https://hooks.example/x?access_token=****&v=****",
        ),
        ("PUBRELAY_HTTP__PORT", 8080, "8080"),
        ("PUBRELAY_EMAIL__SENDER", "Shop: Deals <coupons@shop.example>", None),
    ],
)
def test_pubrelay_config_masks_every_secret_it_shows(name: str, value: object, shown: str) -> None:
    field = FieldInfo(annotation=type(value))
    assert shown_value(name, value, field) == (str(value) if shown is None else shown)


@pytest.mark.parametrize(
    ("name", "value", "seen"),
    [
        ("PUBRELAY_BUS__URL", "u:BUSPW@h:9092", "u:****@h:9092"),
        ("PUBRELAY_LEDGER__URL", "redis//:REDISPW@h:6379", "redis//:****@h:6379"),
        ("PUBRELAY_BUS__URL", "b1:9092,kuser:Kafka/PW@b2:9092", "b1:****@b2:9092"),
    ],
)
def test_a_url_with_a_mistyped_scheme_is_quoted_with_its_password_masked(
    name: str, value: str, seen: str
) -> None:
    line = shown(name, value, FieldInfo(annotation=str))
    assert "PW" not in line
    assert seen in line


@pytest.mark.parametrize(
    ("value", "seen"),
    [
        (
            '{"Authorization": "Bearer sk_live_1", "Host": "x"}',
            '{"Authorization": "****", "Host": "****"}',
        ),
        ('{"X-Hub-Access": "sk_live_1"', "<hidden: not a JSON map>"),
    ],
)
def test_a_rejected_map_shows_its_keys_only(value: str, seen: str) -> None:
    """A configuration error quotes the value it refuses: a header map's values may be
    credentials under any name, and a map that does not parse may be one whole."""
    line = shown("PUBRELAY_FORWARD__HEADERS", value, FieldInfo(annotation=dict[str, str]))
    assert "sk_live_1" not in line
    assert seen in line
