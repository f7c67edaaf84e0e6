"""The quarantine topic as a place people work in: list what waits there, release what
can now be routed.

Both read ``<prefix>quarantine`` in the consumer group ``<group prefix>quarantine-release``
(:func:`schemas.topics.quarantine_release_group`), whose committed offset separates the
records already released from those still waiting, so :func:`list_quarantined` shows what
:func:`release` would look at.

:func:`release` routes each chosen record again with the intake's own :func:`classify`
and today's settings (a stale event within a raised ``MAX_EVENT_AGE_S``, an event whose
topic may now be created). What still fails is not released and is returned with its
reason; what passes is published to its event topic with the headers the intake would
have written (its original ``received-at`` and signature) plus ``origin:
quarantine-release``, and then its offset is committed. Only a contiguous run is
committed: a record left in place keeps the released ones after it listed, and releasing
them again is harmless (the ledger turns an event already handled into a ``duplicate``).
``dry_run`` publishes and commits nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from bus.pending import fetch_pending, scan_pending, tail_pending
from bus.types import Bus, Message, Subscription, TopicPartition
from consumer.routing import Quarantined, Routed, classify, routed_headers
from schemas.errors import TopicMissing
from schemas.record import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGIN,
    HEADER_QUARANTINE_DETAIL,
    HEADER_QUARANTINE_REASON,
    HEADER_RECEIVED_AT,
    HEADER_SIGNATURE,
    ORIGIN_QUARANTINE_RELEASE,
    Headers,
    header,
    header_text,
)
from schemas.timestamps import parse_timestamp
from schemas.topics import quarantine_release_group, quarantine_topic, topic_for

log = structlog.get_logger("pubrelay.consumer.quarantine")


@dataclass(frozen=True, slots=True)
class QuarantinedRecord:
    """One record of the quarantine topic, its headers decoded."""

    message: Message
    reason: str | None
    detail: str | None
    event_id: str | None
    event_type: str | None
    received_at: datetime | None
    whole_size: int | None = None
    """The body's size when ``message.value`` is only its start (:func:`tail_quarantined`)."""

    @classmethod
    def from_message(cls, message: Message, whole_size: int | None = None) -> QuarantinedRecord:
        headers = message.headers
        return cls(
            message=message,
            reason=header_text(headers, HEADER_QUARANTINE_REASON),
            detail=header_text(headers, HEADER_QUARANTINE_DETAIL),
            event_id=header_text(headers, HEADER_EVENT_ID),
            event_type=header_text(headers, HEADER_EVENT_TYPE),
            received_at=parse_timestamp(header_text(headers, HEADER_RECEIVED_AT)),
            whole_size=whole_size,
        )

    @property
    def size_bytes(self) -> int:
        return len(self.message.value) if self.whole_size is None else self.whole_size

    def without_body(self) -> QuarantinedRecord:
        """The record with its headers and sizes, its body let go (for summaries)."""
        if not self.message.value:
            return self
        return dataclasses.replace(
            self, message=dataclasses.replace(self.message, value=b""), whole_size=self.size_bytes
        )


@dataclass(frozen=True, slots=True)
class Selection:
    """Which quarantined records a command looks at: all, some event ids, some reasons."""

    event_ids: Collection[str] = ()
    reasons: Collection[str] = ()

    def matches(self, record: QuarantinedRecord) -> bool:
        return (not self.event_ids or record.event_id in self.event_ids) and (
            not self.reasons or record.reason in self.reasons
        )


@dataclass(frozen=True, slots=True)
class Held:
    """A chosen record that still fails routing, and why: it stays in quarantine."""

    record: QuarantinedRecord
    reason: str
    detail: str


@dataclass(slots=True)
class ReleaseSummary:
    """What a release did (or, with ``dry_run``, would do)."""

    dry_run: bool
    read: int = 0
    released: list[QuarantinedRecord] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)


@asynccontextmanager
async def _quarantine(
    bus: Bus, topic_prefix: str, group_prefix: str
) -> AsyncIterator[Subscription]:
    sub = bus.subscribe(quarantine_release_group(group_prefix), [quarantine_topic(topic_prefix)])
    await sub.start()
    try:
        yield sub
    finally:
        await sub.close()


