"""``log_line``: the intake's request line, written without structlog's calls, is the line
structlog writes, and steps aside whenever another logging configuration is in force."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from pubrelay.logging import _SHARED_PROCESSORS, _dumps, _json_line, configure_logging, log_line

pytestmark = pytest.mark.usefixtures("restore_logging")


def _fields() -> dict[str, Any]:
    return {
        "status": 202,
        "latency_ms": 3.18,
        "request_id": "0f8bfc4dae7c2a82000000000001ce1d",
        "event_id": "evcus_1",
        "detail": "sent by jane.doe@example.com",
        "signature_present": True,
        "error": None,
        "api_token": "hunter2",
    }


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    for line in lines:
        line.pop("timestamp")
    return lines


def test_the_line_is_the_one_structlog_writes_masking_included(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    structlog.get_logger("pubrelay.consumer").warning("webhook_request", **_fields())
    assert log_line("warning", "webhook_request", _fields())
    by_structlog, by_log_line = _lines(capsys)
    assert list(by_log_line.items()) == list(by_structlog.items())  # keys in the same order
    assert by_log_line["detail"] == "sent by j***@example.com"
    assert by_log_line["api_token"] == "***"
    assert by_log_line["level"] == "warning"


def test_a_level_below_the_configured_one_writes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("warning", "json")
    assert log_line("info", "webhook_request", _fields())  # handled: dropped, as structlog would
    assert log_line("warn", "webhook_request", _fields())
    assert log_line("error", "webhook_request", _fields())
    assert [line["level"] for line in _lines(capsys)] == ["warning", "error"]


def test_it_steps_aside_for_the_console_format_a_capture_and_a_reset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "console")
    assert not log_line("info", "webhook_request", _fields())

    configure_logging("info", "json")
    with structlog.testing.capture_logs() as captured:
        assert not log_line("info", "webhook_request", _fields())
    assert captured == []  # nothing written behind the capture's back
    assert log_line("info", "webhook_request", _fields())  # the capture ended

    structlog.reset_defaults()
    assert not log_line("info", "webhook_request", _fields())
    assert len(_lines(capsys)) == 1


@pytest.mark.parametrize("method_name", ["info", "warn", "warning", "exception"])
def test_the_fused_processor_writes_what_the_shared_chain_and_the_renderer_write(
    method_name: str,
) -> None:
    """``_json_line`` is the shared processors and the JSON renderer in one call: the two
    must not drift apart (the console format and library lines use the chain)."""
    error = ValueError("no route for ops@example.com")

    def event() -> dict[str, Any]:
        fields = {"event": "webhook_request", **_fields(), "nested": {"password": "x"}}
        if method_name == "exception":
            fields["exc_info"] = error
        return fields

    chained: Any = event()
    for processor in _SHARED_PROCESSORS:
        chained = processor(None, method_name, chained)
    rendered = structlog.processors.JSONRenderer(serializer=_dumps)(None, method_name, chained)
    by_chain = json.loads(str(rendered))
    by_fused = json.loads(_json_line(None, method_name, event()))
    for line in (by_chain, by_fused):
        line.pop("timestamp")
    assert list(by_fused.items()) == list(by_chain.items())
    if method_name == "exception":  # the traceback is text, masked like the rest
        assert "o***@example.com" in by_fused["exception"]
