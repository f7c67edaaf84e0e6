"""`make bench` sections "memory" and "backlog": pubrelay's resident memory (RSS).

memory: `pubrelay serve` (embedded bus, the e-mail handler sending to an aiosmtpd sink on
loopback) under a steady open-loop load of signed deliveries, every one a distinct event,
at ``BENCH_MEMORY_RATE`` per second (default 200) for ``BENCH_SECONDS`` x 4 seconds. The
baseline is the same process's RSS idle after start; the figure is the peak under load
(target: at most 150 MB), with the RSS when the load ended.

backlog: an embedded bus holding ``BENCH_BACKLOG_EVENTS`` records (default 1,000,000
realistic ~3.9 KB bodies, each a distinct event and publication) for `pubrelay worker`
with the no-op handler to drain, bounded to ``BENCH_BACKLOG_MAX_S`` seconds (default 600).
The records are written straight into the bus file (the tables of
:mod:`bus.sqlite.schema`, 50,000 per transaction, no journal while filling) since a
million ``publish`` calls would take longer than the drain. Figures: RSS at start, peak,
at 10/25/50/75/100% drained. The rule for "flat": the peak is at most 20 MB above the RSS
at 10% drained (the worker's caches are warm by then; what grows after it grows with the
backlog).

RSS is ``VmRSS`` of ``/proc/<pid>/status``, summed over the process and its children (the
worker's ledger writer), sampled every 0.5 s, in MB (10^6 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiosmtpd.controller import Controller

from bus.sqlite.db import create_private_file
from bus.sqlite.schema import SCHEMA, encode_headers
from consumer.routing import Routed, routed_headers
from consumer.signature import sign
from handlers.config import WorkerSettings
from schemas.topics import DEFAULT_TOPIC_PREFIX, consumer_group, topic_for
from tests.bench.processes import rss_mb, server
from tests.bench.results import record
from tests.fixtures.process import free_port, pubrelay_bin
from tests.fixtures.samples import sample_publication_body

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
LOAD_SECONDS = SECONDS * 4
RATE = float(os.environ.get("BENCH_MEMORY_RATE", "200"))
BACKLOG_EVENTS = int(os.environ.get("BENCH_BACKLOG_EVENTS", "1000000"))
BACKLOG_MAX_S = float(os.environ.get("BENCH_BACKLOG_MAX_S", "600"))
SAMPLE_EVERY_S: Final = 0.5
TARGET_MB: Final = 150.0
FLAT_MB: Final = 20.0
SECRET: Final = "bench-secret"
EVENT_TYPE: Final = "customer.publication.succeeded"
PATH: Final = "/webhooks/voucherify"
FILL_BATCH: Final = 50_000


@dataclass(slots=True)
class Sample:
    at_s: float
    rss_mb: float
    drained: float = 0.0


@dataclass
class RssSampler:
    """Samples a process's RSS (and optionally a progress fraction) in a thread."""

    pid: int
    progress: Any = None  # a callable returning the fraction done, called on the thread
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while True:
            drained = self.progress() if self.progress is not None else 0.0
            rss = rss_mb(self.pid)
            if rss > 0:
                self.samples.append(Sample(time.monotonic() - self._started, rss, drained))
            if self._stop.wait(SAMPLE_EVERY_S):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max((s.rss_mb for s in self.samples), default=0.0)

    def at_time(self, at_s: float) -> float | None:
        """The RSS of the last sample taken at or before ``at_s`` after the start."""
        taken = [s.rss_mb for s in self.samples if s.at_s <= at_s]
        return taken[-1] if taken else None

    def at_drained(self, fraction: float) -> float | None:
        """The RSS of the first sample at or past ``fraction`` drained."""
        return next((s.rss_mb for s in self.samples if s.drained >= fraction), None)


