"""Configuration errors name the setting; logs never show secrets or whole e-mails."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog

from pubrelay.logging import configure_logging
from pubrelay.settings import load_settings
from schemas.errors import ConfigError
from schemas.masking import mask_emails

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_nested_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBRELAY_HTTP__PORT", "9091")
    monkeypatch.setenv("PUBRELAY_WEBHOOK__SECRETS", '["a", "b"]')
    monkeypatch.setenv("PUBRELAY_BUS__URL", "kafka://127.0.0.1:9092,127.0.0.1:9093")
    settings = load_settings()
    assert settings.http.port == 9091
    assert [s.get_secret_value() for s in settings.webhook.secrets] == ["a", "b"]
    assert settings.bus.kind == "kafka"
    assert settings.bus.kafka_bootstrap == ["127.0.0.1:9092", "127.0.0.1:9093"]


def test_defaults_are_loopback_8080_and_sqlite_in_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBRELAY_HTTP__PORT", raising=False)
    settings = load_settings()
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.bus.kind == "sqlite"
    assert str(settings.sqlite_bus_path) == "var/bus.sqlite3"
    assert settings.http.max_body_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUBRELAY_HTTP__PORT", "eighty"),
        ("PUBRELAY_BUS__URL", "redis://x"),
        ("PUBRELAY_BUS__PUBLISH_TIMEOUT_S", "30"),
        ("PUBRELAY_WEBHOOK__SECRETS", "not-json"),
    ],
)
def test_invalid_setting_is_one_clear_message_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    section = name.split("__", maxsplit=1)[0]
    with pytest.raises(ConfigError, match=section):
        load_settings()


def test_mask_email_keeps_first_letter_and_domain() -> None:
    assert mask_emails("jane.doe@example.com") == "j***@example.com"
    assert mask_emails("to <a@b.io> and c.d@e.org") == "to <a***@b.io> and c***@e.org"


def test_log_lines_mask_emails_and_hide_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("t").info(
        "sent", recipient="jane.doe@example.com", smtp_password="hunter2", token="abc"
    )
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["recipient"] == "j***@example.com"
    assert line["smtp_password"] == "***"
    assert line["token"] == "***"
    assert "hunter2" not in json.dumps(line)
    structlog.reset_defaults()


def test_library_log_records_come_out_as_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("aiokafka.conn").warning("connection to %s lost", "jane@example.com")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "connection to j***@example.com lost"
    assert line["level"] == "warning"
    assert line["logger"] == "aiokafka.conn"
    structlog.reset_defaults()


def test_at_debug_kafka_requests_are_not_logged_they_carry_the_sasl_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("debug", "json")
    sasl = "SaslAuthenticateRequest_v1(sasl_auth_bytes=b'\\x00svc\\x00S3cr3t-Pw')"
    logging.getLogger("aiokafka.conn").debug("Request to b1:9092 3: %s", sasl)
    logging.getLogger("aiokafka.consumer").debug("fetching from b1:9092")
    err = capsys.readouterr().err
    assert "S3cr3t-Pw" not in err
    assert "fetching from b1:9092" in err  # the rest of aiokafka's debug lines stay
    structlog.reset_defaults()


def test_tracebacks_nested_secrets_and_odd_text_are_masked_without_breaking_the_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    log = structlog.get_logger("t")

    def send() -> None:
        raise ValueError("cannot mail jane.doe@example.com")

    try:
        send()
    except ValueError as err:
        log.exception("send_failed", error=err, headers={"Authorization": "Bearer x"})
    log.info("odd", request_id="\udcff-\ud83d")
    first, second = (json.loads(line) for line in capsys.readouterr().err.strip().splitlines())
    assert "jane.doe@example.com" not in json.dumps(first)
    assert "j***@example.com" in first["exception"]
    assert first["error"] == "ValueError: cannot mail j***@example.com"
    assert first["headers"] == {"Authorization": "***"}
    assert second["request_id"] == "\\udcff-\\ud83d"


async def test_lines_of_one_loop_turn_are_written_together_at_its_end_in_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    log = structlog.get_logger("t")
    log.info("first", recipient="jane.doe@example.com")
    log.warning("second %s of %d", "line", 3)
    logging.getLogger("aiokafka.conn").warning("a library's line")  # writes what waits first
    log.info("fourth %(what)s", {"what": "line"}, token="abc")
    log.debug("not at info")
    waiting = capsys.readouterr().err.splitlines()

    await asyncio.sleep(0)  # the turn ends

    lines = [json.loads(line) for line in [*waiting, *capsys.readouterr().err.splitlines()]]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("first", "info"),
        ("second line of 3", "warning"),
        ("a library's line", "warning"),
        ("fourth line", "info"),
    ]
    assert len(waiting) == 3  # the fourth waited for the end of the turn
    assert lines[0]["recipient"] == "j***@example.com"
    assert lines[3]["token"] == "***"


def test_lines_still_waiting_when_the_loop_is_gone_are_written_by_the_next_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    log = structlog.get_logger("t")

    async def log_and_stop() -> None:
        log.info("in the loop")
        asyncio.get_running_loop().stop()  # the turn's end never runs the write

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(log_and_stop())
        loop.run_forever()
        assert task.done()
    finally:
        loop.close()
    log.info("after the loop")
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()]
    assert events == ["in the loop", "after the loop"]
