"""Consuming from the Kafka bus: one consumer-group member per :class:`KafkaSubscription`.

A member commits manually (``enable_auto_commit=False``, ``auto_offset_reset="earliest"``);
before partitions are revoked it awaits the caller's ``on_revoke`` so finished work is
committed first. Offsets of partitions already revoked are not committed: their records
go again to the new owner, and the idempotency ledger absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from bus.kafka.options import ClientOptions, GroupTiming
from bus.types import Message, RevokeCallback, TopicPartition
from schemas.errors import BusUnavailable

log = structlog.get_logger("pubrelay.bus.kafka")


def _ours(tp: Any) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition) -> Any:
    return KafkaTopicPartition(tp.topic, tp.partition)


class _RevokeListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Lets the worker commit finished work before partitions move to another member."""

    def __init__(self, group: str, on_revoke: RevokeCallback | None) -> None:
        self._group = group
        self._on_revoke = on_revoke

    async def on_partitions_revoked(self, revoked: Collection[Any]) -> None:
        if not revoked:
            return
        log.info("bus_partitions_revoked", bus="kafka", group=self._group, count=len(revoked))
        if self._on_revoke is not None:
            try:
                await self._on_revoke([_ours(tp) for tp in revoked])
            except Exception:
                log.exception("bus_revoke_callback_failed", bus="kafka", group=self._group)

    async def on_partitions_assigned(self, assigned: Collection[Any]) -> None:
        log.info("bus_partitions_assigned", bus="kafka", group=self._group, count=len(assigned))


class KafkaSubscription:
    """A consumer-group member on the Kafka bus (a :class:`bus.types.Subscription`).

    ``options`` are the bus's client options (:func:`bus.kafka.options.client_options`);
    ``request_timeout_s`` bounds starting, stopping, committing and reading the lag.
    """

    def __init__(
        self,
        group: str,
        topics: Sequence[str],
        *,
        options: ClientOptions,
        timing: GroupTiming,
        request_timeout_s: float,
        on_revoke: RevokeCallback | None = None,
    ) -> None:
        self.group = group
        self.topics = list(dict.fromkeys(topics))
        self._options = options
        self._timing = timing
        self._request_timeout_s = request_timeout_s
        self._on_revoke = on_revoke
        self._consumer: Any = None
        # True until a fetch completes: while the group (re)balances, the assignment aiokafka
        # reports is not yet one to read from, so lag() reports none.
        self._joining = True

    async def start(self) -> None:
        if self._consumer is not None:
            return
        t = self._timing
        # The coordinator holds a JoinGroup until every member rejoined (up to the rebalance
        # timeout); a shorter request timeout would abort every join of a busy group.
        # Same rule as the Java client: rebalance timeout + 5 s at least.
        options = {
            **self._options,
            "request_timeout_ms": max(
                self._options["request_timeout_ms"], t.join_timeout_ms + 5_000
            ),
        }
        consumer = AIOKafkaConsumer(
            **options,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=t.session_timeout_ms,
            heartbeat_interval_ms=t.heartbeat_interval_ms,
            rebalance_timeout_ms=t.rebalance_timeout_ms,
            max_poll_interval_ms=t.max_poll_interval_ms,
        )
        try:
            async with asyncio.timeout(self._request_timeout_s):
                await consumer.start()
            consumer.subscribe(self.topics, listener=_RevokeListener(self.group, self._on_revoke))
        except (TimeoutError, KafkaError) as err:
            with contextlib.suppress(KafkaError, TimeoutError):
                async with asyncio.timeout(self._request_timeout_s):
                    await consumer.stop()
            raise BusUnavailable(f"cannot start a Kafka consumer: {err!r}") from err
        self._consumer = consumer
        log.info("bus_subscribed", bus="kafka", group=self.group, topics=self.topics)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            async with asyncio.timeout(self._request_timeout_s):
                await consumer.stop()
        except (TimeoutError, KafkaError) as err:
            log.warning("bus_consumer_stop_failed", bus="kafka", group=self.group, error=repr(err))

    def _require(self) -> Any:
        if self._consumer is None:
            raise BusUnavailable("the Kafka subscription is not started")
        return self._consumer

    async def fetch(self, *, max_records: int = 500, timeout_s: float = 1.0) -> list[Message]:
        """Records after the last fetched ones; broker errors become ``BusUnavailable``."""
        consumer = self._require()
        try:
            # getmany first waits, without any bound, for a group assignment while a
            # rebalance runs (forever if the broker died mid-join): bound it by what a join
            # may take, so the worker sees its stop signal and `pubrelay replay` its deadline.
            join_s = self._timing.join_timeout_ms / 1000
            async with asyncio.timeout(timeout_s + join_s):
                batches = await consumer.getmany(
                    timeout_ms=int(timeout_s * 1000), max_records=max_records
                )
        except TimeoutError:
            self._joining = True  # still waiting for the group to settle
            return []
        except KafkaError as err:
            raise BusUnavailable(f"the Kafka consumer cannot fetch: {err!r}") from err
        self._joining = False
        return [
            Message(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
                value=record.value if record.value is not None else b"",
                headers=tuple((k, v if v is not None else b"") for k, v in record.headers),
                timestamp_ms=record.timestamp,
            )
            for records in batches.values()
            for record in records
        ]

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit offsets of partitions still assigned to this member.

        Offsets of partitions already revoked are dropped (logged): their records are
        delivered again to the new owner, which the idempotency ledger absorbs.
        """
        consumer = self._require()
        assigned = consumer.assignment()
        wanted = {_theirs(tp): offset for tp, offset in offsets.items()}
        kept = {tp: offset for tp, offset in wanted.items() if tp in assigned}
        if len(kept) < len(wanted):
            log.info(
                "bus_commit_skipped_unassigned",
                bus="kafka",
                group=self.group,
                partitions=len(wanted) - len(kept),
            )
        if not kept:
            return
        try:
            async with asyncio.timeout(self._request_timeout_s):
                await consumer.commit(kept)
        except IllegalStateError as err:  # revoked between the check and the commit
            log.info("bus_commit_skipped_unassigned", bus="kafka", group=self.group, error=str(err))
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka consumer cannot commit: {err!r}") from err

    async def lag(self) -> Mapping[TopicPartition, int]:
        """End offset minus committed offset per assigned partition.

        The end offset comes from a ListOffsets request. The Tansu test broker reports
        end offsets up to a batch low, so the lag read against it is low too.
        """
        consumer = self._require()
        assigned = [] if self._joining else list(consumer.assignment())
        if not assigned:
            return {}
        try:
            async with asyncio.timeout(self._request_timeout_s):
                ends = await consumer.end_offsets(assigned)
                starts = await consumer.beginning_offsets(assigned)
                out: dict[TopicPartition, int] = {}
                for tp in assigned:
                    committed = await consumer.committed(tp)
                    done = starts[tp] if committed is None else committed
                    out[_ours(tp)] = max(0, ends[tp] - done)
        except (TimeoutError, KafkaError) as err:
            raise BusUnavailable(f"the Kafka consumer cannot read its lag: {err!r}") from err
        return out
