"""Dead letters: list them, and send them back to the one handler that failed them.

Both read a handler's dead-letter topic ``<prefix>dlq.<handler>`` in the consumer group
``<group prefix>replay.<handler>``; that group's committed offset separates dead letters
already replayed from those still waiting, so ``scan_dead_letters`` (and
``list_dead_letters``) show what a ``replay`` would send.

``replay`` re-publishes the original record (value, key, headers without ``dlq-*``) to
``<prefix>retry.<handler>``, which only that handler's consumer group reads, and then
commits the dead-letter offsets it replayed. It commits a contiguous run only: when a
filter (``event_id``, ``since``) leaves an earlier dead letter in place, the replayed
ones after it stay listed too, and replaying them again is harmless (the ledger turns an
event already handled into a ``duplicate``). ``dry_run`` publishes and commits nothing.

The dead-letter format itself (the ``dlq-*`` headers) is :mod:`handlers.worker.dead_letters`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from bus.pending import SMALL_BATCH_RECORDS, fetch_pending, read_pending, scan_pending
from bus.types import Bus, Message, Subscription, TopicPartition
from handlers.types import check_handler_name
from handlers.worker.dead_letters import DeadLetter
from schemas.topics import (
    DEFAULT_GROUP_PREFIX,
    DEFAULT_TOPIC_PREFIX,
    dlq_topic,
    replay_group,
    retry_topic,
)

log = structlog.get_logger("pubrelay.handlers.replay")


@dataclass(slots=True)
class ReplaySummary:
    """What a replay did (or, with ``dry_run``, would do)."""

    handler: str
    dry_run: bool
    read: int = 0
    matched: int = 0
    replayed: int = 0
    event_ids: list[str] = field(default_factory=list)
    """The event ids of the dead letters that matched (replayed, or in a dry run would be)."""
    committed: dict[TopicPartition, int] = field(default_factory=dict)


@asynccontextmanager
async def _dead_letter_topic(
    bus: Bus, handler: str, topic_prefix: str, group_prefix: str
) -> AsyncIterator[Subscription]:
    """``handler``'s dead-letter topic, read in its replay group until the block ends."""
    check_handler_name(handler)
    sub = bus.subscribe(replay_group(group_prefix, handler), [dlq_topic(topic_prefix, handler)])
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


async def scan_dead_letters(
    bus: Bus,
    handler: str,
    *,
    keep: int | None,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    group_prefix: str = DEFAULT_GROUP_PREFIX,
    event_id: str | None = None,
    max_value_bytes: int = 0,
    read_limit: int | None = None,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> tuple[list[DeadLetter], int]:
    """The first ``keep`` (all when ``None``) dead letters of ``handler`` not yet replayed
    (of one ``event_id``, if given), oldest first, each body cut to ``max_value_bytes``
    (none by default: a listing shows headers), and how many wait in all (among the first
    ``read_limit`` read, when given); commits nothing. Memory is bounded by ``keep`` of
    them, however many wait."""
    async with _dead_letter_topic(bus, handler, topic_prefix, group_prefix) as sub:
        kept, total = await scan_pending(
            sub,
            keep=keep,
            max_value_bytes=max_value_bytes,
            accept=None if event_id is None else lambda m: _event_id(m) == event_id,
            read_limit=read_limit,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
    return [DeadLetter.from_message(m) for m, _ in kept], total


def _event_id(message: Message) -> str | None:
    return DeadLetter.from_message(message).event_id


async def list_dead_letters(
    bus: Bus,
    handler: str,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    group_prefix: str = DEFAULT_GROUP_PREFIX,
    event_id: str | None = None,
    limit: int | None = None,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> list[DeadLetter]:
    """The first ``limit`` (all when ``None``) dead letters of ``handler`` not yet
    replayed, whole (see :func:`scan_dead_letters`); commits nothing."""
    letters, _ = await scan_dead_letters(
        bus,
        handler,
        keep=limit,
        topic_prefix=topic_prefix,
        group_prefix=group_prefix,
        event_id=event_id,
        max_value_bytes=sys.maxsize,
        timeout_s=timeout_s,
        idle_timeout_s=idle_timeout_s,
    )
    return letters


async def _at_once(read: Awaitable[list[Message]]) -> AsyncIterator[list[Message]]:
    yield await read


async def replay(
    bus: Bus,
    handler: str,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    group_prefix: str = DEFAULT_GROUP_PREFIX,
    event_id: str | None = None,
    since: datetime | None = None,
    dry_run: bool = False,
    progress: Callable[[DeadLetter], object] | None = None,
    limit: int | None = None,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> ReplaySummary:
    """Send ``handler``'s dead letters (all, one ``event_id``, or failed ``since``) back to it.

    ``progress`` is called once per dead letter replayed (or, in a dry run, that would be).
    A replay reads every waiting dead letter before it sends the first: the ones that fail
    again meanwhile are dead letters of a later run, not of this one. A dry run sends
    nothing, so it reads :data:`~bus.pending.SMALL_BATCH_RECORDS` at a time and keeps only
    the ids: the console's preview, in the webhook's process, does not grow with them.
    Raises :class:`schemas.errors.BusUnavailable` when a publish fails; what was replayed
    before it is committed first, so running it again continues where it stopped.
    """
    target = retry_topic(topic_prefix, handler)
    summary = ReplaySummary(handler=handler, dry_run=dry_run)
    async with _dead_letter_topic(bus, handler, topic_prefix, group_prefix) as sub:
        # Per partition: the next offset to commit while replayed records are contiguous.
        frontier: dict[TopicPartition, int] = {}
        blocked: set[TopicPartition] = set()
        try:
            batches = (
                fetch_pending(
                    sub,
                    limit=limit,
                    timeout_s=timeout_s,
                    idle_timeout_s=idle_timeout_s,
                    batch_records=SMALL_BATCH_RECORDS,
                )
                if dry_run
                else _at_once(
                    read_pending(
                        sub, limit=limit, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s
                    )
                )
            )
            async for batch in batches:
                summary.read += len(batch)
                for message in batch:
                    letter = DeadLetter.from_message(message)
                    matches = (event_id is None or letter.event_id == event_id) and (
                        since is None or letter.failed_since(since)
                    )
                    if not matches:
                        blocked.add(message.tp)
                        continue
                    summary.matched += 1
                    summary.event_ids.append(letter.event_id or "-")
                    if progress is not None:
                        progress(letter)
                    if dry_run:
                        continue
                    await bus.publish(
                        target, message.value, key=message.key, headers=letter.original_headers
                    )
                    summary.replayed += 1
                    log.info(
                        "dead_letter_replayed",
                        handler=handler,
                        event_id=letter.event_id,
                        offset=message.offset,
                        target=target,
                    )
                    if message.tp not in blocked:
                        frontier[message.tp] = message.offset + 1
        finally:
            if frontier and not dry_run:
                await sub.commit(frontier)
                summary.committed = frontier
    log.info(
        "replay_finished",
        handler=handler,
        dry_run=dry_run,
        read=summary.read,
        matched=summary.matched,
        replayed=summary.replayed,
    )
    return summary
