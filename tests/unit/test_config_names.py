"""A mistyped variable stops start-up naming it, and every configuration error is one line:
the variable as set, the problem in plain words, a good value (README "Configuration")."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from handlers.builtin.noop import NoopSettings
from handlers.registry import load_factory
from handlers.types import HandlerContext
from pubrelay.settings import load_settings
from schemas.errors import ConfigError, PluginError


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the variables a test sets, and no ``.env`` but the one it writes."""
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.upper().startswith("PUBRELAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def refused(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


def section_context(name: str, env: dict[str, str]) -> HandlerContext:
    return HandlerContext(
        name=name,
        data_dir=Path("/nonexistent"),
        metrics_registry=CollectorRegistry(),
        logger=structlog.get_logger("test"),
        topic_prefix="voucherify.",
        env=env,
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("PUBRELAY_HANDLER__ENABLED", "PUBRELAY_HANDLERS__ENABLED"),
        ("PUBRELAY_HTTP__PROT", "PUBRELAY_HTTP__PORT"),
        ("PUBRELAY_WORKER__CONCURENCY", "PUBRELAY_WORKER__CONCURRENCY"),
        ("PUBRELAY_DATADIR", "PUBRELAY_DATA_DIR"),
        # A built-in handler's section is known whether or not the handler is enabled.
        ("PUBRELAY_EMAIL__SENDR", "PUBRELAY_EMAIL__SENDER"),
        ("PUBRELAY_CRM__TOKN", "PUBRELAY_CRM__TOKEN"),
        # The http handler reads PUBRELAY_FORWARD__*: its name points there.
        ("PUBRELAY_HTTP__URL", "PUBRELAY_FORWARD__URL"),
    ],
)
def test_a_mistyped_variable_stops_start_up_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, typo: str, meant: str
) -> None:
    message = refused(monkeypatch, **{typo: '["noop"]'})
    assert message == f"{typo}: no such setting; did you mean {meant}?"


def test_a_mistyped_variable_in_the_dotenv_file_stops_start_up_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text('PUBRELAY_HANDLER__ENABLED=["noop"]\n')
    assert "did you mean PUBRELAY_HANDLERS__ENABLED?" in refused(monkeypatch)


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, PUBRELAY_HTTP__PROT="1", PUBRELAY_WORKER__CONCURRENCY="x")
    assert message.splitlines() == [
        "PUBRELAY_HTTP__PROT: no such setting; did you mean PUBRELAY_HTTP__PORT?",
        "PUBRELAY_WORKER__CONCURRENCY=x: not a whole number; e.g. PUBRELAY_WORKER__CONCURRENCY=32",
    ]


def test_settings_of_handlers_that_are_not_enabled_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A .env shared by the webhook and the worker, or a handler switched off for a while.
    monkeypatch.setenv("PUBRELAY_CRM__TOKEN", "pat-1")
    monkeypatch.setenv("PUBRELAY_FORWARD__URL", "https://example.invalid/hook")
    # An installed plugin that is not built in: its section is its own (checked when enabled).
    monkeypatch.setenv("PUBRELAY_EXAMPLE__FILE_NAME", "seen.jsonl")
    assert load_settings().handlers.enabled == []


