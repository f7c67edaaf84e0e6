"""The consume loop of one handler: fetch, per-key lanes, commit, revoke, drain.

Each enabled handler reads its topics in its own consumer group (:class:`HandlerRunner`);
what happens to one record is :mod:`handlers.worker.attempts`.

* **Topics.** A handler reads ``<prefix><event type>`` for each of its ``event_types``
  (an empty set: every event type with a model in :data:`schemas.events.DATA_MODELS`)
  plus its replay topic ``<prefix>retry.<handler>``. Records of other types that still
  reach it are committed as ``ignored`` without calling it.
* **Order and concurrency.** Records are dispatched into one lane per record key (the
  customer id): a lane handles its records strictly one after another; different lanes
  run concurrently, at most ``concurrency`` handler calls at once. A record without a key
  has a lane of its own. A lane that waits for a retry back-off holds no slot, so other
  customers go on; only the same customer's later events wait. A handler that raised
  ``RetryLater(keep_order=False)`` (waiting for one of those later events) steps out: its
  record waits for its retry in a lane of its own, uncommitted, and the lane goes on.
* **Back-pressure.** At most ``max_buffered`` records are held: fetched and not yet
  committable (waiting in a lane, or finished behind an unfinished record of their
  partition). At the bound fetching pauses until the oldest ones can be committed, so an
  event stuck in a long retry holds back at most that many records (memory, and what a
  restart replays); ``pubrelay_handler_oldest_uncommitted_age_seconds`` shows the wait.
  One bound for both, as they are the same records; the handler's other partitions wait too.
* **Offsets** (:mod:`handlers.worker.offsets`) are committed periodically
  (``commit_interval_s``), when partitions are revoked, and on shutdown.
* **Broker errors** while fetching, committing or reading the lag are backed off and the
  loop goes on (:mod:`handlers.worker.retry`).
* **Revoke** (a Kafka rebalance): records of the revoked partitions not yet started are
  skipped, a retry back-off on them ends at once (the event stays uncommitted: the new
  owner handles it), and only handler calls in progress are waited for, bounded by
  ``min(shutdown_timeout_s, revoke_timeout_s)`` (keep it below the group's rebalance
  timeout, 10 s by default); then their offsets are committed.
* **Shutdown.** When ``stop`` is set: fetching stops, events in a handler call finish (a
  pending retry back-off is abandoned: the event stays uncommitted and comes back, and
  so do the customer's later events: the lane stops there, so the order holds after the
  restart), all of it bounded by ``shutdown_timeout_s``; then the final commit.
* **Robustness.** An unexpected error in the worker's own handling of an event is logged
  (``worker_lane_failed``) and the event is tried again after a capped back-off: it is
  never dropped and never stops its lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection

import structlog

from bus.types import Bus, Message, Subscription, TopicPartition
from handlers.config import WorkerSettings
from handlers.types import Handler
from handlers.worker.attempts import EventProcessor, SteppedAside
from handlers.worker.error_text import short_error
from handlers.worker.ledger import Ledger
from handlers.worker.metrics import WorkerMetrics
from handlers.worker.observer import AttemptObserver
from handlers.worker.offsets import FetchedRecord, Partition, commit_positions
from handlers.worker.retry import Backoff, BusRetry, pause
from schemas.errors import TopicMissing
from schemas.topics import consumer_group, dlq_topic, retry_topic, topic_for

log = structlog.get_logger("pubrelay.handlers.worker")


def known_event_types() -> frozenset[str]:
    """Every event type pubrelay has a model for: what a handler with no filter reads."""
    from schemas.events import DATA_MODELS  # noqa: PLC0415 - the full models load on demand

    return frozenset(DATA_MODELS)


def handler_topics(handler: Handler, prefix: str) -> list[str]:
    """The topics a handler's consumer group reads (its event types and its replay topic)."""
    types = handler.event_types or known_event_types()
    return [topic_for(prefix, t) for t in sorted(types)] + [retry_topic(prefix, handler.name)]


