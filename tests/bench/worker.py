"""Worker throughput: events/s through a no-op handler, with and without the ledger.

The baseline of the same run is the bus alone: a consumer group reading and committing
the same records with no worker around it. Every run is bounded by count and time.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.registry import RestrictedRegistry

from bus.types import Bus
from consumer.routing import Routed, classify, routed_headers
from handlers.builtin.noop import NoopHandler
from handlers.config import LedgerSettings, WorkerSettings
from handlers.types import Claim
from handlers.worker.ledger import Ledger, create_ledger
from pubrelay.cli import event_loop_runner
from pubrelay.runtime import tune_runtime
from tests.fixtures.samples import sample_publication_body

EVENT_TYPE = "customer.publication.succeeded"
TIME_LIMIT_S = 120.0

T = TypeVar("T")

HANDLED = "pubrelay_handler_events_total"


class MemoryLedger:
    """Remembers in a set: the worker without the ledger's I/O, to price the ledger."""

    claim_ttl_s = 15.0

    def __init__(self) -> None:
        self.done: set[tuple[str, str]] = set()
        self.attempts: dict[tuple[str, str], int] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def is_done(self, handler: str, event_id: str) -> bool:
        return (handler, event_id) in self.done

    async def mark_done(self, handler: str, event_id: str) -> None:
        self.done.add((handler, event_id))
        self.attempts.pop((handler, event_id), None)

    async def claim(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> Claim:
        if (handler, key) in self.done:
            return Claim("done")
        attempts = self.attempts[handler, key] = self.attempts.get((handler, key), 0) + 1
        return Claim("claimed", attempts=attempts)

    async def renew(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> bool:
        return True

    async def release(
        self, handler: str, key: str, token: str, *, forget_attempts: bool = False
    ) -> None:
        if forget_attempts:
            self.attempts.pop((handler, key), None)


async def fill(bus: Bus, prefix: str, count: int) -> None:
    topic = prefix + EVENT_TYPE
    await bus.ensure_topics([topic, f"{prefix}retry.noop", f"{prefix}dlq.noop"])
    numbers = iter(range(count))

    async def publisher() -> None:
        # 256 of these share the numbers: no task (and no body) per record in advance,
        # which made the first publishes wait seconds for the loop on large fills.
        for n in numbers:
            body = sample_publication_body(
                event_id=f"ev_{n}",
                delivery_id=f"whs_{n}",
                customer_id=f"cust_{n % 500}",
                email=None,
                code=f"C{n}",
            )
            routed = classify(body, max_depth=32)
            assert isinstance(routed, Routed), routed
            headers = routed_headers(routed, received_at=b"", signature=b"")  # as the intake
            await bus.publish(topic, body, key=f"cust_{n % 500}".encode(), headers=headers)

    await asyncio.gather(*(publisher() for _ in range(256)))


async def consume_only(bus: Bus, prefix: str, count: int) -> float:
    """Events/s of a bare consumer group reading and committing ``count`` records.

    The clock starts at the first record, so the group join (seconds on Tansu) is not
    counted; the same holds for :func:`through_worker`.
    """
    sub = bus.subscribe(f"bench-raw-{uuid.uuid4().hex[:8]}", [prefix + EVENT_TYPE])
    await sub.start()
    seen = 0
    deadline = time.perf_counter() + TIME_LIMIT_S
    first_at: float | None = None
    first_count = 0
    try:
        while seen < count and time.perf_counter() < deadline:
            batch = await sub.fetch(max_records=500, timeout_s=1.0)
            if batch and first_at is None:
                first_at, first_count = time.perf_counter(), len(batch)
            seen += len(batch)
            if batch:
                last = batch[-1]
                await sub.commit({last.tp: last.offset + 1})
    finally:
        await sub.close()
    return _rate(seen - first_count, first_at)


def _handled(events: RestrictedRegistry) -> int:
    """The no-op handler's ``handled`` count."""
    for metric in events.collect():
        for sample in metric.samples:
            if sample.name == HANDLED and sample.labels.get("outcome") == "handled":
                return int(sample.value)
    return 0


def _rate(events: int, first_at: float | None) -> float:
    if first_at is None or events <= 0:
        return 0.0
    return events / max(time.perf_counter() - first_at, 1e-9)


async def through_worker(
    bus: Bus, prefix: str, count: int, ledger: Ledger, group_prefix: str
) -> float:
    """Events/s of the worker with the no-op handler finishing ``count`` events."""
    from handlers.worker.service import Worker  # noqa: PLC0415 - keeps `--help` fast

    registry = CollectorRegistry()
    settings = WorkerSettings(group_prefix=group_prefix, commit_interval_s=0.2)
    worker = Worker(
        [NoopHandler("noop", frozenset({EVENT_TYPE}))],
        bus=bus,
        ledger=ledger,
        settings=settings,
        topic_prefix=prefix,
        metrics_registry=registry,
    )
    # Polled every 5 ms: collecting only this series keeps the poll out of the figure.
    events = registry.restricted_registry([HANDLED])
    stop = asyncio.Event()
    deadline = time.perf_counter() + TIME_LIMIT_S
    task = asyncio.create_task(worker.run_until_stopped(stop))
    first_at: float | None = None
    first_count = 0
    handled = 0
    try:
        while time.perf_counter() < deadline:
            handled = _handled(events)
            if handled and first_at is None:
                first_at, first_count = time.perf_counter(), handled
            if handled >= count:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        return _rate(handled - first_count, first_at)
    finally:
        stop.set()
        await task


def run_as_in_production(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the event loop `pubrelay worker` runs on (uvloop) with its process
    settings (:func:`tuned_as_in_production`)."""
    with tuned_as_in_production(), event_loop_runner() as runner:
        return runner.run(coro)


@contextmanager
def tuned_as_in_production() -> Iterator[None]:
    """The process settings `pubrelay worker` runs with (``tune_runtime``: GC thresholds,
    a frozen start-up heap, the GIL switch interval) for the runs inside, then restored:
    the worker is measured as it runs, beside a baseline measured the same way."""
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    tune_runtime()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)


async def bench_worker_on(
    name: str, make_bus: Callable[[], Awaitable[Bus]], tmp: Path, count: int, rounds: int
) -> dict[str, float]:
    """Print and return events/s: the bus alone, then the worker with the in-memory and
    the SQLite ledger in turns, ``rounds`` times (each run a consumer group and a ledger of
    its own over the same records). The machine's speed moves by minutes and a run lasts
    a second or two, so the figure is the round with the median SQLite-ledger rate, beside
    the in-memory run of the same round."""
    async with AsyncExitStack() as stack:
        bus = await make_bus()
        stack.push_async_callback(bus.close)
        prefix = f"b{uuid.uuid4().hex[:8]}."
        await fill(bus, prefix, count)
        raw = await consume_only(bus, prefix, count)
        runs: list[tuple[float, float]] = []
        for round_ in range(rounds):
            memory = await through_worker(
                bus, prefix, count, MemoryLedger(), f"bench-mem-{round_}."
            )
            ledger = create_ledger(LedgerSettings(), tmp / f"ledger-{prefix}{round_}")
            await ledger.open()
            try:
                with_ledger = await through_worker(
                    bus, prefix, count, ledger, f"bench-sqlite-{round_}."
                )
            finally:
                await ledger.close()
            print(
                f"{name:<7} round {round_ + 1}: in-memory ledger {memory:>9,.0f} events/s, "
                f"SQLite ledger {with_ledger:>9,.0f} events/s"
            )
            runs.append((memory, with_ledger))
    memory, with_ledger = sorted(runs, key=lambda run: run[1])[len(runs) // 2]
    rows = [
        ("bus alone (fetch + commit)", raw),
        ("worker, no-op handler, in-memory ledger", memory),
        ("worker, no-op handler, SQLite ledger", with_ledger),
    ]
    for label, rate in rows:
        ratio = rate / raw if raw else 0.0
        print(f"{name:<7} {label:<42} {rate:>9,.0f} events/s   ratio to bus alone {ratio:.2f}")
    if with_ledger:
        print(f"{name:<7} ledger cost: {memory / with_ledger:.2f}x the worker time without it")
    if rounds > 1:
        each = ", ".join(f"{sqlite:,.0f}" for _, sqlite in runs)
        print(f"{name:<7} SQLite ledger: the round with the median of {rounds} ({each})")
    return {"bus": raw, "memory": memory, "sqlite": with_ledger}
