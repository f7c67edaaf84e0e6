"""`pubrelay config` shows values with every secret masked: SecretStr fields, URL
credentials, credential-like keys of maps (README "Configuration")."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from pydantic.fields import FieldInfo

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
            '{"Authorization": "****", "X-Api-Key": "****", "X-Trace": "1"}',
        ),
        ("PUBRELAY_HTTP__PORT", 8080, "8080"),
    ],
)
def test_pubrelay_config_masks_every_secret_it_shows(name: str, value: object, shown: str) -> None:
    field = FieldInfo(annotation=type(value))
    assert shown_value(name, value, field) == shown