class HandlerRunner:
    """Consumes for one handler: fetch, dispatch into per-key lanes, commit, drain."""

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
        observer: AttemptObserver | None = None,
    ) -> None:
        self.handler = handler
        self.name = handler.name
        self.bus = bus
        self.settings = settings
        self.prefix = topic_prefix
        self.stop = stop
        self.topics = handler_topics(handler, topic_prefix)
        self.group = consumer_group(settings.group_prefix, self.name)
        self.dlq_topic = dlq_topic(topic_prefix, self.name)
        self.log = log.bind(handler=self.name)
        self._retry = BusRetry(
            self.name, settings=settings, metrics=metrics, stop=stop, log=self.log
        )
        self._events = EventProcessor(
            handler,
            bus=bus,
            ledger=ledger,
            settings=settings,
            dlq_topic=self.dlq_topic,
            metrics=metrics,
            retry=self._retry,
            stop=stop,
            log=self.log,
            observer=observer,
        )
        self._lanes: dict[object, deque[FetchedRecord]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._parts: dict[TopicPartition, Partition] = {}
        self._buffered = 0
        self._room = asyncio.Event()
        self._item_done = asyncio.Event()
        self._draining = False
        self._sub: Subscription | None = None
        self._m_lag = metrics.lag.labels(self.name)
        self.caught_up = asyncio.Event()
        """Set at the first lag report that finds nothing left uncommitted."""
        self._m_oldest = metrics.oldest_uncommitted.labels(self.name)

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

    async def _subscribe(self) -> Subscription | None:
        """Create the topics and join the group; None when stopped before that succeeded."""

        async def ensure() -> None:
            try:
                await self.bus.ensure_topics([*self.topics, self.dlq_topic])
            except TopicMissing as err:
                # Reading a missing topic just waits; publishing dead letters will back off.
                self.log.error("worker_topic_missing", error=str(err))

        ok, _ = await self._retry.keep_trying("fetch", ensure, give_up_on_stop=True)
        if not ok:
            return None
        sub = self.bus.subscribe(self.group, self.topics, on_revoke=self._on_revoke)
        ok, _ = await self._retry.keep_trying("fetch", sub.start, give_up_on_stop=True)
        if not ok:
            return None
        self._sub = sub
        return sub

    async def _fetch_loop(self, sub: Subscription) -> None:
        settings = self.settings
        backoff = self._retry.backoff()
        next_commit = time.monotonic() + settings.commit_interval_s
        next_lag = time.monotonic()
        while not self.stop.is_set():
            room = settings.max_buffered - self._held()
            if room <= 0:
                await self._wait_for_room()
            else:
                messages = await self._fetch(sub, room, backoff)
                if messages is None:
                    continue  # a broker error, backed off
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

    def _held(self) -> int:
        """Records fetched and not yet committable: in lanes, or finished behind a gap."""
        return self._buffered + sum(p.held_finished for p in self._parts.values())

    async def _wait_for_room(self) -> None:
        """Back-pressure: wait (at most a commit interval) for a lane to finish a record."""
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), self.settings.commit_interval_s)

    async def _fetch(self, sub: Subscription, room: int, backoff: Backoff) -> list[Message] | None:
        """Up to ``room`` records; None after a broker error (reported and backed off)."""
        try:
            messages = await sub.fetch(
                max_records=min(room, self.settings.fetch_max_records),
                timeout_s=self.settings.fetch_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as err:  # broker errors never end the loop
            delay = backoff.step()
            self._retry.report("fetch", err, delay)
            await pause(delay, self.stop)
            return None
        backoff.reset()
        return messages

    async def _update_lag(self, sub: Subscription) -> None:
        now = time.monotonic()
        self._m_oldest.set(max((p.oldest_age_s(now) for p in self._parts.values()), default=0))
        try:
            lag = await sub.lag()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a gauge refresh is best effort
            self._retry.report("lag", err, self.settings.lag_interval_s)
            return
        behind = sum(lag.values())
        self._m_lag.set(behind)
        if lag and not behind:  # {}: a Kafka member still joining, or holding no partition
            self.caught_up.set()

    async def _commit(self, sub: Subscription, only: Collection[Partition] | None = None) -> bool:
        """Commit each partition's first unfinished offset when it moved; False on failure."""
        parts = self._parts.values() if only is None else only
        offsets = commit_positions(parts)
        if not offsets:
            return True
        try:
            await sub.commit(offsets)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # retried at the next interval
            self._retry.report("commit", err, self.settings.commit_interval_s)
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
            part.revoke()
        settings = self.settings
        await self._wait_until_idle(
            parts, time.monotonic() + min(settings.shutdown_timeout_s, settings.revoke_timeout_s)
        )
        if self._sub is not None:
            await self._commit(self._sub, parts)
        for part in parts:
            self._parts.pop(part.tp, None)
        self.log.info("worker_partitions_revoked", partitions=len(parts))

    async def _wait_until_idle(self, parts: Collection[Partition], deadline: float) -> None:
        """Until no record of ``parts`` is in a handler's hands, or until ``deadline``."""
        while any(p.running for p in parts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._item_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._item_done.wait(), remaining)

    # -- lanes ------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        part = self._parts.get(message.tp)
        if part is None:
            part = self._parts[message.tp] = Partition(message.tp)
        part.add(message.offset)
        self._buffered += 1
        item = FetchedRecord(message, part)
        lane_key: object = message.key if message.key is not None else object()
        lane = self._lanes.get(lane_key)
        if lane is not None:
            lane.append(item)
            return
        self._start_lane(lane_key, deque([item]))

    def _start_lane(self, lane_key: object, lane: deque[FetchedRecord], wait_s: float = 0) -> None:
        self._lanes[lane_key] = lane
        task = asyncio.create_task(self._run_lane(lane_key, lane, wait_s), name=f"lane-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._lane_ended)

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            # _run_lane catches everything; this would be a bug in the lane itself.
            self.log.error(
                "worker_lane_crashed",
                error_type=type(err).__name__,
                error=short_error(err),
                exc_info=err,
            )

    async def _run_lane(
        self, lane_key: object, lane: deque[FetchedRecord], wait_s: float = 0
    ) -> None:
        """Handle the lane's records one after another until it is empty (after ``wait_s``:
        a record that stepped aside waits for its retry in a lane of its own).

        A record whose handling fails unexpectedly stays at the head and is tried again
        after a capped back-off. A record abandoned on stop ends the lane: the customer's
        later records must not run before it (they all come back after the restart).
        """
        backoff = self._retry.backoff()
        try:
            if wait_s > 0:
                await pause(wait_s, self.stop, lane[0].part.revoked)
            while lane and not self._draining and not self.stop.is_set():
                item = lane[0]
                part = item.part
                if not part.revoking:
                    finished, failed = await self._process(item)
                    if failed is not None:
                        delay = backoff.step()
                        self._lane_failed(item, failed, delay)
                        await pause(delay, self.stop, part.revoked)
                        continue  # the same record again (unless stopping or revoked)
                    backoff.reset()
                    if isinstance(finished, SteppedAside):  # still held: not counted out
                        lane.popleft()
                        self._start_lane(object(), deque([item]), finished.delay_s)
                        continue
                    if finished:
                        part.finish(item.message.offset)
                    elif not part.revoking:
                        break  # abandoned on stop: the rest of the lane waits for it
                lane.popleft()
                self._buffered -= 1
                self._room.set()
        finally:
            self._lanes.pop(lane_key, None)

    async def _process(self, item: FetchedRecord) -> tuple[bool | SteppedAside, Exception | None]:
        """Whether the record reached a final outcome, or the worker's own error on it.

        While it runs it counts on its partition, which a revoke waits for.
        """
        item.part.running += 1
        try:
            return await self._events.process(item), None
        except Exception as err:  # never drop the record, never end the lane
            return False, err
        finally:
            item.part.running -= 1
            self._item_done.set()

    def _lane_failed(self, item: FetchedRecord, err: Exception, delay_s: float) -> None:
        message = item.message
        fields = {
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "error_type": type(err).__name__,
            "error": short_error(err),
            "retry_in_s": round(delay_s, 3),
        }
        try:
            self.log.error("worker_lane_failed", exc_info=err, **fields)
        except Exception:  # the traceback itself may not render (undecodable text)
            with contextlib.suppress(Exception):
                self.log.error("worker_lane_failed", **fields)

    # -- shutdown ---------------------------------------------------------------------

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
                    error=short_error(err),
                )
        self._sub = None
        self.log.info("worker_stopped", group=self.group)
