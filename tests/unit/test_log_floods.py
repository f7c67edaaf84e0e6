"""Library log floods become one line per distinct message per interval, with a count;
pubrelay's own lines and identifiers shaped like addresses come out as logged."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog

from pubrelay.logging import configure_logging

pytestmark = pytest.mark.usefixtures("restore_logging")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


def test_a_library_logging_the_same_error_in_a_loop_writes_one_line_per_interval(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    configure_logging("info", "json", library_repeat_interval_s=30, clock=clock)
    kafka = logging.getLogger("aiokafka.conn")
    other = logging.getLogger("aiokafka.cluster")

    for attempt in range(3000):  # a broker down: an error per connection attempt
        kafka.error("Unable connect to node with id %s: %s", attempt % 3, "Connect call failed")
        clock.now += 0.005  # 15 s in all
    other.warning("Topic %s is not available during auto-create initialization", "t")
    first = lines(capsys)

    clock.now += 30
    kafka.error("Unable connect to node with id %s: %s", 1, "Connect call failed")
    after_interval = lines(capsys)

    assert [(line["logger"], line["event"]) for line in first] == [
        ("aiokafka.conn", "Unable connect to node with id 0: Connect call failed"),
        ("aiokafka.cluster", "Topic t is not available during auto-create initialization"),
    ]
    assert "repeated" not in first[0]
    [again] = after_interval
    assert again["event"] == "Unable connect to node with id 1: Connect call failed"
    assert again["repeated"] == 2999


def test_pubrelays_own_lines_are_never_held_back(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", library_repeat_interval_s=30, clock=Clock())
    log = structlog.get_logger("pubrelay.handlers.worker")
    stdlib_own = logging.getLogger("pubrelay.bus")
    for _ in range(5):
        log.warning("worker_bus_error", operation="fetch")
        stdlib_own.warning("bus_slow")
    events = [line["event"] for line in lines(capsys)]
    assert events.count("worker_bus_error") == 5
    assert events.count("bus_slow") == 5


def test_the_email_message_id_is_logged_unmasked_while_addresses_are_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    structlog.get_logger("pubrelay.handlers.email").info(
        "email_sent",
        message_id="<pubrelay.pub_DpHmhx5uTanbM0mnndFrODi1U3MEX6rF@shop.example>",
        to="jack.webhook@example.com",
        reply="250 queued as <pubrelay.x@shop.example> for jack.webhook@example.com",
    )
    [line] = lines(capsys)
    assert line["message_id"] == "<pubrelay.pub_DpHmhx5uTanbM0mnndFrODi1U3MEX6rF@shop.example>"
    assert line["to"] == "j***@example.com"
    assert "jack.webhook@example.com" not in line["reply"]
