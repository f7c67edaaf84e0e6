"""The handler contract's pieces that need no I/O: settings sections, names, headers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, SecretStr, ValidationError

from bus.types import Message
from consumer.routing import Routed, classify, routed_headers
from handlers.builtin.noop import create as create_noop
from handlers.config import LedgerSettings, WorkerSettings
from handlers.types import (
    Event,
    Handler,
    HandlerContext,
    check_handler_name,
)
from handlers.worker.dead_letters import dead_letter_headers
from handlers.worker.identity import identify
from handlers.worker.retry import is_transient
from handlers.worker.runner import handler_topics
from schemas.errors import BusUnavailable, ConfigError, HandlerError, RetryLater, SkipEvent
from schemas.record import HEADER_EVENT_CREATED_AT, HEADER_PUBLICATION_ID, Headers
from schemas.topics import consumer_group, dlq_topic, retry_topic
from tests.fixtures.app import event_body
from tests.fixtures.worker import event_record

NEW_HEADERS = (HEADER_EVENT_CREATED_AT, HEADER_PUBLICATION_ID)


class SmtpSection(BaseModel):
    host: str
    port: int = 25


class PluginSettings(BaseModel):
    smtp: SmtpSection
    password: SecretStr
    channels: list[str] = Field(default_factory=list)
    dry_run: bool = False


def context(
    name: str = "email", env: dict[str, str] | None = None, **overrides: object
) -> HandlerContext:
    return HandlerContext(
        name=name,
        data_dir=Path("/nonexistent"),
        metrics_registry=CollectorRegistry(),
        logger=structlog.get_logger("test"),
        topic_prefix="voucherify.",
        env=env or {},
        overrides=overrides,
    )


def test_a_plugin_reads_its_own_nested_section_from_the_environment() -> None:
    ctx = context(
        env={
            "PUBRELAY_EMAIL__SMTP__HOST": "127.0.0.1",
            "PUBRELAY_EMAIL__SMTP__PORT": "2525",
            "PUBRELAY_EMAIL__PASSWORD": "hunter2",
            "PUBRELAY_EMAIL__CHANNELS": '["API", "Automation"]',
            "PUBRELAY_EMAIL__DRY_RUN": "true",
            "PUBRELAY_CRM__SMTP__HOST": "not-mine",
            "PUBRELAY_HTTP__PORT": "1",
        }
    )
    settings = ctx.settings(PluginSettings)
    assert settings.smtp == SmtpSection(host="127.0.0.1", port=2525)
    assert settings.password.get_secret_value() == "hunter2"
    assert settings.channels == ["API", "Automation"]
    assert settings.dry_run is True


def test_overrides_win_over_the_environment() -> None:
    ctx = context(
        env={"PUBRELAY_EMAIL__SMTP__HOST": "env-host", "PUBRELAY_EMAIL__PASSWORD": "x"},
        smtp={"port": 1025},
        dry_run=True,
    )
    settings = ctx.settings(PluginSettings)
    assert (settings.smtp.host, settings.smtp.port, settings.dry_run) == ("env-host", 1025, True)


def test_invalid_plugin_settings_name_the_environment_variables() -> None:
    ctx = context(name="my-crm", env={"PUBRELAY_MY_CRM__SMTP__PORT": "many"})
    with pytest.raises(ConfigError) as err:
        ctx.settings(PluginSettings)
    message = str(err.value)
    assert "'my-crm'" in message
    assert "PUBRELAY_MY_CRM__SMTP__HOST" in message
    assert "PUBRELAY_MY_CRM__SMTP__PORT" in message
    assert "PUBRELAY_MY_CRM__PASSWORD" in message


def test_a_plugin_reads_its_section_from_dotenv_too_the_environment_winning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "PUBRELAY_MY_CRM__SMTP__HOST=dotenv-host\n"
        "PUBRELAY_MY_CRM__PASSWORD=from-dotenv\n"
        "PUBRELAY_MY_CRM__CHANNELS='[\"API\"]'\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PUBRELAY_MY_CRM__PASSWORD", "from-environment")
    ctx = HandlerContext(
        name="my-crm",
        data_dir=tmp_path,
        metrics_registry=CollectorRegistry(),
        logger=structlog.get_logger("test"),
        topic_prefix="voucherify.",
    )
    settings = ctx.settings(PluginSettings)
    assert settings.smtp.host == "dotenv-host"
    assert settings.channels == ["API"]
    assert settings.password.get_secret_value() == "from-environment"


def test_a_section_value_that_must_be_json_names_the_variable() -> None:
    ctx = context(name="my-crm", env={"PUBRELAY_MY_CRM__CHANNELS": "API, Automation"})
    with pytest.raises(ConfigError, match=r"PUBRELAY_MY_CRM__CHANNELS=.*not a JSON list.*'my-crm'"):
        ctx.settings(PluginSettings)


@pytest.mark.parametrize("name", ["email", "crm-hubspot", "metrics_2"])
def test_plain_handler_names_are_accepted(name: str) -> None:
    assert check_handler_name(name) == name


@pytest.mark.parametrize("name", ["", "Email", "a b", "dlq.x", "-x", "x" * 64])
def test_names_unfit_for_topics_and_env_vars_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        check_handler_name(name)


def test_topic_and_group_names() -> None:
    assert dlq_topic("voucherify.", "email") == "voucherify.dlq.email"
    assert retry_topic("voucherify.", "email") == "voucherify.retry.email"
    assert consumer_group("pubrelay.", "email") == "pubrelay.email"


def test_a_handler_reads_its_event_types_and_its_replay_topic() -> None:
    narrow = create_noop(
        context("noop", env={"PUBRELAY_NOOP__EVENT_TYPES": '["publication.succeeded"]'})
    )
    assert handler_topics(narrow, "p.") == ["p.publication.succeeded", "p.retry.noop"]
    every = create_noop(context("noop"))
    assert handler_topics(every, "p.") == [
        "p.customer.publication.succeeded",
        "p.publication.succeeded",
        "p.retry.noop",
    ]


def test_the_noop_handler_honours_the_protocol() -> None:
    assert isinstance(create_noop(context("noop")), Handler)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (RetryLater("429", delay_s=3), True),
        (BusUnavailable("down"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (HandlerError("bad template"), False),
        (SkipEvent("opted out"), False),
        (ValueError("bug"), False),
        (KeyError("bug"), False),
    ],
)
def test_which_failures_are_retried(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_dead_letter_headers_keep_the_original_and_replace_old_dlq_headers() -> None:
    original = (("event-id", b"ev_1"), ("dlq-error", b"old"), ("x-voucherify-signature", b"ab"))
    headers = dead_letter_headers(
        original,
        error="HandlerError: boom",
        error_type="schemas.errors.HandlerError",
        attempts=3,
        first_failed_at="2024-01-01T00:00:00.000+00:00",
        last_failed_at="2024-01-01T00:00:01.000+00:00",
        handler="email",
        source_topic="voucherify.customer.publication.succeeded",
    )
    assert headers[:2] == (("event-id", b"ev_1"), ("x-voucherify-signature", b"ab"))
    assert dict(headers) == {
        "event-id": b"ev_1",
        "x-voucherify-signature": b"ab",
        "dlq-error": b"HandlerError: boom",
        "dlq-error-type": b"schemas.errors.HandlerError",
        "dlq-attempts": b"3",
        "dlq-first-failed-at": b"2024-01-01T00:00:00.000+00:00",
        "dlq-last-failed-at": b"2024-01-01T00:00:01.000+00:00",
        "dlq-handler": b"email",
        "dlq-source-topic": b"voucherify.customer.publication.succeeded",
    }


def test_dead_letter_headers_escape_what_utf8_cannot_encode() -> None:
    """A handler's error quoting a name decoded from JSON ``"Ren\\ud83d"`` (lone surrogate)."""
    headers = dead_letter_headers(
        (),
        error="HandlerError: CRM rejected name Ren\ud83d",
        error_type="schemas.errors.HandlerError",
        attempts=1,
        first_failed_at="2024-01-01T00:00:00.000+00:00",
        last_failed_at="2024-01-01T00:00:00.000+00:00",
        handler="crm",
        source_topic="voucherify.customer.\udcff",
    )
    values = dict(headers)
    assert values["dlq-error"] == b"HandlerError: CRM rejected name Ren\\ud83d"
    assert values["dlq-source-topic"] == b"voucherify.customer.\\udcff"
    assert values["dlq-attempts"] == b"1"


