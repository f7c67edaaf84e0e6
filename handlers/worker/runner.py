"""The consume loop: each enabled handler reads its topics in its own consumer group.

Per handler (:class:`HandlerRunner`):

* **Order and concurrency.** Records are dispatched into one lane per record key (the
  customer id): a lane handles its records strictly one after another; different lanes
  run concurrently, at most ``concurrency`` handler calls at once. A record without a key
  has a lane of its own. A lane that waits for a retry back-off holds no slot, so other
  customers go on; only the same customer's later events wait.
* **Offsets.** Per partition the runner keeps the fetched offsets in order and commits the
  first one not yet finished (handled, skipped, ignored, duplicate or dead-lettered):
  periodically, when partitions are revoked, and on shutdown. What was not committed is
  delivered again after a crash; the ledger turns those re-deliveries into ``duplicate``.
* **Outcomes.** See :mod:`handlers.types` for what ``handle`` may raise. A dead letter is
  the original record (value, key, headers) plus ``dlq-*`` headers, published to
  ``<prefix>dlq.<handler>``; while that publish fails the event stays unfinished, so the
  commit never passes it.
* **Broker and ledger errors** (fetch, commit, publish, ledger calls) are logged, counted
  in ``pubrelay_handler_bus_errors_total`` and retried with a capped back-off; they never
  end the loop and never count as handler attempts.
* **Topics.** A handler reads ``<prefix><event type>`` for each of its ``event_types``
  (an empty set: every event type with a model in :data:`schemas.events.DATA_MODELS`)
  plus its replay topic ``<prefix>retry.<handler>``. Records of other types that still
  reach it are committed as ``ignored`` without calling it.
* **Revoke** (a Kafka rebalance): records of the revoked partitions not yet started are
  skipped, a retry back-off on them ends at once (the event stays uncommitted: the new
  owner handles it), and only handler calls in progress are waited for, bounded by
  ``min(shutdown_timeout_s, revoke_timeout_s)`` (keep it below the group's rebalance
  timeout, 10 s by default); then their offsets are committed.
* **Shutdown.** When ``stop`` is set: fetching stops, events in a handler call finish (a
  pending retry back-off is abandoned: the event stays uncommitted and comes back, and
  so do the customer's later events: the lane stops there, so the order holds after the
  restart), all of it bounded by ``shutdown_timeout_s``; then the final commit; then the
  handlers are stopped in reverse start order.
* **Robustness.** A handler call is bounded by ``handler_timeout_s`` (a timeout is a
  transient failure). An unexpected error in the worker's own handling of an event is
  logged (``worker_lane_failed``) and the event is tried again after a capped back-off:
  it is never dropped and never stops its lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec
import structlog

from bus.types import Bus, Message, Subscription, TopicPartition
from handlers.config import HandlersSettings, LedgerSettings, WorkerSettings
from handlers.registry import build_handlers
from handlers.types import DLQ_HEADER_PREFIX, Event, Handler
from handlers.worker.ledger import Ledger, create_ledger
from handlers.worker.metrics import WorkerMetrics
from schemas.envelope import lean_decoder
from schemas.errors import PluginError, RetryLater, SkipEvent, TopicMissing
from schemas.masking import mask_emails
from schemas.record import HEADER_EVENT_ID, HEADER_EVENT_TYPE, Headers, header
from schemas.timestamps import parse_timestamp, utc_now_iso
from schemas.topics import consumer_group, dlq_topic, retry_topic, topic_for

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("pubrelay.handlers.worker")

T = TypeVar("T")

MAX_ERROR_CHARS: Final = 2000

# The dead-letter headers added to the original record's headers.
DLQ_ERROR: Final = "dlq-error"
DLQ_ERROR_TYPE: Final = "dlq-error-type"
DLQ_ATTEMPTS: Final = "dlq-attempts"
DLQ_FIRST_FAILED_AT: Final = "dlq-first-failed-at"
DLQ_LAST_FAILED_AT: Final = "dlq-last-failed-at"
DLQ_HANDLER: Final = "dlq-handler"
DLQ_SOURCE_TOPIC: Final = "dlq-source-topic"


def known_event_types() -> frozenset[str]:
    """Every event type pubrelay has a model for: what a handler with no filter reads."""
    from schemas.events import DATA_MODELS  # noqa: PLC0415 - the full models load on demand

    return frozenset(DATA_MODELS)


def handler_topics(
    handler: Handler, prefix: str, all_types: Collection[str] | None = None
) -> list[str]:
    """The topics a handler's consumer group reads (its event types and its replay topic)."""
    types = handler.event_types or frozenset(
        known_event_types() if all_types is None else all_types
    )
    return [topic_for(prefix, t) for t in sorted(types)] + [retry_topic(prefix, handler.name)]


