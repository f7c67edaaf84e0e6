"""Reading what a consumer group has not committed yet, once, without committing.

The inspection commands (``pubrelay dlq list``, ``replay``, ``quarantine list`` and
``release``) read a topic in a group of their own whose committed offset separates the
records already dealt with from those still waiting: they read the waiting ones with
:func:`read_pending`, act, and commit what they acted on.
"""

from __future__ import annotations

import time

from bus.types import Message, Subscription


async def read_pending(
    sub: Subscription, *, limit: int | None, timeout_s: float, idle_timeout_s: float
) -> list[Message]:
    """Read what the group has not committed (at most ``limit``), oldest first per
    partition, until a fetch comes back empty.

    Until the subscription has partitions (a Kafka group join takes a while) an empty
    fetch means nothing, so it keeps fetching until ``timeout_s``. The reported lag is
    only used to learn that partitions are assigned: brokers may report it low.
    """
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    assigned = False
    while limit is None or len(out) < limit:
        if not assigned:
            assigned = bool(await sub.lag())
        batch = await sub.fetch(
            max_records=500 if limit is None else min(500, limit - len(out)),
            timeout_s=idle_timeout_s,
        )
        if batch:
            out.extend(batch)
        elif assigned or time.monotonic() >= deadline:
            break
    out.sort(key=lambda m: (m.topic, m.partition, m.offset))
    return out
