"""Feeds the event index from the intake and the worker, off their paths.

:class:`IndexRecorder` is both the intake's :class:`consumer.observer.IntakeObserver` and
the worker's :class:`handlers.worker.observer.AttemptObserver`: each call appends one
entry to a bounded queue and returns (no parsing, no I/O, no await). A background task
takes what is queued every ``FLUSH_EVERY_S`` (or sooner once ``FLUSH_AT`` entries wait),
reads the new bodies' fields (msgspec, ``pubrelay/console/fields.py``) a chunk at a time, and
writes one transaction. When the queue is full (``queue_max`` entries, or bodies of
``QUEUE_BYTES_MAX`` bytes in all: each entry holds its body until it is written) new
entries are dropped and counted (``dropped``): the index is a view for people; the bus,
the ledger and the dead-letter topics stay the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, Unpack

import structlog

from bus.types import Message
from handlers.worker.observer import AttemptFacts
from pubrelay.console.fields import read_fields
from pubrelay.console.index import Attempt, Batch, Delivery, EventIndex, NewEvent
from schemas.masking import mask_emails
from schemas.record import (
    HEADER_DELIVERY_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_RECEIVED_AT,
    Headers,
    header_text,
)
from schemas.timestamps import parse_timestamp

log = structlog.get_logger("pubrelay.console.index")

FLUSH_EVERY_S: Final = 0.5
FLUSH_AT: Final = 2000
QUEUE_BYTES_MAX: Final = 64 * 1024 * 1024
"""The bodies the queue holds at most: 10,000 entries of 1 MiB bodies (signed large
deliveries while an index write waits) would be 10 GB."""
_CHUNK: Final = 200
_KNOWN_MAX: Final = 4096
"""Event ids this process already indexed: their bodies are not read again."""


@dataclass(frozen=True, slots=True)
class _Received:
    topic: str
    headers: Headers
    body: bytes
    status: int
    outcome: str
    at: float


@dataclass(frozen=True, slots=True)
class _Attempted:
    handler: str
    message: Message
    event_id: str
    outcome: str
    attempt: int
    detail: str
    at: float


MAX_ID_CHARS: Final = 200
"""An id as indexed (event, delivery): the delivery's and the attempts' the same cut, so
one event's timeline is one, however long its id."""


def _text(headers: Headers, name: str) -> str:
    return (header_text(headers, name) or "")[:MAX_ID_CHARS]


def _received_at(headers: Headers, default: float) -> float:
    stamp = parse_timestamp(_text(headers, HEADER_RECEIVED_AT) or None)
    return stamp.timestamp() if stamp is not None else default


class IndexRecorder:
    def __init__(
        self, index: EventIndex, *, queue_max: int, queue_bytes_max: int = QUEUE_BYTES_MAX
    ) -> None:
        self.index = index
        self.dropped = 0
        """Entries dropped since start (the queue was full)."""
        self._dropped_logged = 0
        self._queue: deque[_Received | _Attempted] = deque()
        self._queue_max = queue_max
        self._queue_bytes_max = queue_bytes_max
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._known: OrderedDict[str, None] = OrderedDict()  # in the index already

    def _put(self, entry: _Received | _Attempted, size: int) -> None:
        if len(self._queue) >= self._queue_max or self._queued_bytes + size > self._queue_bytes_max:
            self.dropped += 1
            return
        self._queue.append(entry)
        self._queued_bytes += size
        if len(self._queue) >= FLUSH_AT:
            self._wake.set()

    def received(
        self, *, topic: str, headers: Headers, body: bytes, status: int, outcome: str
    ) -> None:
        self._put(_Received(topic, headers, body, status, outcome, time.time()), len(body))

    def attempted(self, handler: str, message: Message, **facts: Unpack[AttemptFacts]) -> None:
        if event_id := facts["event_id"]:
            entry = _Attempted(
                handler,
                message,
                event_id[:MAX_ID_CHARS],
                facts["outcome"],
                facts["attempt"],
                facts.get("detail") or "",
                time.time(),
            )
            self._put(entry, len(message.value))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[IndexRecorder]:
        """Flush in the background until the block ends, then write what is left."""
        task = asyncio.create_task(self._run(), name="event-index")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write what is queued now, in one transaction; a failure is logged, not raised."""
        if not self._queue:
            return
        entries = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        try:
            # Read on the loop, a chunk at a time: a worker thread would only contend for
            # the GIL with the loop (more CPU per request, measured), and the chunks keep
            # each step short for the requests in flight.
            batch = Batch()
            new: set[str] = set()  # the events this batch adds
            for start in range(0, len(entries), _CHUNK):
                self._add(batch, entries[start : start + _CHUNK], new)
                await asyncio.sleep(0)
            await self.index.write(batch)
            # Known once written: a batch that failed leaves its events to later entries.
            for event in batch.events:
                self._known[event.event_id] = None
            while len(self._known) > _KNOWN_MAX:
                self._known.popitem(last=False)
        except Exception as err:  # the index is a view: the intake and worker go on
            log.warning(
                "event_index_write_failed",
                entries=len(entries),
                error_type=type(err).__name__,
                error=mask_emails(str(err), max_chars=200),
            )
        if self.dropped > self._dropped_logged:
            log.warning("event_index_entries_dropped", dropped=self.dropped - self._dropped_logged)
            self._dropped_logged = self.dropped

    def _add(self, batch: Batch, entries: list[_Received | _Attempted], new: set[str]) -> None:
        """Add these entries to ``batch`` (reading the fields of bodies not seen yet)."""
        for entry in entries:
            if isinstance(entry, _Received):
                event_id = _text(entry.headers, HEADER_EVENT_ID)
                delivery_id = _text(entry.headers, HEADER_DELIVERY_ID)
                batch.deliveries.append(
                    Delivery(
                        event_id, delivery_id, entry.at, entry.topic, entry.status, entry.outcome
                    )
                )
                if event_id and entry.status < 300:
                    self._new_event(batch, event_id, entry.headers, entry.body, entry.at, new=new)
            else:
                m = entry.message
                self._new_event(batch, entry.event_id, m.headers, m.value, entry.at, new=new)
                batch.attempts.append(
                    Attempt(
                        entry.event_id,
                        entry.handler,
                        entry.at,
                        entry.attempt,
                        entry.outcome,
                        entry.detail,
                        m.topic,
                        m.partition,
                        m.offset,
                    )
                )

    def _new_event(
        self,
        batch: Batch,
        event_id: str,
        headers: Headers,
        body: bytes,
        at: float,
        *,
        new: set[str],
    ) -> None:
        if event_id in self._known or event_id in new:
            return
        new.add(event_id)
        fields, terms = read_fields(body)
        batch.events.append(
            NewEvent(
                event_id,
                _text(headers, HEADER_EVENT_TYPE),
                _received_at(headers, at),
                fields,
                body,
                terms,
            )
        )
