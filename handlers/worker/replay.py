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
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from bus.pending import fetch_pending, scan_pending
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
    incomplete: list[str] = field(default_factory=list)
    """The partitions (``topic[n]``) whose dead letters waiting at the start were not all
    read again: the second reading ended early (a group join past ``timeout_s``, or
    records gone meanwhile, say to retention). What was sent is committed."""


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


async def _last_offsets(
    bus: Bus,
    handler: str,
    *,
    topic_prefix: str,
    group_prefix: str,
    limit: int | None,
    timeout_s: float,
    idle_timeout_s: float,
) -> dict[TopicPartition, int]:
    """Per partition, the offset of the last dead letter waiting now (of the first
    ``limit``): what a replay sends, read once a fetch at a time and let go."""
    last: dict[TopicPartition, int] = {}
    async with _dead_letter_topic(bus, handler, topic_prefix, group_prefix) as sub:
        async for batch in fetch_pending(
            sub,
            limit=limit,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        ):
            for message in batch:
                last[message.tp] = max(message.offset, last.get(message.tp, -1))
    return last


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
    A replay sends the dead letters waiting when it starts, not those that fail again
    while it runs (they are dead letters of a later run): it first reads where each
    partition's waiting ones end, then reads them again from the group's offset and sends
    them up to there. Both readings fetch :data:`~bus.pending.SMALL_BATCH_RECORDS` at a
    time and let each go, and the summary keeps only ids: memory does not grow with the
    topic (the console replays in the webhook's process). A dry run sends nothing, so it
    reads once. What was replayed is committed after each fetch. Raises
    :class:`schemas.errors.BusUnavailable` when a publish fails; what was replayed before
    it is committed first, so running it again continues where it stopped.
    """
    target = retry_topic(topic_prefix, handler)
    summary = ReplaySummary(handler=handler, dry_run=dry_run)
    upto: dict[TopicPartition, int] | None = None  # a dry run reads what is there
    if not dry_run:
        upto = await _last_offsets(
            bus,
            handler,
            topic_prefix=topic_prefix,
            group_prefix=group_prefix,
            limit=limit,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
        if not upto:
            log.info("replay_finished", handler=handler, dry_run=False, read=0, matched=0,
                     replayed=0)  # fmt: skip
            return summary

    async with _dead_letter_topic(bus, handler, topic_prefix, group_prefix) as sub:
        # Per partition: the next offset to commit while replayed records are contiguous.
        frontier: dict[TopicPartition, int] = {}
        blocked: set[TopicPartition] = set()

        async def commit() -> None:
            if frontier and not dry_run and frontier != summary.committed:
                await sub.commit(frontier)
                summary.committed = dict(frontier)

        fetches = fetch_pending(
            sub,
            limit=limit if upto is None else None,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
        try:
            async with aclosing(fetches):
                async for batch in fetches:
                    for message in batch:
                        last = None if upto is None else upto.get(message.tp)
                        if upto is not None and (last is None or message.offset > last):
                            upto.pop(message.tp, None)  # dead-lettered after the start
                            continue
                        summary.read += 1
                        letter = DeadLetter.from_message(message)
                        matches = (event_id is None or letter.event_id == event_id) and (
                            since is None or letter.failed_since(since)
                        )
                        if not matches:
                            blocked.add(message.tp)
                        else:
                            await _send(
                                bus,
                                message,
                                letter,
                                target=target,
                                summary=summary,
                                progress=progress,
                            )
                            if message.tp not in blocked and not dry_run:
                                frontier[message.tp] = message.offset + 1
                        if upto is not None and message.offset == last:
                            del upto[message.tp]  # this partition's are all sent
                    await commit()
                    if upto is not None and not upto:
                        break
        finally:
            await commit()
    if upto:  # the second reading ended early (a group join past timeout_s, say)
        summary.incomplete = sorted(f"{tp.topic}[{tp.partition}]" for tp in upto)
        log.warning(
            "replay_incomplete",
            handler=handler,
            partitions=summary.incomplete,
            hint="run the replay again: what was sent is committed",
        )
    log.info(
        "replay_finished",
        handler=handler,
        dry_run=dry_run,
        read=summary.read,
        matched=summary.matched,
        replayed=summary.replayed,
    )
    return summary


async def _send(
    bus: Bus,
    message: Message,
    letter: DeadLetter,
    *,
    target: str,
    summary: ReplaySummary,
    progress: Callable[[DeadLetter], object] | None,
) -> None:
    """Replay one matching dead letter (in a dry run, only count it)."""
    summary.matched += 1
    summary.event_ids.append(letter.event_id or "-")
    if progress is not None:
        progress(letter)
    if summary.dry_run:
        return
    await bus.publish(target, message.value, key=message.key, headers=letter.original_headers)
    summary.replayed += 1
    log.info(
        "dead_letter_replayed",
        handler=summary.handler,
        event_id=letter.event_id,
        offset=message.offset,
        target=target,
    )