def _event(body: bytes | None = None) -> Event:
    value, key, headers = event_record(event_id="evcus_1", customer_id="cust_9", body=body)
    return Event(
        id="evcus_1",
        type="customer.publication.succeeded",
        raw=value,
        headers=headers,
        key=key,
        attempt=1,
        topic="t",
        partition=0,
        offset=7,
    )


def test_the_event_model_is_parsed_on_first_access() -> None:
    event = _event()
    assert not event.parsed
    assert event.customer_id == "cust_9"
    assert event.delivery_id is not None
    assert event.delivery_id.startswith("whs_")
    envelope = event.envelope
    assert event.parsed
    assert envelope.event.id == "evcus_1"
    assert event.envelope is envelope


def test_a_body_the_model_rejects_raises_a_validation_error() -> None:
    event = _event(body=b'{"id": "whs_1"}')
    with pytest.raises(ValidationError):
        _ = event.envelope


def test_worker_and_ledger_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValidationError):
        WorkerSettings(retry_base_delay_s=10, retry_max_delay_s=1)
    with pytest.raises(ValidationError):
        WorkerSettings(concurrency=0)
    with pytest.raises(ValidationError):
        LedgerSettings(url="mysql://x")
    assert LedgerSettings().retention_s == 30 * 24 * 3600
    with pytest.raises(ValidationError):
        WorkerSettings(handler_timeout_s=-1)