def is_transient(err: BaseException) -> bool:
    """Whether a handler failure is retried: ``RetryLater``, ``retriable`` classes, I/O errors."""
    return isinstance(err, (RetryLater, OSError, TimeoutError)) or (
        getattr(type(err), "retriable", False) is True
    )


def _printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) as ``\\udxxx`` escapes.

    A handler's error message may quote customer data decoded from JSON, where a lone
    surrogate (``"\\ud83d"``) is valid; headers and JSON log lines must be UTF-8.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message(err: BaseException) -> str:
    """``str(err)``, printable; a plugin's exception whose ``__str__`` fails still has a name."""
    try:
        return _printable(str(err))
    except Exception:  # any failure of foreign code: describe it instead
        return f"<unprintable {type(err).__name__}>"


def _error_text(err: BaseException) -> str:
    # The dead-letter header is printed by `pubrelay dlq list`: no full customer address
    # (a pydantic error quotes the input, an SMTP reply the recipient).
    text = mask_emails(f"{type(err).__name__}: {_message(err)}")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _short_error(err: BaseException) -> str:
    """The error message for a log line: printable and at most 300 characters."""
    return _message(err)[:300]


def _error_type(err: BaseException) -> str:
    cls = type(err)
    return f"{cls.__module__}.{cls.__qualname__}"


def dead_letter_headers(
    original: Headers,
    *,
    error: str,
    error_type: str,
    attempts: int,
    first_failed_at: str,
    last_failed_at: str,
    handler: str,
    source_topic: str,
) -> Headers:
    """The original headers (any old ``dlq-*`` removed) plus this failure's ``dlq-*``.

    Values are UTF-8; what UTF-8 cannot encode (a lone surrogate quoted in an error
    message) becomes a ``\\udxxx`` escape instead of failing the dead letter.
    """
    kept = tuple((k, v) for k, v in original if not k.startswith(DLQ_HEADER_PREFIX))
    added = (
        (DLQ_ERROR, error),
        (DLQ_ERROR_TYPE, error_type),
        (DLQ_ATTEMPTS, str(attempts)),
        (DLQ_FIRST_FAILED_AT, first_failed_at),
        (DLQ_LAST_FAILED_AT, last_failed_at),
        (DLQ_HANDLER, handler),
        (DLQ_SOURCE_TOPIC, source_topic),
    )
    return (*kept, *((k, v.encode("utf-8", "backslashreplace")) for k, v in added))


