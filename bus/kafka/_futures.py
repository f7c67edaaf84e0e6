"""Futures the Kafka bus may abandon: a timed-out publish leaves its delivery and its
shared tasks (a topic check, a producer replacement) running without a waiter."""

from __future__ import annotations

import asyncio
from typing import Any


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
