"""`python -m tests.bench [SECTION ...]`: print figures and ratios from one run.

Every figure is printed beside a baseline measured in the same run (the machine's speed
drifts by up to 2x over minutes), and the ratio between them is the number to compare
across runs. Sections: intake (webhook on the embedded bus vs a bare aiohttp handler),
kafka (webhook -> Tansu broker ack vs the same bare handler), worker (events/s through a
no-op handler on both buses, vs the bus read alone; the ledger's cost), e2e (signed POST
-> e-mail accepted by an SMTP server, beside the intake latency of the same requests),
attack (signed deliveries at a steady rate, quietly and under attack: 4 clients posting
~1 MiB bogus-signed bodies and 300 holding stalled bodies; see attack.py).
Environment: BENCH_SECONDS (per load run, default 8), BENCH_CONNECTIONS (default 64),
BENCH_WORKER_EVENTS (default 5000), BENCH_E2E_EVENTS (default 2000), BENCH_ATTACK_RATE
(legitimate deliveries per second in the attack section, default 200). Section retention
(the write lock a retention pass of the embedded bus holds on a log of millions of
records, before and after chunking; see retention.py): BENCH_RETENTION_ROWS (default
2000000), BENCH_RETENTION_VALUE_BYTES (default 512).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bus.sqlite import SqliteBus
from bus.types import Bus
from consumer.signature import sign
from pubrelay.logging import configure_logging
from tests.bench.attack import RunFigures
from tests.bench.attack import run as attack_run
from tests.bench.e2e import e2e_env, run_e2e, start_smtp
from tests.bench.retention import bench_retention
from tests.bench.worker import bench_worker_on
from tests.bench.wrk import LoadResult, run_wrk
from tests.fixtures.app import EXAMPLE
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import free_port, pubrelay_bin

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
WORKER_EVENTS = int(os.environ.get("BENCH_WORKER_EVENTS", "5000"))
E2E_EVENTS = int(os.environ.get("BENCH_E2E_EVENTS", "2000"))
ATTACK_RATE = float(os.environ.get("BENCH_ATTACK_RATE", "200"))
SECRET = "bench-secret"
REPO = Path(__file__).resolve().parents[2]
PATH = "/webhooks/voucherify"


def sample_body() -> bytes:
    """The official example in its envelope, compact as Voucherify sends it (~4.4 KB)."""
    envelope = json.loads((EXAMPLE / "customer.publication.succeeded.json").read_bytes())
    return json.dumps(envelope, separators=(",", ":")).encode()


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not become healthy")


@contextmanager
def server(
    args: list[str], port: int, env: dict[str, str], cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with (cwd / f"server-{port}.log").open("wb") as log:
        proc = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_healthy(port, proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bare(tmp: Path) -> LoadResult:
    port = free_port()
    args = [sys.executable, "-m", "tests.bench.bare_server", str(port)]
    with server(args, port, {"PYTHONPATH": str(REPO)}, tmp):
        return run_wrk(
            f"http://127.0.0.1:{port}{PATH}",
            sample_body(),
            {},
            duration_s=SECONDS,
            connections=CONNECTIONS,
        )


def pubrelay_webhook(tmp: Path, extra_env: dict[str, str]) -> LoadResult:
    port = free_port()
    body = sample_body()
    env = {
        "PUBRELAY_HTTP__PORT": str(port),
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_DATA_DIR": str(tmp / f"data-{port}"),
        "PUBRELAY_LOG__FORMAT": "json",
        **extra_env,
    }
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, body)}
    with server([pubrelay_bin(), "webhook"], port, env, tmp):
        return run_wrk(
            f"http://127.0.0.1:{port}{PATH}",
            body,
            headers,
            duration_s=SECONDS,
            connections=CONNECTIONS,
        )


def bench_kafka(tmp: Path) -> None:
    print(
        f"# kafka: signed deliveries through `pubrelay webhook` to a Tansu broker "
        f"(acks=all, 1 MiB batches), wrk -t1 -c{CONNECTIONS} -d{SECONDS}s"
    )
    broker = TansuBroker(tmp / "tansu.log")
    broker.start()
    try:
        env = {
            "PUBRELAY_BUS__URL": broker.url,
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",  # Tansu does not support it
            "PUBRELAY_BUS__REPLICATION_FACTOR": "1",  # Tansu is a single broker
            "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
        }
        first = bare(tmp)
        print(first.row("bare aiohttp (read body, 204)"))
        kafka = pubrelay_webhook(tmp, env)
        print(kafka.row("pubrelay webhook, Kafka (Tansu)"))
        second = bare(tmp)
        print(second.row("bare aiohttp again"))
    finally:
        broker.stop()
    print(ratio_line("pubrelay webhook, Kafka (Tansu)", kafka, mean(first, second)))


def bench_worker(tmp: Path) -> None:
    count = WORKER_EVENTS
    print(f"# worker: {count} events through the no-op handler, bounded to 120 s per run")

    async def sqlite_bus() -> Bus:
        bus = SqliteBus(tmp / f"worker-bench-{time.monotonic_ns()}.sqlite3")
        await bus.start()
        return bus

    asyncio.run(bench_worker_on("sqlite", sqlite_bus, tmp, count))
    broker = TansuBroker(tmp / "tansu-worker.log")
    broker.start()
    try:

        async def kafka_bus() -> Bus:
            bus = make_kafka_bus(kafka_bus_settings(broker, partitions=6))
            await bus.start()
            return bus

        asyncio.run(bench_worker_on("kafka", kafka_bus, tmp, count))
    finally:
        broker.stop()


def bench_e2e(tmp: Path) -> None:
    count = E2E_EVENTS
    print(
        f"# end to end: {count} signed POSTs (32 at a time) -> pubrelay serve (embedded "
        "bus, email handler) -> e-mail accepted by an SMTP server on loopback"
    )
    smtp_port, http_port = free_port(), free_port()
    controller, recorder = start_smtp(smtp_port)
    try:
        with server([pubrelay_bin(), "serve"], http_port, e2e_env(tmp, http_port, smtp_port), tmp):
            url = f"http://127.0.0.1:{http_port}{PATH}"
            figures = asyncio.run(run_e2e(url, recorder, count, concurrency=32))
    finally:
        controller.stop()
    print(
        f"{'POST -> e-mail accepted':<38} {figures['events_per_s']:>10,.0f} events/s"
        f"   p50 {figures['e2e_p50_ms']:>7.2f} ms   p99 {figures['e2e_p99_ms']:>7.2f} ms"
        f"   delivered {figures['delivered']:.0f}/{count}"
    )
    print(
        f"{'POST -> 202 (the same requests)':<38} {'':>10}           "
        f"   p50 {figures['intake_p50_ms']:>7.2f} ms   p99 {figures['intake_p99_ms']:>7.2f} ms"
    )
    print(
        f"{'e-mail latency / intake latency':<38} p50 "
        f"{figures['e2e_p50_ms'] / figures['intake_p50_ms']:.1f}x"
    )


def mean(first: LoadResult, second: LoadResult) -> LoadResult:
    return LoadResult(
        (first.requests_per_s + second.requests_per_s) / 2,
        (first.p50_ms + second.p50_ms) / 2,
        (first.p99_ms + second.p99_ms) / 2,
        0,
        0,
    )


def ratio_line(name: str, result: LoadResult, baseline: LoadResult) -> str:
    return f"{name:<38} ratio to bare: {result.requests_per_s / baseline.requests_per_s:.2f}"


def bench_intake(tmp: Path) -> None:
    print(
        f"# intake: signed {len(sample_body())}-byte deliveries, wrk -t1 -c{CONNECTIONS} "
        f"-d{SECONDS}s, one server process"
    )
    first = bare(tmp)
    print(first.row("bare aiohttp (read body, 204)"))
    sqlite = pubrelay_webhook(tmp, {})
    print(sqlite.row("pubrelay webhook, embedded SQLite bus"))
    indexed = pubrelay_webhook(tmp, {"PUBRELAY_CONSOLE__TOKEN": "bench-console-token"})
    print(indexed.row("the same with the console's event index"))
    second = bare(tmp)
    print(second.row("bare aiohttp again"))
    print(ratio_line("pubrelay webhook, embedded SQLite bus", sqlite, mean(first, second)))
    print(
        f"{'event index on / off':<38} "
        f"{indexed.requests_per_s / sqlite.requests_per_s:.2f} (requests/s)"
    )


def bench_attack(tmp: Path) -> None:
    rate = ATTACK_RATE
    print(
        f"# under attack: {rate:.0f} signed {len(sample_body())}-byte deliveries/s (open loop) "
        f"for {SECONDS}s through `pubrelay webhook` on the embedded bus; attackers: 4 posting "
        "~1 MiB bogus-signed bodies in a loop, 300 holding stalled 512 KiB chunked bodies"
    )
    body = sample_body()
    runs = [("quiet", 0, 0), ("4 bogus senders", 4, 0), ("300 stalled", 0, 300)]
    runs += [("4 bogus + 300 stalled", 4, 300)]
    rows: list[RunFigures] = []
    for name, bogus, stalled in runs:  # a new server each: RSS from its own idle
        port = free_port()
        env = {
            "PUBRELAY_HTTP__PORT": str(port),
            "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
            "PUBRELAY_DATA_DIR": str(tmp / f"data-{port}"),
            "PUBRELAY_LOG__FORMAT": "json",
        }
        with server([pubrelay_bin(), "webhook"], port, env, tmp) as proc:
            signature = sign(SECRET, body)
            attack_run("warm-up", port, proc.pid, body, signature, rate=rate, seconds=1)
            figures = attack_run(
                name,
                port,
                proc.pid,
                body,
                signature,
                rate=rate,
                seconds=SECONDS,
                bogus=bogus,
                stalled=stalled,
            )
        rows.append(figures)
        print(figures.row())
    quiet, attacked = rows[0], rows[-1]
    print(
        f"{'under attack / quiet':<38} p50 {attacked.percentile(0.5) / quiet.percentile(0.5):.2f}x"
        f"   p99 {attacked.percentile(0.99) / quiet.percentile(0.99):.2f}x"
        f"   (aim: p99 within 2x, every delivery 202)"
    )
    for figures in rows[1:]:
        print(f"{'attackers, ' + figures.name:<38} {json.dumps(figures.attackers)}")


SECTIONS: dict[str, Callable[[Path], None]] = {
    "intake": bench_intake,
    "kafka": bench_kafka,
    "worker": bench_worker,
    "e2e": bench_e2e,
    "attack": bench_attack,
    "retention": bench_retention,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default all)")
    chosen = parser.parse_args().sections or list(SECTIONS)
    configure_logging("warning", "json")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="pubrelay-bench-") as tmp:
        for name in chosen:
            SECTIONS[name](Path(tmp))
            print()


if __name__ == "__main__":
    main()