class _Backoff:
    """Capped exponential back-off for broker and ledger errors."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.next_s = initial_s

    def reset(self) -> None:
        self.next_s = self.initial_s

    def step(self) -> float:
        delay = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return delay


@dataclass(slots=True)
class _Partition:
    """The fetched offsets of one partition in fetch order, and which are finished."""

    tp: TopicPartition
    offsets: deque[int] = field(default_factory=deque)
    finished: set[int] = field(default_factory=set)
    last: int = -1
    committed: int | None = None
    running: int = 0
    revoking: bool = False
    # Set with ``revoking``: ends a retry back-off (or ledger wait) on this partition at once.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, offset: int) -> None:
        self.offsets.append(offset)
        self.last = max(self.last, offset)

    def finish(self, offset: int) -> None:
        self.finished.add(offset)
        while self.offsets and self.offsets[0] in self.finished:
            self.finished.discard(self.offsets.popleft())

    def position(self) -> int | None:
        """The next offset to commit: the first unfinished one, else after the last fetched."""
        if self.offsets:
            return self.offsets[0]
        return self.last + 1 if self.last >= 0 else None


@dataclass(slots=True)
class _Item:
    message: Message
    part: _Partition


@dataclass(slots=True)
class _Identity:
    event_id: str
    event_type: str
    created_at: str | None


class _Unidentified(Exception):
    """The record has no event id or type: it cannot be routed or deduplicated."""


class HandlerRunner:
    """Consumes for one handler: fetch, dispatch into per-key lanes, retry, dead-letter, commit."""

    def __init__(
        self,
        handler: Handler,
        *,
        bus: Bus,
        ledger: Ledger,
        settings: WorkerSettings,
        topic_prefix: str,
        metrics: WorkerMetrics,
        stop: asyncio.Event,
        all_event_types: Collection[str] | None = None,
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self.bus = bus
        self.ledger = ledger
        self.settings = settings
        self.prefix = topic_prefix
        self.stop = stop
        self.topics = handler_topics(handler, topic_prefix, all_event_types)
        self.group = consumer_group(settings.group_prefix, self.name)
        self.dlq_topic = dlq_topic(topic_prefix, self.name)
        self.log = log.bind(handler=self.name)
        self._event_types = handler.event_types
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._lanes: dict[object, deque[_Item]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._active_ids: dict[str, asyncio.Event] = {}
        self._buffered = 0
        self._room = asyncio.Event()
        self._item_done = asyncio.Event()
        self._draining = False
        self._sub: Subscription | None = None
        self._metrics = metrics
        outcome = metrics.events
        self._m_handled = outcome.labels(self.name, "handled")
        self._m_retried = outcome.labels(self.name, "retried")
        self._m_dead = outcome.labels(self.name, "dead_lettered")
        self._m_skipped = outcome.labels(self.name, "skipped")
        self._m_duplicate = outcome.labels(self.name, "duplicate")
        self._m_ignored = outcome.labels(self.name, "ignored")
        self._m_duration = metrics.duration.labels(self.name)
        self._m_age = metrics.event_age.labels(self.name)
        self._m_in_flight = metrics.in_flight.labels(self.name)
        self._m_lag = metrics.lag.labels(self.name)

    # -- helpers ----------------------------------------------------------------------

    async def _sleep(self, delay_s: float, part: _Partition | None = None) -> bool:
        """Sleep unless ``stop`` (or ``part``'s revoke) comes first; whether the delay passed."""
        if self.stop.is_set() or (part is not None and part.revoked.is_set()):
            return False
        wakers = [asyncio.ensure_future(self.stop.wait())]
        if part is not None:
            wakers.append(asyncio.ensure_future(part.revoked.wait()))
        try:
            done, _ = await asyncio.wait(
                wakers, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waker in wakers:
                waker.cancel()
        return not done

    def _bus_error(self, operation: str, err: BaseException, delay_s: float) -> None:
        self._metrics.bus_errors.labels(self.name, operation).inc()
        self.log.warning(
            "worker_bus_error",
            operation=operation,
            error_type=type(err).__name__,
            error=_short_error(err),
            retry_in_s=round(delay_s, 3),
        )

    async def _keep_trying(
        self,
        operation: str,
        fn: Callable[[], Awaitable[T]],
        *,
        give_up_on_stop: bool,
        part: _Partition | None = None,
    ) -> tuple[bool, T | None]:
        """Run ``fn`` until it succeeds; with ``give_up_on_stop``, return (False, None) on stop
        (or when ``part`` is revoked).

        Without it the loop only ends by success or by cancellation (the shutdown bound).
        """
        backoff = _Backoff(self.settings.bus_backoff_initial_s, self.settings.bus_backoff_max_s)
        while True:
            try:
                return True, await fn()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any broker / ledger failure: back off and retry
                delay = backoff.step()
                self._bus_error(operation, err, delay)
                if give_up_on_stop:
                    if not await self._sleep(delay, part):
                        return False, None
                else:
                    await asyncio.sleep(delay)

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop`` is set, then drain, commit and close the subscription."""
        sub = await self._subscribe()
        if sub is None:
            return
        self.log.info("worker_consuming", group=self.group, topics=self.topics)
        try:
            await self._fetch_loop(sub)
        finally:
            await self._drain()
            await self._shut(sub)

    async def _shut(self, sub: Subscription) -> None:
        """The final commit, then closing the subscription; an error is logged, not raised."""
        steps: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
            ("final_commit", lambda: self._commit(sub)),
            ("close", sub.close),
        )
        for operation, step in steps:
            try:
                await step()
            except Exception as err:  # shutting down anyway: the log says what was lost
                self.log.error(
                    "worker_shutdown_error",
                    operation=operation,
                    error_type=type(err).__name__,
                    error=_short_error(err),
                )
        self._sub = None
        self.log.info("worker_stopped", group=self.group)

    async def _subscribe(self) -> Subscription | None:
        async def ensure() -> None:
            try:
                await self.bus.ensure_topics([*self.topics, self.dlq_topic])
            except TopicMissing as err:
                # Reading a missing topic just waits; publishing dead letters will back off.
                self.log.error("worker_topic_missing", error=str(err))

        ok, _ = await self._keep_trying("fetch", ensure, give_up_on_stop=True)
        if not ok:
            return None
        sub = self.bus.subscribe(self.group, self.topics, on_revoke=self._on_revoke)
        ok, _ = await self._keep_trying("fetch", sub.start, give_up_on_stop=True)
        if not ok:
            return None
        self._sub = sub
        return sub

    async def _fetch_loop(self, sub: Subscription) -> None:
        settings = self.settings
        backoff = _Backoff(settings.bus_backoff_initial_s, settings.bus_backoff_max_s)
        next_commit = time.monotonic() + settings.commit_interval_s
        next_lag = time.monotonic()
        while not self.stop.is_set():
            room = settings.max_buffered - self._buffered
            if room <= 0:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), settings.commit_interval_s)
            else:
                try:
                    messages = await sub.fetch(
                        max_records=min(room, settings.fetch_max_records),
                        timeout_s=settings.fetch_timeout_s,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # broker errors never end the loop
                    delay = backoff.step()
                    self._bus_error("fetch", err, delay)
                    await self._sleep(delay)
                    continue
                backoff.reset()
                if self.stop.is_set():
                    break  # not dispatched, not committed: delivered again after the restart
                for message in messages:
                    self._dispatch(message)
            now = time.monotonic()
            if now >= next_commit:
                await self._commit(sub)
                next_commit = now + settings.commit_interval_s
            if now >= next_lag:
                await self._update_lag(sub)
                next_lag = now + settings.lag_interval_s

    async def _update_lag(self, sub: Subscription) -> None:
        try:
            lag = await sub.lag()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a gauge refresh is best effort
            self._bus_error("lag", err, self.settings.lag_interval_s)
            return
        self._m_lag.set(sum(lag.values()))

    async def _commit(self, sub: Subscription, only: Collection[_Partition] | None = None) -> bool:
        """Commit each partition's first unfinished offset when it moved; False on failure."""
        parts = self._parts.values() if only is None else only
        offsets: dict[TopicPartition, int] = {}
        for part in parts:
            position = part.position()
            if position is not None and position != part.committed:
                offsets[part.tp] = position
        if not offsets:
            return True
        try:
            await sub.commit(offsets)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # retried at the next interval
            self._bus_error("commit", err, self.settings.commit_interval_s)
            return False
        for part in parts:
            if part.tp in offsets:
                part.committed = offsets[part.tp]
        return True

    async def _on_revoke(self, tps: Collection[TopicPartition]) -> None:
        """Finish the handler calls in progress on the revoked partitions, commit, forget them.

        Records not yet started are skipped and retry back-offs end at once (those events
        stay uncommitted: the new owner handles them). The wait is bounded by
        ``min(shutdown_timeout_s, revoke_timeout_s)``: the consumer group waits for this
        callback only up to its rebalance timeout, after which it moves on without us.
        """
        parts = [self._parts[tp] for tp in tps if tp in self._parts]
        if not parts:
            return
        for part in parts:
            part.revoking = True  # lanes skip their records not yet started
            part.revoked.set()  # back-offs on these partitions end now
        settings = self.settings
        deadline = time.monotonic() + min(settings.shutdown_timeout_s, settings.revoke_timeout_s)
        while any(p.running for p in parts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._item_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._item_done.wait(), remaining)
        if self._sub is not None:
            await self._commit(self._sub, parts)
        for part in parts:
            self._parts.pop(part.tp, None)
        self.log.info("worker_partitions_revoked", partitions=len(parts))

    # -- lanes ------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        part = self._parts.get(message.tp)
        if part is None:
            part = self._parts[message.tp] = _Partition(message.tp)
        part.add(message.offset)
        self._buffered += 1
        item = _Item(message, part)
        lane_key: object = message.key if message.key is not None else object()
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(item)
            return
        lane = self._lanes[lane_key] = deque([item])
        task = asyncio.create_task(self._run_lane(lane_key, lane), name=f"lane-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._lane_ended)

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            # _run_lane catches everything; this would be a bug in the lane itself.
            self.log.error(
                "worker_lane_crashed",
                error_type=type(err).__name__,
                error=_short_error(err),
                exc_info=err,
            )

    async def _run_lane(self, lane_key: object, lane: deque[_Item]) -> None:
        """Handle the lane's records one after another until it is empty.

        A record whose handling fails unexpectedly stays at the head and is tried again
        after a capped back-off. A record abandoned on stop ends the lane: the customer's
        later records must not run before it (they all come back after the restart).
        """
        backoff = _Backoff(self.settings.bus_backoff_initial_s, self.settings.bus_backoff_max_s)
        try:
            while lane and not self._draining and not self.stop.is_set():
                item = lane[0]
                part = item.part
                if not part.revoking:
                    failed: Exception | None = None
                    part.running += 1
                    try:
                        finished = await self._process(item)
                    except Exception as err:  # never drop the record, never end the lane
                        failed, finished = err, False
                    finally:
                        part.running -= 1
                        self._item_done.set()
                    if failed is not None:
                        delay = backoff.step()
                        self._lane_failed(item, failed, delay)
                        await self._sleep(delay, part)
                        continue  # the same record again (unless stopping or revoked)
                    backoff.reset()
                    if finished:
                        part.finish(item.message.offset)
                    elif not part.revoking:
                        break  # abandoned on stop: the rest of the lane waits for it
                lane.popleft()
                self._buffered -= 1
                self._room.set()
        finally:
            self._lanes.pop(lane_key, None)

    def _lane_failed(self, item: _Item, err: Exception, delay_s: float) -> None:
        message = item.message
        fields = {
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "error_type": type(err).__name__,
            "error": _short_error(err),
            "retry_in_s": round(delay_s, 3),
        }
        try:
            self.log.error("worker_lane_failed", exc_info=err, **fields)
        except Exception:  # the traceback itself may not render (undecodable text)
            with contextlib.suppress(Exception):
                self.log.error("worker_lane_failed", **fields)

    async def _drain(self) -> None:
        """Let running handler calls finish within ``shutdown_timeout_s``; cancel the rest."""
        self._draining = True
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning("worker_shutdown_timeout", abandoned=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    # -- one event --------------------------------------------------------------------

    def _identify(self, message: Message) -> _Identity:
        event_id = header(message.headers, HEADER_EVENT_ID)
        event_type = header(message.headers, HEADER_EVENT_TYPE)
        created_at: str | None = None
        try:
            lean = lean_decoder.decode(message.value)
        except msgspec.DecodeError:
            lean = None
        if lean is not None:
            created_at = lean.event.created_at
        if event_id:
            ident = event_id.decode("utf-8", "replace")
        elif lean is not None and lean.event.id:
            ident = lean.event.id
        else:
            raise _Unidentified("the record has no event id (no event-id header, no event.id)")
        if event_type:
            kind = event_type.decode("utf-8", "replace")
        elif lean is not None and lean.event.type:
            kind = lean.event.type
        else:
            raise _Unidentified("the record has no event type (no event-type header)")
        return _Identity(ident, kind, created_at)

    async def _process(self, item: _Item) -> bool:
        """Handle one record to a final outcome; False when abandoned (shutdown, revoke)."""
        message = item.message
        try:
            ident = self._identify(message)
        except _Unidentified as err:
            return await self._dead_letter(item, None, err, attempts=0, first_failed_at=None)
        if self._event_types and ident.event_type not in self._event_types:
            self._m_ignored.inc()
            return True
        # Two deliveries of one event in different lanes (no key): one after the other.
        while (other := self._active_ids.get(ident.event_id)) is not None:
            await other.wait()
        mine = self._active_ids[ident.event_id] = asyncio.Event()
        try:
            return await self._attempts(item, ident)
        finally:
            del self._active_ids[ident.event_id]
            mine.set()

    async def _attempts(self, item: _Item, ident: _Identity) -> bool:
        ok, done = await self._keep_trying(
            "ledger",
            lambda: self.ledger.is_done(self.name, ident.event_id),
            give_up_on_stop=True,
            part=item.part,
        )
        if not ok:
            return False
        if done:
            self._m_duplicate.inc()
            self.log.info("event_duplicate", event_id=ident.event_id, event_type=ident.event_type)
            return True
        message = item.message
        event = Event(
            id=ident.event_id,
            type=ident.event_type,
            raw=message.value,
            headers=message.headers,
            key=message.key,
            attempt=0,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
        )
        first_failed_at: str | None = None
        max_attempts = self.settings.max_attempts
        while True:
            if item.part.revoking:
                return False  # no longer ours: the new owner handles it (uncommitted)
            event.attempt += 1
            error = await self._call(event)
            if error is None or isinstance(error, SkipEvent):
                return await self._completed(event, ident, error)
            first_failed_at = first_failed_at or utc_now_iso()
            if not is_transient(error) or event.attempt >= max_attempts:
                return await self._dead_letter(
                    item, ident, error, attempts=event.attempt, first_failed_at=first_failed_at
                )
            if item.part.revoking:
                return False
            delay = self._retry_delay(event.attempt, error)
            self._m_retried.inc()
            self.log.warning(
                "event_retry_scheduled",
                event_id=ident.event_id,
                event_type=ident.event_type,
                attempt=event.attempt,
                retry_in_s=round(delay, 3),
                error_type=type(error).__name__,
                error=_short_error(error),
            )
            if not await self._sleep(delay, item.part):
                return False  # stopping or revoked: the event stays uncommitted, comes back

    async def _call(self, event: Event) -> Exception | None:
        """One handler call within a concurrency slot; the exception it raised, if any.

        A call over ``handler_timeout_s`` is cancelled and counts as a transient failure, and
        so does a ``CancelledError`` the handler raised while this lane was not cancelled
        (say a shared future some library cancelled): only our own cancellation propagates.
        """
        timeout_s = self.settings.handler_timeout_s or None
        async with self._slots:
            self._m_in_flight.inc()
            started = time.perf_counter()
            bound = asyncio.timeout(timeout_s)
            try:
                async with bound:
                    await self.handler.handle(event)
            except asyncio.CancelledError as err:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the lane is being cancelled (shutdown bound)
                retry = RetryLater(f"the handler raised CancelledError: {_message(err)}")
                retry.__cause__ = err
                return retry
            except TimeoutError as err:
                if bound.expired():
                    return TimeoutError(f"the handler call took more than {timeout_s} s")
                return err
            except Exception as err:  # classified by the caller
                return err
            finally:
                self._m_duration.observe(time.perf_counter() - started)
                self._m_in_flight.dec()
        return None

    def _retry_delay(self, attempt: int, error: Exception) -> float:
        settings = self.settings
        if isinstance(error, RetryLater) and error.delay_s is not None:
            return min(max(error.delay_s, 0.0), settings.retry_max_delay_s)
        delay = min(settings.retry_max_delay_s, settings.retry_base_delay_s * 2.0 ** (attempt - 1))
        jitter = settings.retry_jitter * random.random()  # noqa: S311 - jitter, not security
        return delay * (1 - jitter)

    async def _completed(self, event: Event, ident: _Identity, skip: SkipEvent | None) -> bool:
        # The effect is done: record it even while shutting down (bounded by the drain).
        await self._keep_trying(
            "ledger",
            lambda: self.ledger.mark_done(self.name, ident.event_id),
            give_up_on_stop=False,
        )
        if skip is not None:
            self._m_skipped.inc()
            self.log.info(
                "event_skipped",
                event_id=ident.event_id,
                event_type=ident.event_type,
                reason=_short_error(skip),
            )
            return True
        self._m_handled.inc()
        age = self._age_s(event, ident)
        if age is not None:
            self._m_age.observe(age)
        self.log.info(
            "event_handled",
            event_id=ident.event_id,
            event_type=ident.event_type,
            attempt=event.attempt,
        )
        return True

    @staticmethod
    def _age_s(event: Event, ident: _Identity) -> float | None:
        created: datetime | None = None
        if event.parsed:
            value = getattr(getattr(event.envelope, "event", None), "created_at", None)
            if isinstance(value, datetime):
                created = value
        if created is None:
            created = parse_timestamp(ident.created_at)
        if created is None:
            return None
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return max(0.0, (datetime.now(UTC) - created).total_seconds())

    async def _dead_letter(
        self,
        item: _Item,
        ident: _Identity | None,
        error: Exception,
        *,
        attempts: int,
        first_failed_at: str | None,
    ) -> bool:
        message = item.message
        now = utc_now_iso()
        headers = dead_letter_headers(
            message.headers,
            error=_error_text(error),
            error_type=_error_type(error),
            attempts=attempts,
            first_failed_at=first_failed_at or now,
            last_failed_at=now,
            handler=self.name,
            source_topic=message.topic,
        )

        async def publish() -> None:
            await self.bus.publish(self.dlq_topic, message.value, key=message.key, headers=headers)

        # Not committed past this event until the dead letter is stored (bounded by the drain).
        await self._keep_trying("publish_dlq", publish, give_up_on_stop=False)
        self._m_dead.inc()
        self.log.error(
            "event_dead_lettered",
            event_id=ident.event_id if ident else None,
            event_type=ident.event_type if ident else None,
            attempts=attempts,
            error_type=type(error).__name__,
            error=_short_error(error),
            permanent=not is_transient(error),
            dlq_topic=self.dlq_topic,
        )
        return True


class Worker:
    """Runs every handler's :class:`HandlerRunner` side by side until ``stop`` is set."""

    def __init__(
        self,
        handlers: Sequence[Handler],
        *,
        bus: Bus,
        ledger: Ledger,
        settings: WorkerSettings,
        topic_prefix: str,
        metrics_registry: CollectorRegistry,
        all_event_types: Collection[str] | None = None,
    ) -> None:
        names = [h.name for h in handlers]
        if len(set(names)) != len(names):
            raise PluginError(f"handler names must be unique, got {names}")
        self.handlers = list(handlers)
        self.bus = bus
        self.ledger = ledger
        self.settings = settings
        self.topic_prefix = topic_prefix
        self.metrics = WorkerMetrics(metrics_registry)
        self.metrics.declare(names)
        self.all_event_types = all_event_types

    async def run_until_stopped(self, stop: asyncio.Event) -> None:
        """Start the handlers, consume until ``stop`` is set, drain, commit, stop them."""
        started: list[Handler] = []
        try:
            for handler in self.handlers:
                try:
                    await handler.start()
                except Exception as err:
                    raise PluginError(
                        f"handler {handler.name!r} failed to start: {type(err).__name__}: {err}"
                    ) from err
                started.append(handler)
            runners = [
                HandlerRunner(
                    handler,
                    bus=self.bus,
                    ledger=self.ledger,
                    settings=self.settings,
                    topic_prefix=self.topic_prefix,
                    metrics=self.metrics,
                    stop=stop,
                    all_event_types=self.all_event_types,
                )
                for handler in self.handlers
            ]
            log.info("worker_started", handlers=[h.name for h in self.handlers])
            if not runners:
                log.warning("worker_no_handlers")
                await stop.wait()
            async with asyncio.TaskGroup() as group:
                for runner in runners:
                    group.create_task(runner.run(), name=f"runner-{runner.name}")
        finally:
            for handler in reversed(started):
                try:
                    await handler.stop()
                except Exception as err:  # one failing stop must not keep others running
                    log.error(
                        "handler_stop_failed",
                        handler=handler.name,
                        error_type=type(err).__name__,
                        error=_short_error(err),
                    )
            log.info("worker_finished")


async def run_worker(
    *,
    bus: Bus,
    handlers: HandlersSettings,
    worker: WorkerSettings,
    ledger: LedgerSettings,
    data_dir: Path,
    topic_prefix: str,
    metrics_registry: CollectorRegistry,
    stop: asyncio.Event,
    env: Mapping[str, str] | None = None,
) -> None:
    """Everything ``pubrelay worker`` / ``pubrelay serve`` need: load the enabled plugins,
    open the ledger, run until ``stop`` is set, close the ledger.

    The bus must be started (and is closed) by the caller, who may share it with the web
    app. Raises :class:`schemas.errors.PluginError` / ``ConfigError`` before consuming
    anything when a plugin is unknown, broken or misconfigured.
    """
    store = create_ledger(ledger, data_dir)
    built = build_handlers(
        handlers.enabled,
        data_dir=data_dir,
        metrics_registry=metrics_registry,
        topic_prefix=topic_prefix,
        env=env,
        ledger=store,
    )
    await store.open()
    try:
        await Worker(
            built,
            bus=bus,
            ledger=store,
            settings=worker,
            topic_prefix=topic_prefix,
            metrics_registry=metrics_registry,
        ).run_until_stopped(stop)
    finally:
        await store.close()