def test_handler_calls_and_revokes_are_bounded_by_default() -> None:
    settings = WorkerSettings()
    assert settings.handler_timeout_s == 60.0
    # Below the consumer group's default rebalance timeout (10 s), so a revoke never
    # makes the group go on without this member.
    assert settings.revoke_timeout_s < 10.0
    assert WorkerSettings(handler_timeout_s=0).handler_timeout_s == 0  # 0: no bound


def test_dead_letter_error_text_masks_customer_addresses() -> None:
    from handlers.worker.dead_letters import (  # noqa: PLC0415 - a helper under test
        error_text as _error_text,
    )

    text = _error_text(ValueError("input_value='jane.doe@example.com' is not valid"))
    assert text == "ValueError: input_value='j***@example.com' is not valid"


def test_a_short_error_cut_inside_an_address_keeps_none_of_it() -> None:
    """Log lines' errors are cut to 300 characters: a cut before the "@" would leave the
    start of an address the log's own masking no longer recognises."""
    from handlers.worker.error_text import short_error  # noqa: PLC0415 - a helper under test

    text = short_error(ValueError("HubSpot refused: " + "x" * 270 + " value jane.doe@example.com"))
    assert "jane" not in text
    assert text.startswith("HubSpot refused: xxx")
    assert text.endswith("chars]")


def _message(body: bytes, headers: Headers) -> Message:
    return Message("voucherify.customer.publication.succeeded", 0, 7, b"cust_1", body, headers, 0)


@pytest.mark.parametrize("event_type", ["customer.publication.succeeded", "voucher.published"])
def test_a_record_is_identified_from_the_intake_headers_as_from_its_body(event_type: str) -> None:
    body = event_body(event_id="evcus_9", delivery_id="whs_9", event_type=event_type)
    routed = classify(body, max_depth=32)
    assert isinstance(routed, Routed)
    headers = routed_headers(routed, received_at=b"2026-12-02T10:00:00Z", signature=b"")
    written_before = tuple(h for h in headers if h[0] not in NEW_HEADERS)

    from_headers = identify(_message(b"not json: the body is not read", headers))
    from_body = identify(_message(body, written_before))

    assert from_headers == from_body
    assert from_body.event_id == "evcus_9"
    assert from_body.created_at is not None
    if event_type == "customer.publication.succeeded":
        assert from_body.key == f"{event_type}:{json.loads(body)['data']['publication']['id']}"


def test_a_record_missing_a_header_is_identified_from_its_body() -> None:
    body = event_body(event_id="evcus_10")
    routed = classify(body, max_depth=32)
    assert isinstance(routed, Routed)
    headers = routed_headers(routed, received_at=b"", signature=b"")
    without_publication = tuple(h for h in headers if h[0] != HEADER_PUBLICATION_ID)

    ident = identify(_message(body, without_publication))

    assert ident.key == identify(_message(body, headers)).key
    assert ident.key.endswith(json.loads(body)["data"]["publication"]["id"])
