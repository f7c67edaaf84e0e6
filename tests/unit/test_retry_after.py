"""``Retry-After`` from servers we do not control: always a finite, capped delay or ``None``."""

from __future__ import annotations

import asyncio
import math

import pytest

from handlers.builtin.ratelimit import RateLimiter
from handlers.builtin.retry_after import RETRY_AFTER_MAX_S, retry_after_s

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        ("Tue, 14 Nov 2023 22:00:00 GMT", 0.0),  # in the past: at once
        ("inf", 120.0),
        ("Infinity", 120.0),
        ("1e308", 120.0),
        ("1e400", 120.0),  # a float overflow is inf
        ("9" * 400, 120.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 120.0),
        ("Wed, 01 Jan 3000 00:00:00 +0000", 120.0),
    ],
)
def test_a_delay_is_read_and_capped(value: str, delay: float) -> None:
    assert retry_after_s(value, NOW, max_s=120.0) == delay


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "nan",
        "-nan",
        "-5",
        "-inf",
        "soon",
        "Fri, 31 Dec 99999 23:59:59 GMT",  # year out of range
        "Fri, 31 Dec " + "9" * 5000 + " 23:59:59 GMT",  # more digits than int() reads
        "Mon, 99 Foo 2024 25:61:61 GMT",
    ],
)
def test_an_unreadable_value_is_none_and_never_raises(value: str | None) -> None:
    assert retry_after_s(value, NOW) is None


def test_without_a_cap_a_delay_is_at_most_a_day() -> None:
    assert retry_after_s("inf", NOW) == RETRY_AFTER_MAX_S == 86_400.0
    assert retry_after_s("3600", NOW) == 3600.0


@pytest.mark.timeout(5)
@pytest.mark.parametrize("delay", [math.inf, 1e308, 10_000.0])
async def test_a_limiter_pause_lasts_at_most_its_cap(delay: float) -> None:
    limiter = RateLimiter(10, 10.0, max_pause_s=0.2)
    limiter.pause(delay)
    await asyncio.wait_for(limiter.acquire(), 3)  # would wait forever without the cap


@pytest.mark.parametrize("delay", [math.nan, -1.0, 0.0])
async def test_a_meaningless_pause_is_ignored(delay: float) -> None:
    limiter = RateLimiter(10, 10.0, max_pause_s=300.0)
    limiter.pause(delay)
    await asyncio.wait_for(limiter.acquire(), 1)