async def list_quarantined(
    bus: Bus,
    *,
    topic_prefix: str,
    group_prefix: str,
    selection: Selection = Selection(),
    keep: int | None = None,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> tuple[list[QuarantinedRecord], int]:
    """The first ``keep`` (all when ``None``) quarantined records the selection matches
    and not yet released (oldest first), without their bodies (``size_bytes`` is still
    the body's), and how many match in all; commits nothing. Memory is bounded by
    ``keep`` records' headers, however large the quarantine."""
    async with _quarantine(bus, topic_prefix, group_prefix) as sub:
        kept, total = await scan_pending(
            sub,
            keep=keep,
            max_value_bytes=0,
            accept=lambda m: selection.matches(QuarantinedRecord.from_message(m)),
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
    return [QuarantinedRecord.from_message(m, whole_size=size) for m, size in kept], total


async def tail_quarantined(
    bus: Bus,
    *,
    topic_prefix: str,
    group_prefix: str,
    keep: int,
    max_value_bytes: int,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> tuple[list[QuarantinedRecord], int]:
    """The last ``keep`` quarantined records not yet released, each body cut to
    ``max_value_bytes`` (``size_bytes`` is still the whole body's), and how many wait:
    what the console shows, in bounded memory however large the quarantine; commits
    nothing."""
    async with _quarantine(bus, topic_prefix, group_prefix) as sub:
        tail, total = await tail_pending(
            sub,
            keep=keep,
            max_value_bytes=max_value_bytes,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
    return [QuarantinedRecord.from_message(m, whole_size=size) for m, size in tail], total


def released_headers(record: QuarantinedRecord, routed: Routed) -> Headers:
    """The headers the intake writes for a routed event, from the quarantined record."""
    original = record.message.headers
    return (
        *routed_headers(
            routed,
            received_at=header(original, HEADER_RECEIVED_AT) or b"",
            signature=header(original, HEADER_SIGNATURE) or b"",
        ),
        (HEADER_ORIGIN, ORIGIN_QUARANTINE_RELEASE.encode()),
    )


async def release(
    bus: Bus,
    selection: Selection,
    *,
    topic_prefix: str,
    group_prefix: str,
    max_json_depth: int,
    max_event_age_s: float | None,
    dry_run: bool = False,
    now: datetime | None = None,
    timeout_s: float = 10.0,
    idle_timeout_s: float = 1.0,
) -> ReleaseSummary:
    """Route the selected quarantined records again; publish those that now pass.

    Records are read :data:`~bus.pending.SMALL_BATCH_RECORDS` at a time and let go, and
    the summary keeps them without their bodies: memory does not grow with the
    quarantine. What was released is committed after each fetch. Raises
    :class:`schemas.errors.BusUnavailable` when a publish fails; what was released before
    it is committed first, so running it again continues where it stopped.
    """
    summary = ReleaseSummary(dry_run=dry_run)
    releaser = _Releaser(
        bus,
        selection,
        summary,
        topic_prefix=topic_prefix,
        max_json_depth=max_json_depth,
        max_event_age_s=max_event_age_s,
        now=now,
    )
    async with _quarantine(bus, topic_prefix, group_prefix) as sub:
        try:
            async for batch in fetch_pending(
                sub,
                limit=None,
                timeout_s=timeout_s,
                idle_timeout_s=idle_timeout_s,
            ):
                summary.read += len(batch)
                for message in batch:
                    await releaser.one(message)
                await releaser.commit(sub)
        finally:
            await releaser.commit(sub)
    return summary


class _Releaser:
    """Routes quarantined records again one by one and publishes those that pass; the
    summary keeps each without its body. Per partition, the offset to commit advances
    over the records released while none before them was left in place."""

    def __init__(
        self,
        bus: Bus,
        selection: Selection,
        summary: ReleaseSummary,
        *,
        topic_prefix: str,
        max_json_depth: int,
        max_event_age_s: float | None,
        now: datetime | None,
    ) -> None:
        self.bus = bus
        self.selection = selection
        self.summary = summary
        self.topic_prefix = topic_prefix
        self.max_json_depth = max_json_depth
        self.max_event_age_s = max_event_age_s
        self.now = now
        self.frontier: dict[TopicPartition, int] = {}
        self.blocked: set[TopicPartition] = set()

    async def one(self, message: Message) -> None:
        record = QuarantinedRecord.from_message(message)
        decision = (
            classify(
                message.value,
                max_depth=self.max_json_depth,
                max_event_age_s=self.max_event_age_s,
                now=self.now,
            )
            if self.selection.matches(record)
            else None
        )
        if isinstance(decision, Quarantined):
            self.summary.held.append(Held(record.without_body(), decision.reason, decision.detail))
        if not isinstance(decision, Routed):
            self.blocked.add(message.tp)
            return
        if not self.summary.dry_run:
            try:
                await self.bus.publish(
                    topic_for(self.topic_prefix, decision.event_type),
                    message.value,
                    key=decision.key.encode(),
                    headers=released_headers(record, decision),
                )
            except TopicMissing as err:
                self.summary.held.append(Held(record.without_body(), "no_topic", str(err)))
                self.blocked.add(message.tp)
                return
            log.info(
                "quarantine_released",
                event_id=decision.event_id,
                event_type=decision.event_type,
                reason=record.reason,
                offset=message.offset,
            )
        self.summary.released.append(record.without_body())
        if message.tp not in self.blocked:
            self.frontier[message.tp] = message.offset + 1

    async def commit(self, sub: Subscription) -> None:
        """Commit what was released since the last commit (nothing in a dry run)."""
        if self.summary.dry_run or self.frontier == self.summary.committed:
            return
        await sub.commit(self.frontier)
        self.summary.committed = dict(self.frontier)
