"""Offset bookkeeping per partition: which fetched records are finished, what to commit.

Per partition the runner keeps the fetched offsets in fetch order and commits the first
one not yet finished (handled, skipped, ignored, duplicate or dead-lettered): so the
commit never passes an event still in a handler, waiting for a retry, or waiting for its
dead letter to be stored. What was not committed is delivered again after a crash; the
ledger turns those re-deliveries into ``duplicate``.

The records a partition holds (fetched, not yet behind its commit position, finished
or not) count toward the runner's back-pressure bound, and the fetch time of
the first of them is the age of the oldest uncommitted record (a stuck event shows there).

A partition being revoked (a Kafka rebalance) is flagged here too: lanes skip its records
not yet started, and its ``revoked`` event ends any wait on it at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from bus.types import Message, TopicPartition


@dataclass(slots=True)
class Partition:
    """The fetched offsets of one partition in fetch order, and which are finished."""

    tp: TopicPartition
    offsets: deque[int] = field(default_factory=deque)
    # ``time.monotonic()`` at fetch, one per entry of ``offsets``.
    fetched_at: deque[float] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    last: int = -1
    committed: int | None = None
    # Records of this partition in a handler's hands now (a revoke waits for them).
    running: int = 0
    revoking: bool = False
    # Set with ``revoking``: ends a retry back-off (or ledger wait) on this partition at once.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, offset: int) -> None:
        self.offsets.append(offset)
        self.fetched_at.append(time.monotonic())
        self.last = max(self.last, offset)

    def finish(self, offset: int) -> None:
        self.finished.add(offset)
        while self.offsets and self.offsets[0] in self.finished:
            self.finished.discard(self.offsets.popleft())
            self.fetched_at.popleft()

    @property
    def held_finished(self) -> int:
        """Of those, the ones already finished (no longer in a lane, still not committable)."""
        return len(self.finished)

    def oldest_age_s(self, now: float) -> float:
        """Seconds since the first record not yet committable was fetched; 0 when none."""
        return now - self.fetched_at[0] if self.fetched_at else 0.0

    def position(self) -> int | None:
        """The next offset to commit: the first unfinished one, else after the last fetched."""
        if self.offsets:
            return self.offsets[0]
        return self.last + 1 if self.last >= 0 else None

    def revoke(self) -> None:
        """No longer ours: records not yet started are skipped, waits on it end now."""
        self.revoking = True
        self.revoked.set()


@dataclass(slots=True)
class FetchedRecord:
    """A record waiting in (or at the head of) its lane, with its partition's bookkeeping."""

    message: Message
    part: Partition


def commit_positions(parts: Iterable[Partition]) -> dict[TopicPartition, int]:
    """The offsets to commit: each partition's position, where it moved since the last commit."""
    offsets: dict[TopicPartition, int] = {}
    for part in parts:
        position = part.position()
        if position is not None and position != part.committed:
            offsets[part.tp] = position
    return offsets