def test_a_handler_section_refuses_names_its_model_does_not_read() -> None:
    # NoopSettings does not forbid extra keys itself: the section check does, for every plugin.
    context = section_context("noop", {"PUBRELAY_NOOP__EVENT_TYPE": '["x"]'})
    with pytest.raises(ConfigError) as caught:
        context.settings(NoopSettings)
    assert str(caught.value) == (
        "PUBRELAY_NOOP__EVENT_TYPE: no such setting; did you mean PUBRELAY_NOOP__EVENT_TYPES? "
        "(handler 'noop')"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "PUBRELAY_WEBHOOK__SECRETS",
            "wrong",
            'PUBRELAY_WEBHOOK__SECRETS=<hidden>: not a JSON list, like \'["a", "b"]\'; '
            "e.g. PUBRELAY_WEBHOOK__SECRETS='[\"a-long-random-secret\"]'",
        ),
        (
            "PUBRELAY_WEBHOOK__ALLOWED_NETWORKS",
            '["10.0.0.0/8", "1.2.3.x"]',
            "PUBRELAY_WEBHOOK__ALLOWED_NETWORKS='[\"10.0.0.0/8\", \"1.2.3.x\"]': '1.2.3.x' is "
            "not an IP network (an address, or an address/prefix length); "
            'e.g. PUBRELAY_WEBHOOK__ALLOWED_NETWORKS=\'["203.0.113.0/24", "2001:db8::/32"]\'',
        ),
        (
            "PUBRELAY_BUS__PUBLISH_TIMEOUT_S",
            "soon",
            "PUBRELAY_BUS__PUBLISH_TIMEOUT_S=soon: not a number; "
            "e.g. PUBRELAY_BUS__PUBLISH_TIMEOUT_S=5.0",
        ),
        (
            "PUBRELAY_HTTP__PORT",
            "70000",
            "PUBRELAY_HTTP__PORT=70000: must be less than or equal to 65535; "
            "e.g. PUBRELAY_HTTP__PORT=8080",
        ),
        (
            "PUBRELAY_LOG__LEVEL",
            "loud",
            "PUBRELAY_LOG__LEVEL=loud: must be 'debug', 'info', 'warning' or 'error'; "
            "e.g. PUBRELAY_LOG__LEVEL=info",
        ),
        (
            "PUBRELAY_WEBHOOK__ALLOW_UNSIGNED",
            "maybe",
            "PUBRELAY_WEBHOOK__ALLOW_UNSIGNED=maybe: neither true nor false; "
            "e.g. PUBRELAY_WEBHOOK__ALLOW_UNSIGNED=false",
        ),
        (
            "PUBRELAY_WORKER__RETRY_MAX_DELAY_S",
            "0.5",
            "PUBRELAY_WORKER__RETRY_MAX_DELAY_S must be >= PUBRELAY_WORKER__RETRY_BASE_DELAY_S",
        ),
    ],
)
def test_a_bad_value_is_one_line_with_the_variable_the_problem_and_a_good_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    assert refused(monkeypatch, **{name: value}) == expected


def test_credentials_in_a_refused_url_are_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refused(monkeypatch, PUBRELAY_LEDGER__URL="postgres://app:hunter2@db/ledger")
    assert "hunter2" not in message
    assert message.startswith("PUBRELAY_LEDGER__URL='postgres://app:****@db/ledger': must start")


def test_a_handler_section_value_is_explained_the_same_way() -> None:
    context = section_context("noop", {"PUBRELAY_NOOP__EVENT_TYPES": "customer.created"})
    with pytest.raises(ConfigError) as caught:
        context.settings(NoopSettings)
    assert str(caught.value) == (
        'PUBRELAY_NOOP__EVENT_TYPES=customer.created: not a JSON list, like \'["a", "b"]\'; '
        "e.g. PUBRELAY_NOOP__EVENT_TYPES='[\"a\", \"b\"]' (handler 'noop')"
    )


def test_a_mistyped_handler_name_is_refused_with_the_closest_installed_one() -> None:
    with pytest.raises(PluginError) as caught:
        load_factory("emial")
    message = str(caught.value)
    assert message.startswith(
        "PUBRELAY_HANDLERS__ENABLED: unknown handler plugin 'emial'; did you mean 'email'? "
        "available: crm, email,"
    )


@pytest.mark.parametrize(
    ("variables", "said"),
    [
        (
            {"PUBRELAY_VOUCHERIFY__APP_ID": "0b2c-app"},
            "PUBRELAY_VOUCHERIFY__APP_ID is set without PUBRELAY_VOUCHERIFY__APP_TOKEN",
        ),
        (
            {"PUBRELAY_VOUCHERIFY__APP_TOKEN": "tok"},
            "PUBRELAY_VOUCHERIFY__APP_TOKEN is set without PUBRELAY_VOUCHERIFY__APP_ID",
        ),
        (
            {
                "PUBRELAY_VOUCHERIFY__APP_ID": "replace-with-the-app-id",
                "PUBRELAY_VOUCHERIFY__APP_TOKEN": "replace-with-the-app-token",
            },
            "still hold the example's placeholders",
        ),
        (
            {"PUBRELAY_WEBHOOK__SECRETS": '["replace-with-the-voucherify-webhook-secret"]'},
            "PUBRELAY_WEBHOOK__SECRETS=<hidden>: still the example's placeholder",
        ),
        (  # deploy/k8s/secret.template.yaml, applied as it is
            {"PUBRELAY_WEBHOOK__SECRETS": '["REPLACE_ME"]'},
            "PUBRELAY_WEBHOOK__SECRETS=<hidden>: still the example's placeholder",
        ),
    ],
)
def test_what_would_silently_turn_a_feature_off_or_refuse_every_delivery_is_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], said: str
) -> None:
    message = refused(monkeypatch, **variables)
    assert said in message
    assert "replace-with-the-app-token" not in message
