"""One scenario's processes: a Tansu broker of its own, `pubrelay` processes on it, the
fakes' event loop, the run's Redis ledger, and what the scenario reads back from Kafka.

Every process the stack starts is stopped by its own PID when the stack closes (SIGTERM,
then SIGKILL after a bound). The peak resident memory of the `pubrelay worker` processes
is sampled every 100 ms while the stack is open.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bus.config import BusSettings
from bus.kafka import KafkaBus
from handlers.worker.dead_letters import DeadLetter
from handlers.worker.replay import list_dead_letters
from schemas.record import HEADER_EVENT_ID, header
from tests.bench.attack import rss_mib
from tests.chaos.fakes import LoopThread
from tests.chaos.load import (
    EVENT_TYPE,
    SECRET,
    WEBHOOK_PATH,
    Deliveries,
    deliver,
    record,
    wait_until,
)
from tests.chaos.report import Row
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import PubrelayProcess, free_port

T = TypeVar("T")

PARTITIONS: Final = 6
READ_IDLE_S: Final = 3.0
STALL_S: Final = 3.0
"""Effects unchanged this long: read the dead letters (what is missing may be there)."""
GIVE_UP_S: Final = 30.0
"""No new effect nor dead letter for this long: stop waiting (what is missing is lost)."""
PUBLISH_CHUNK: Final = 2_000
WARM_UP: Final = "warm"
WARM_UP_TIMEOUT_S: Final = 90.0


@dataclass
class Run:
    """What the scenarios of one run share: a directory and the Redis ledger."""

    workdir: Path
    redis_url: str


@dataclass
class Stack:
    name: str
    run: Run
    broker: TansuBroker
    loop: LoopThread
    processes: list[PubrelayProcess] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    _sampling: threading.Event = field(default_factory=threading.Event)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    explained: set[str] = field(default_factory=set)
    """Partition and offset of each event id the last read of the event topic saw."""

    @property
    def prefix(self) -> str:
        return f"chaos.{self.name}."

    @property
    def event_topic(self) -> str:
        return self.prefix + EVENT_TYPE

    def bus_settings(self) -> BusSettings:
        return kafka_bus_settings(self.broker, topic_prefix=self.prefix, partitions=PARTITIONS)

    def env(self, handlers: Sequence[str], extra: dict[str, str] | None = None) -> dict[str, str]:
        names = ", ".join(f'"{h}"' for h in handlers)
        return {
            "PUBRELAY_LOG__FORMAT": "json",
            "PUBRELAY_BUS__URL": self.broker.url,
            "PUBRELAY_BUS__TOPIC_PREFIX": self.prefix,
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
            "PUBRELAY_BUS__REPLICATION_FACTOR": "1",
            "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
            "PUBRELAY_BUS__PARTITIONS": str(PARTITIONS),
            "PUBRELAY_BUS__PUBLISH_TIMEOUT_S": "3",
            "PUBRELAY_BUS__REQUEST_TIMEOUT_S": "3",
            "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
            "PUBRELAY_HANDLERS__ENABLED": f"[{names}]",
            "PUBRELAY_WORKER__GROUP_PREFIX": self.prefix,
            "PUBRELAY_WORKER__COMMIT_INTERVAL_S": "0.5",
            "PUBRELAY_LEDGER__URL": self.run.redis_url,
            "PUBRELAY_LEDGER__REDIS_KEY_PREFIX": f"chaos:{self.name}:",
            **(extra or {}),
        }

    def start(
        self,
        command: str,
        handlers: Sequence[str] = (),
        extra: dict[str, str] | None = None,
        *,
        port: int | None = None,
    ) -> PubrelayProcess:
        """``pubrelay <command>`` with this stack's environment, once healthy."""
        port = port or free_port()
        cwd = self.run.workdir / self.name
        env = {
            **self.env(handlers, extra),
            "PUBRELAY_HTTP__PORT": str(port),
            "PUBRELAY_DATA_DIR": str(cwd / f"data-{command}-{port}"),
        }
        process = PubrelayProcess([command], cwd, env, port)
        self.processes.append(process)
        process.wait_ready(timeout_s=60)
        return process

    def webhook_url(self, process: PubrelayProcess) -> str:
        return process.url + WEBHOOK_PATH

    async def send(
        self,
        webhook: PubrelayProcess,
        tag: str,
        events: int,
        rate_per_s: float,
        deliveries: Deliveries,
    ) -> None:
        """Deliver events ``0`` to ``events - 1`` of ``tag`` to ``webhook`` at ``rate_per_s``
        as Voucherify does (:func:`~tests.chaos.load.deliver`), noting in ``deliveries``."""
        url = self.webhook_url(webhook)
        await deliver(url, tag, range(events), rate_per_s=rate_per_s, deliveries=deliveries)

    def _sample_rss(self) -> None:
        while not self._sampling.wait(0.1):
            for process in list(self.processes):
                if (
                    process.log_path.name.startswith("pubrelay-worker")
                    and process.proc.poll() is None
                ):
                    with suppress(OSError):
                        self.peak_rss_mib = max(self.peak_rss_mib, rss_mib(process.proc.pid))

    def start_flow(
        self,
        handler: str,
        env: dict[str, str],
        effects: Callable[[], Counter[str]],
        tag: str,
        *,
        workers: int = 1,
    ) -> tuple[PubrelayProcess, list[PubrelayProcess]]:
        """``pubrelay webhook`` and ``workers`` ``pubrelay worker`` running ``handler`` with
        ``env``, warmed up (:meth:`warm_up`); the webhook and the workers."""
        webhook = self.start("webhook")
        started = [self.start("worker", [handler], env) for _ in range(workers)]
        self.warm_up(self.webhook_url(webhook), effects, tag)
        return webhook, started

    def warm_up(self, url: str, effects: Callable[[], Counter[str]], tag: str) -> None:
        """Deliver one event of its own and wait until its effect shows: the workers have
        joined their group and hold partitions before the scenario's load begins."""
        asyncio.run(deliver(url, WARM_UP + tag, range(1), rate_per_s=1, deliveries=Deliveries()))
        if not wait_until(lambda: bool(effects()), WARM_UP_TIMEOUT_S):
            raise RuntimeError(f"no effect of the warm-up event after {WARM_UP_TIMEOUT_S:.0f} s")

    def finish(
        self,
        row: Row,
        effects: Callable[[], Counter[str]],
        sent: Deliveries | None = None,
        *,
        tag: str,
        handler: str,
        settle_s: float,
        published: int = 0,
        excused: frozenset[str] = frozenset(),
        explain: Callable[[set[str]], set[str]] | None = None,
    ) -> list[str]:
        """Wait (bounded) until every accepted or stored event has its effect or dead
        letter, then fill the row; the lost event ids. ``sent``: what the sender delivered
        (its 2xx count goes in the row; the topic holds at most one record per try);
        ``published``, without a sender: how many records the topic holds. ``excused``
        events are not counted; ``explain``, asked when effects stall, names missing ones
        that cannot come (they are kept in :attr:`explained`, not counted)."""
        counted = f"{tag}_ev"
        accepted = sent.accepted if sent is not None else set()
        if sent is not None:
            row.accepted = len(accepted)

        def observed() -> Counter[str]:
            return Counter({e: n for e, n in effects().items() if e.startswith(counted)})

        stored_at_most = sent.tries if sent is not None else published
        stored = self.stored_event_ids(expect=stored_at_most, timeout_s=120)
        stored = Counter({e: n for e, n in stored.items() if e.startswith(counted)})
        row.stored = len(stored)
        expected = (accepted | set(stored)) - excused
        dead: set[str] = set()
        deadline = time.monotonic() + settle_s
        seen, last_change, idle_reads = -1, time.monotonic(), 0
        while True:
            now = observed()
            missing = expected - set(now) - dead
            if not missing or time.monotonic() > deadline:
                break
            progress = len(now) + len(dead)
            if progress != seen:
                seen, last_change, idle_reads = progress, time.monotonic(), 0
            elif time.monotonic() - last_change > STALL_S * (idle_reads + 1):
                dead = {d.event_id for d in self.dead_letters(handler) if d.event_id}
                if explain is not None:
                    self.explained |= explain(missing - dead)
                    expected -= self.explained
                idle_reads += 1
                if time.monotonic() - last_change > GIVE_UP_S:
                    break
            time.sleep(0.5)
        dead = {d.event_id for d in self.dead_letters(handler) if d.event_id}
        if dead:
            row.notes.append(f"{len(dead)} dead-lettered")
        return row.count(observed(), expected=expected, dead=dead)

    # --- what Kafka holds ------------------------------------------------------------------

    def stored_event_ids(self, expect: int, timeout_s: float) -> Counter[str]:
        """Event ids on the event topic, read from the start in a group of their own."""
        return asyncio.run(self._read_ids(expect, timeout_s))

    def partition_count(self) -> int:
        """How many partitions the event topic has now, as the broker's metadata says."""

        async def read() -> int:
            producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap)
            await producer.start()
            try:
                return len(await producer.partitions_for(self.event_topic))
            finally:
                await producer.stop()

        return asyncio.run(read())

    def committed(self, handler: str) -> dict[int, int]:
        """``handler``'s committed offsets on the event topic, by partition."""

        async def read() -> dict[int, int]:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.broker.bootstrap,
                group_id=self.prefix + handler,
                enable_auto_commit=False,
            )
            await consumer.start()
            try:
                offsets = {
                    p: await consumer.committed(TopicPartition(self.event_topic, p))
                    for p in range(PARTITIONS)
                }
            finally:
                await consumer.stop()
            return {p: o for p, o in offsets.items() if o is not None}

        return asyncio.run(read())

    async def _read_ids(self, expect: int, timeout_s: float) -> Counter[str]:
        bus = make_kafka_bus(self.bus_settings())
        await bus.start()
        sub = bus.subscribe(f"{self.prefix}chaos-reader-{time.monotonic_ns()}", [self.event_topic])
        ids: Counter[str] = Counter()
        try:
            await sub.start()
            deadline = time.monotonic() + timeout_s
            idle_since = time.monotonic()
            while time.monotonic() < deadline and sum(ids.values()) < expect:
                batch = await sub.fetch(max_records=5_000, timeout_s=1.0)
                for message in batch:
                    value = header(message.headers, HEADER_EVENT_ID)
                    ids[key := value.decode() if value else "?"] += 1
                    self.positions[key] = (message.partition, message.offset)
                if batch:
                    idle_since = time.monotonic()
                elif ids and time.monotonic() - idle_since > READ_IDLE_S:
                    break
        finally:
            await sub.close()
            await bus.close()
        return ids

    def dead_letters(self, handler: str) -> list[DeadLetter]:
        """What ``pubrelay dlq list --handler <handler>`` lists (the same function)."""

        async def read() -> list[DeadLetter]:
            bus = make_kafka_bus(self.bus_settings())
            await bus.start()
            try:
                return await list_dead_letters(
                    bus, handler, topic_prefix=self.prefix, group_prefix=self.prefix, limit=None
                )
            finally:
                await bus.close()

        return asyncio.run(read())

    def publish(self, tag: str, numbers: range) -> int:
        """Publish events straight to the topic (a backlog); how many the broker acknowledged."""

        async def work() -> int:
            bus = make_kafka_bus(self.bus_settings())
            await bus.start()
            acked = 0
            try:
                await bus.ensure_topics([self.event_topic])
                for start in range(numbers.start, numbers.stop, PUBLISH_CHUNK):
                    chunk = range(start, min(start + PUBLISH_CHUNK, numbers.stop))
                    results = await asyncio.gather(
                        *(self._publish_one(bus, tag, n) for n in chunk), return_exceptions=True
                    )
                    acked += sum(1 for r in results if r is None)
            finally:
                await bus.close()
            return acked

        return asyncio.run(work())

    async def _publish_one(self, bus: KafkaBus, tag: str, n: int) -> None:
        value, key, headers = record(tag, n)
        await bus.publish(self.event_topic, value, key=key, headers=headers)


def run_with_fault(sending: Coroutine[Any, Any, None], fault: Callable[[], Awaitable[T]]) -> T:
    """Run ``sending`` (a :meth:`Stack.send`) with ``fault()`` beside it from the start; what
    ``fault`` returned, once both are done."""

    async def both() -> T:
        sender = asyncio.create_task(sending)
        result = await fault()
        await sender
        return result

    return asyncio.run(both())


@contextmanager
def open_stack(name: str, run: Run) -> Iterator[Stack]:
    """A broker of the scenario's own and the fakes' loop; all stopped at the end."""
    (run.workdir / name).mkdir(parents=True, exist_ok=True)
    broker = TansuBroker(run.workdir / name / "tansu.log")
    broker.start()
    stack = Stack(name=name, run=run, broker=broker, loop=LoopThread())
    sampler = threading.Thread(target=stack._sample_rss, daemon=True)
    sampler.start()
    try:
        yield stack
    finally:
        stack._sampling.set()
        sampler.join(5)
        for process in reversed(stack.processes):
            process.terminate(timeout_s=30)
        stack.loop.close()
        broker.stop()
