"""`python -m tests.bench [SECTION ...]`: print figures and ratios from one run.

Every figure is printed beside a baseline measured in the same run (the machine's speed
drifts by up to 2x over minutes), and the ratio between them is the number to compare
across runs. Sections: intake (webhook on the embedded bus vs a bare aiohttp handler),
kafka (webhook -> Tansu broker ack vs the same bare handler), worker (events/s through a
no-op handler on both buses, vs the bus read alone; the ledger's cost), e2e (signed POST
-> e-mail accepted by an SMTP server, beside the intake latency of the same requests).
Environment: BENCH_SECONDS (per load run, default 8), BENCH_CONNECTIONS (default 64),
BENCH_WORKER_EVENTS (default 5000), BENCH_E2E_EVENTS (default 2000).
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
from tests.bench.e2e import e2e_env, run_e2e, start_smtp
from tests.bench.worker import bench_worker_on
from tests.bench.wrk import LoadResult, run_wrk
from tests.fixtures.app import EXAMPLE
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import free_port, pubrelay_bin

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
WORKER_EVENTS = int(os.environ.get("BENCH_WORKER_EVENTS", "5000"))
E2E_EVENTS = int(os.environ.get("BENCH_E2E_EVENTS", "2000"))
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
def server(args: list[str], port: int, env: dict[str, str], cwd: Path) -> Iterator[None]:
    with (cwd / f"server-{port}.log").open("wb") as log:
        proc = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_healthy(port, proc)
            yield
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
    second = bare(tmp)
    print(second.row("bare aiohttp again"))
    print(ratio_line("pubrelay webhook, embedded SQLite bus", sqlite, mean(first, second)))


SECTIONS: dict[str, Callable[[Path], None]] = {
    "intake": bench_intake,
    "kafka": bench_kafka,
    "worker": bench_worker,
    "e2e": bench_e2e,
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
