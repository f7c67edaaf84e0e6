"""A handler that blocks the event loop is reported while it blocks, with where, and the
stall is counted once the loop runs again; a loop that only works hard is not."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pubrelay.logging import configure_logging
from pubrelay.loop_watch import HELD_LOCK, LoopWatch

pytestmark = pytest.mark.usefixtures("restore_logging")

COUNT = "pubrelay_event_loop_blocked_seconds_count"


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


def hold_the_loop(capsys: pytest.CaptureFixture[str], seconds: float) -> list[dict[str, Any]]:
    """Block the loop as a plugin calling ``time.sleep`` would; the lines written
    meanwhile, read before the loop runs again."""
    time.sleep(seconds)
    return lines(capsys)


@contextlib.contextmanager
def watching(registry: CollectorRegistry, blocked_after_s: float) -> Iterator[None]:
    """Logs as JSON lines on stderr and a watch on the running loop for the block's
    length, beating every 0.05 s."""
    configure_logging("info", "json")
    watch = LoopWatch(registry, blocked_after_s=blocked_after_s, beat_s=0.05)
    watch.start()
    try:
        yield
    finally:
        watch.stop()


def work_for(seconds: float) -> None:
    """Hold the loop for ``seconds``, as a slice of a handler's own work."""
    time.sleep(seconds)


async def test_a_blocked_loop_is_logged_while_blocked_with_its_stack_and_counted_after(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = CollectorRegistry()
    with watching(registry, blocked_after_s=0.3):
        await asyncio.sleep(0.3)
        assert lines(capsys) == []
        while_blocked = hold_the_loop(capsys, 1.0)
        await asyncio.sleep(0.3)
    after = lines(capsys)

    reports = [line for line in while_blocked if line["event"] == "event_loop_blocked"]
    assert reports, while_blocked
    assert all(line["level"] == "warning" for line in reports)
    assert 0.3 <= reports[0]["blocked_s"] < 1.0
    innermost = reports[-1]["where"][-1]
    assert innermost.startswith(f"{__file__}:")
    assert innermost.endswith(" hold_the_loop")
    [unblocked] = [line for line in after if line["event"] == "event_loop_unblocked"]
    assert 0.95 <= unblocked["blocked_s"] < 3.0
    assert registry.get_sample_value(COUNT) == 1
    blocked_s = registry.get_sample_value("pubrelay_event_loop_blocked_seconds_sum")
    assert blocked_s is not None
    assert blocked_s >= 0.95


async def test_a_long_stall_is_reported_again_at_each_doubling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with watching(CollectorRegistry(), blocked_after_s=0.3):
        await asyncio.sleep(0.1)
        while_blocked = hold_the_loop(capsys, 2.0)

    times = [line["blocked_s"] for line in while_blocked if line["event"] == "event_loop_blocked"]
    assert 2 <= len(times) <= 3, times  # at about 0.3, 0.6 and 1.2 s
    pairs = itertools.pairwise(times)
    assert all(later >= 2 * earlier - 0.002 for earlier, later in pairs)  # 3 decimals


async def test_a_loop_that_works_hard_but_turns_is_not_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = CollectorRegistry()
    with watching(registry, blocked_after_s=0.5):
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            work_for(0.02)  # busy, in slices well under the threshold
            await asyncio.sleep(0)

    assert lines(capsys) == []
    assert registry.get_sample_value(COUNT) == 0


def test_stopping_a_watch_never_started_does_nothing() -> None:
    LoopWatch(CollectorRegistry()).stop()


def hold_the_interpreter_lock(seconds: float) -> None:
    """Hold the loop in one C call that keeps the interpreter lock (as a catastrophic
    regular expression or a huge decode does): no other thread runs meanwhile."""
    started = time.perf_counter()
    sum(range(1_000_000))
    per_million = time.perf_counter() - started
    sum(range(int(seconds / per_million * 1_000_000)))


async def test_a_stall_that_held_the_interpreter_lock_is_told_once_the_loop_runs_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = CollectorRegistry()
    with watching(registry, blocked_after_s=0.3):
        await asyncio.sleep(0.2)
        started = time.monotonic()
        hold_the_interpreter_lock(1.0)
        held_s = time.monotonic() - started
        await asyncio.sleep(0.3)

    reports = [line for line in lines(capsys) if line["event"] == "event_loop_blocked"]
    assert len(reports) == 1, reports
    assert reports[0]["where"] == [HELD_LOCK]
    assert 0.3 <= reports[0]["blocked_s"] <= held_s + 0.2
    assert registry.get_sample_value(COUNT) == 1