class _SmtpSink:
    """aiosmtpd handler that accepts every message and counts them."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        del server, session, envelope
        self.accepted += 1
        return "250 2.0.0 Ok"


async def steady_load(url: str, rate: float, seconds: float, run: str) -> Counter[str]:
    """``rate`` signed deliveries per second for ``seconds`` (open loop), each event new."""
    statuses: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> None:
            body = sample_publication_body(
                event_id=f"ev_{run}_{n}",
                delivery_id=f"whs_{run}_{n}",
                customer_id=f"cust_{n % 500}",
                email=f"customer{n % 500}@example.com",
                code=f"C{run}{n}",
            )
            headers = {
                "Content-Type": "application/json",
                "x-voucherify-signature": sign(SECRET, body),
            }
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as err:
                statuses[type(err).__name__] += 1

        start = loop.time() + 0.05
        tasks = []
        for n in range(int(rate * seconds)):
            if (delay := start + n / rate - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
    return statuses


def bench_memory(tmp: Path) -> None:
    print(
        f"# memory: `pubrelay serve` (embedded bus, e-mail handler -> SMTP sink) under "
        f"{RATE:.0f} signed deliveries/s (open loop, each a new event) for {LOAD_SECONDS}s; "
        f"RSS sampled every {SAMPLE_EVERY_S} s, MB = 10^6 bytes"
    )
    smtp_port, port = free_port(), free_port()
    sink = _SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    env = {
        "PUBRELAY_HTTP__PORT": str(port),
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_DATA_DIR": str(tmp / f"memory-{port}"),
        "PUBRELAY_LOG__FORMAT": "json",
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_EMAIL__MAX_PER_S": "0",
    }
    try:
        with server([pubrelay_bin(), "serve"], port, env, tmp) as proc:
            time.sleep(1.0)  # start-up allocations settle
            idle = rss_mb(proc.pid)
            url = f"http://127.0.0.1:{port}{PATH}"
            with RssSampler(proc.pid) as sampler:
                statuses = asyncio.run(steady_load(url, RATE, LOAD_SECONDS, "m"))
                sent = sum(statuses.values())
                for _ in range(200):  # the last e-mails, bounded to 10 s
                    if sink.accepted >= statuses["202"]:
                        break
                    time.sleep(0.05)
            final = rss_mb(proc.pid)
    finally:
        controller.stop()
    peak = max(sampler.peak, final)
    print(f"{'idle after start (baseline)':<38} {idle:>8.1f} MB")
    print(
        f"{'under load: peak':<38} {peak:>8.1f} MB   at the end {final:.1f} MB   "
        f"202 {statuses['202']}/{sent}   e-mails {sink.accepted}"
    )
    quarters = {q: sampler.at_time(q * LOAD_SECONDS) for q in (0.25, 0.5, 0.75, 1.0)}
    shown = "   ".join(f"{q:.0%} {'-' if v is None else f'{v:.1f}'}" for q, v in quarters.items())
    print(f"{'RSS at load time':<38} {shown}   (MB)")
    half, end = quarters[0.5], quarters[1.0]
    slope = None  # MB per 10,000 deliveries over the load's second half: still growing?
    if half is not None and end is not None:
        slope = (end - half) / (RATE * LOAD_SECONDS / 2) * 10_000
        print(f"{'growth over the second half':<38} {slope:>+8.2f} MB per 10,000 deliveries")
    print(f"{'peak / idle':<38} {peak / idle:.2f}x   (target: peak <= {TARGET_MB:.0f} MB)")
    others = {k: v for k, v in statuses.items() if k != "202"}
    if others:
        print(f"{'answers other than 202':<38} {json.dumps(others)}")
    record(
        "memory",
        "peak RSS under sustained load",
        peak,
        "MB",
        baseline=idle,
        baseline_name="idle RSS after start",
        target=f"<= {TARGET_MB:.0f} MB",
        met=peak <= TARGET_MB,
        extra={
            "final_rss_mb": final,
            **{f"rss_at_{q:.0%}_of_load_mb": v for q, v in quarters.items() if v is not None},
            **({} if slope is None else {"second_half_mb_per_10k": slope}),
            "rate_per_s": RATE,
            "seconds": LOAD_SECONDS,
            "accepted_202": statuses["202"],
            "sent": sent,
            "emails": sink.accepted,
        },
    )


def _body_template() -> tuple[bytes, bytes]:
    """A body whose ids hold ``000000000000`` (event, delivery, code) and its publication
    id, replaced per record to make every record a distinct event and publication."""
    body = sample_publication_body(
        event_id="ev_000000000000",
        delivery_id="whs_000000000000",
        customer_id="cust_1",
        email=None,
        code="C000000000000",
    )
    publication = json.loads(body)["data"]["publication"]["id"].encode()
    return body, publication


def fill_backlog(path: Path, count: int) -> None:
    """``count`` records of one topic, none consumed, written with ``executemany``."""
    template, publication = _body_template()
    created_at = json.loads(template)["event"]["created_at"]
    pub_digits = len(publication) - len(b"pub_")
    topic = topic_for(DEFAULT_TOPIC_PREFIX, EVENT_TYPE)
    now_ms = int(time.time() * 1000)

    def row(n: int) -> tuple[str, bytes, bytes, bytes, int]:
        ident = f"{n:012d}"
        publication_id = f"pub_{n:0{pub_digits}x}"
        body = template.replace(b"000000000000", ident.encode()).replace(
            publication, publication_id.encode()
        )
        # The intake's headers (no parse per record: the body's ids are known here).
        routed = Routed(
            delivery_id=f"whs_{ident}",
            event_id=f"ev_{ident}",
            event_type=EVENT_TYPE,
            key=f"cust_{n % 500}",
            created_at=created_at,
            publication_id=publication_id,
        )
        headers = routed_headers(routed, received_at=b"", signature=b"")
        return topic, routed.key.encode(), body, encode_headers(headers), now_ms

    create_private_file(path)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.executescript(SCHEMA)
        for start in range(0, count, FILL_BATCH):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO log (topic, key, value, headers, ts_ms) VALUES (?, ?, ?, ?, ?)",
                (row(n) for n in range(start, min(count, start + FILL_BATCH))),
            )
            conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")


class _Drained:
    """The fraction of the backlog the no-op handler's consumer group has committed past
    (record ids are 1..count), read from the bus file on the sampler's thread."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.count = count
        self.group = consumer_group(WorkerSettings().group_prefix, "noop")
        self.topic = topic_for(DEFAULT_TOPIC_PREFIX, EVENT_TYPE)
        self._conn: sqlite3.Connection | None = None

    def __call__(self) -> float:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=5, check_same_thread=False)
        try:
            row = self._conn.execute(
                "SELECT next_offset FROM group_offsets WHERE grp = ? AND topic = ?",
                (self.group, self.topic),
            ).fetchone()
        except sqlite3.Error:
            return 0.0
        return 0.0 if row is None else min(1.0, (int(row[0]) - 1) / self.count)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def bench_backlog(tmp: Path) -> None:
    count = BACKLOG_EVENTS
    print(
        f"# backlog: `pubrelay worker` (no-op handler, SQLite ledger) draining {count:,} "
        f"records of ~{len(_body_template()[0]) / 1000:.1f} KB from the embedded bus, "
        f"bounded to {BACKLOG_MAX_S:.0f} s; flat: peak - RSS at 10% drained <= {FLAT_MB:.0f} MB"
    )
    data = tmp / "backlog"
    bus = data / "bus.sqlite3"
    started = time.monotonic()
    fill_backlog(bus, count)
    print(
        f"{'filled (executemany, no journal)':<38} {time.monotonic() - started:>8.1f} s   "
        f"{bus.stat().st_size / 1e6:,.0f} MB"
    )
    port = free_port()
    env = {
        "PUBRELAY_HTTP__PORT": str(port),
        "PUBRELAY_DATA_DIR": str(data),
        "PUBRELAY_LOG__FORMAT": "json",
        "PUBRELAY_HANDLERS__ENABLED": '["noop"]',
    }
    drained = _Drained(bus, count)
    try:
        with server([pubrelay_bin(), "worker"], port, env, tmp) as proc:
            at_start = rss_mb(proc.pid)
            deadline = time.monotonic() + BACKLOG_MAX_S
            with RssSampler(proc.pid, drained) as sampler:
                while time.monotonic() < deadline and proc.poll() is None:
                    if sampler.samples and sampler.samples[-1].drained >= 1.0:
                        break
                    time.sleep(SAMPLE_EVERY_S)
            elapsed = time.monotonic() - deadline + BACKLOG_MAX_S
    finally:
        drained.close()
    done = sampler.samples[-1].drained if sampler.samples else 0.0
    peak = sampler.peak
    marks = {q: sampler.at_drained(q) for q in (0.10, 0.25, 0.50, 0.75, 1.00)}
    print(f"{'drained':<38} {done:>8.1%} in {elapsed:.0f} s ({done * count / elapsed:,.0f}/s)")
    shown = "   ".join(f"{q:.0%} {'-' if v is None else f'{v:.1f}'}" for q, v in marks.items())
    print(f"{'RSS: at start, peak':<38} {at_start:>8.1f} MB   peak {peak:.1f} MB")
    print(f"{'RSS at drained':<38} {shown}   (MB)")
    at_tenth = marks[0.10]
    if at_tenth is None:
        print(f"{'flat':<38} not known: less than 10% drained")
        return
    growth = peak - at_tenth
    flat = growth <= FLAT_MB
    print(
        f"{'flat: peak - RSS at 10% drained':<38} {growth:>8.1f} MB   "
        f"{'flat' if flat else 'NOT flat'} (rule: <= {FLAT_MB:.0f} MB; target peak <= "
        f"{TARGET_MB:.0f} MB)"
    )
    extra = {"rss_at_start_mb": at_start, "growth_after_10pct_mb": growth}
    extra |= {f"rss_at_{q:.0%}_mb": v for q, v in marks.items() if v is not None}
    extra |= {"events": count, "drained": done, "seconds": elapsed}
    record(
        "backlog",
        "peak RSS draining a backlog",
        peak,
        "MB",
        baseline=at_tenth,
        baseline_name="RSS at 10% drained",
        target=f"<= {TARGET_MB:.0f} MB; flat: peak - RSS at 10% <= {FLAT_MB:.0f} MB",
        met=peak <= TARGET_MB and flat,
        extra=extra,
    )
