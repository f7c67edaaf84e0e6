"""Reading what a consumer group has not committed yet, once, without committing.

The inspection commands (``pubrelay dlq list``, ``replay``, ``quarantine list`` and
``release``) read a topic in a group of their own whose committed offset separates the
records already dealt with from those still waiting: they read the waiting ones
(:func:`fetch_pending` a fetch at a time, :func:`scan_pending` to list them in bounded
memory), act, and commit what they acted on.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

from bus.types import Message, Subscription

SMALL_BATCH_RECORDS = 32
"""Records per fetch: each is dealt with and let go before the next fetch, so with 1 MiB
records about 32 MiB are held at once."""


async def fetch_pending(
    sub: Subscription,
    *,
    limit: int | None,
    timeout_s: float,
    idle_timeout_s: float,
    batch_records: int = SMALL_BATCH_RECORDS,
) -> AsyncGenerator[list[Message], None]:
    """The fetches of what the group has not committed (at most ``limit`` records, each
    partition's in offset order), until one comes back empty.

    Until the subscription has partitions (a Kafka group join takes a while) an empty
    fetch means nothing, so it keeps fetching until ``timeout_s``. The reported lag is
    only used to learn that partitions are assigned: brokers may report it low.
    """
    count = 0
    deadline = time.monotonic() + timeout_s
    assigned = False
    while limit is None or count < limit:
        if not assigned:
            assigned = bool(await sub.lag())
        batch = await sub.fetch(
            max_records=batch_records if limit is None else min(batch_records, limit - count),
            timeout_s=idle_timeout_s,
        )
        if batch:
            count += len(batch)
            yield batch
        elif assigned or time.monotonic() >= deadline:
            break


def _order(message: Message) -> tuple[str, int, int]:
    return message.topic, message.partition, message.offset


async def scan_pending(
    sub: Subscription,
    *,
    keep: int | None,
    newest: bool = False,
    max_value_bytes: int,
    accept: Callable[[Message], bool] | None = None,
    read_limit: int | None = None,
    timeout_s: float,
    idle_timeout_s: float,
) -> tuple[list[tuple[Message, int]], int]:
    """The records the group has not committed that ``accept`` takes (all when it is
    ``None``): the first ``keep`` of them, or with ``newest`` the last (all when ``keep`` is
    ``None``), oldest first per partition, each value cut to ``max_value_bytes`` and given
    with its whole size; and how many were taken in all (of the first ``read_limit`` read,
    when given: a page that must answer soon reads a bounded number).

    Memory is bounded by ``keep`` cut records and one small fetch, however many wait: a
    listing of a large dead-letter topic or quarantine must not hold all of it.
    """
    kept: deque[tuple[Message, int]] = deque(maxlen=keep if newest else None)
    total = 0
    async for batch in fetch_pending(
        sub,
        limit=read_limit,
        timeout_s=timeout_s,
        idle_timeout_s=idle_timeout_s,
    ):
        for message in batch:
            if accept is not None and not accept(message):
                continue
            total += 1
            if not newest and keep is not None and len(kept) >= keep:
                continue
            size = len(message.value)
            cut = message
            if size > max_value_bytes:
                cut = dataclasses.replace(message, value=message.value[:max_value_bytes])
            kept.append((cut, size))
    return sorted(kept, key=lambda item: _order(item[0])), total


async def tail_pending(
    sub: Subscription, *, keep: int, max_value_bytes: int, timeout_s: float, idle_timeout_s: float
) -> tuple[list[tuple[Message, int]], int]:
    """The last ``keep`` records the group has not committed (see :func:`scan_pending`)."""
    return await scan_pending(
        sub,
        keep=keep,
        newest=True,
        max_value_bytes=max_value_bytes,
        timeout_s=timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
