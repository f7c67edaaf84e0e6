"""The buses' publish deadlines (bus/deadlines.py): one timer, each
publish still waiting at its deadline expired once, in deadline order."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bus.deadlines import Deadlines


@dataclass
class Publish:
    name: str
    deadline: float
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


async def test_each_publish_still_waiting_expires_at_its_deadline_in_order() -> None:
    expired: list[tuple[str, float]] = []
    deadlines = Deadlines[Publish](lambda p: expired.append((p.name, time.monotonic())))
    now = time.monotonic()
    late = Publish("late", now + 0.30)
    answered = Publish("answered", now + 0.10)
    waiting = Publish("waiting", now + 0.15)
    shorter = Publish("shorter timeout, added last", now + 0.05)
    for publish in (answered, waiting, late, shorter):
        deadlines.add(publish)
    answered.future.set_result(None)
    deadlines.settled()

    await asyncio.sleep(0.5)

    assert [name for name, _ in expired] == ["shorter timeout, added last", "waiting", "late"]
    for (_, at), publish in zip(expired, (shorter, waiting, late), strict=True):
        assert at >= publish.deadline  # never before its deadline


async def test_nothing_expires_once_every_publish_was_answered() -> None:
    expired: list[Publish] = []
    deadlines = Deadlines[Publish](expired.append)
    publishes = [Publish(str(n), time.monotonic() + 0.05) for n in range(100)]
    for publish in publishes:
        deadlines.add(publish)
    for publish in publishes:
        publish.future.set_result(None)
    deadlines.settled()
    await asyncio.sleep(0.15)
    assert expired == []
