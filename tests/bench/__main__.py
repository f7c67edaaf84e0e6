"""`python -m tests.bench [--results PATH] [--short] [SECTION ...]`: `make bench`.

Every figure is printed beside a baseline measured in the same run (the machine's speed
drifts by up to 2x over minutes), and the ratio between them is the number to compare
across runs. Each section also records its figures (:mod:`tests.bench.results`: value,
baseline, ratio, target, met); at the end they are written to ``--results`` (default
``build/bench-results.json``) and the run ends with one table of issue 13's figures
(:mod:`tests.bench.summary`), "not run" for a section left out.

Sections: intake (webhook on the embedded bus vs a bare aiohttp handler), kafka (webhook
-> Tansu broker ack vs the same bare handler), worker (events/s through a no-op handler on
both buses, vs the bus read alone and the in-memory ledger; the ledger's cost), e2e (signed
POST -> e-mail accepted by an SMTP server, beside the intake latency of the same requests),
attack (signed deliveries at a steady rate, quietly and under attack: 4 clients posting
~1 MiB bogus-signed bodies and 300 holding stalled bodies; see attack.py), retention (the
write lock a retention pass of the embedded bus holds on a log of millions of records,
before and after chunking; see retention.py), memory and backlog (RSS of `pubrelay serve`
under a steady load vs its idle RSS, and of `pubrelay worker` draining a backlog of a
million records; see memory.py).
The intake and kafka sections alternate their runs with bare aiohttp's, BENCH_ROUNDS
times (bare, pubrelay, bare, …, bare): each pubrelay run is divided by the mean of the bare
runs just before and after it, and the round with the median ratio is the figure. The
worker section runs the in-memory and the SQLite ledger in turns, BENCH_ROUNDS times too,
and keeps the round with the median SQLite-ledger rate.
Environment: BENCH_SECONDS (per load run, default 8), BENCH_ROUNDS (default 3),
BENCH_CONNECTIONS (default 64),
BENCH_WORKER_EVENTS (default 30000: about 2 s per worker run), BENCH_E2E_RATE (the e2e
section's open-loop deliveries per second, default 200), BENCH_E2E_EVENTS (its closed-loop
run, default 2000), BENCH_ATTACK_RATE (legitimate deliveries per second in the attack
section, default 200), BENCH_RETENTION_ROWS (default 2000000), BENCH_RETENTION_VALUE_BYTES
(default 512), BENCH_MEMORY_RATE (default 200), BENCH_BACKLOG_EVENTS (default 1000000),
BENCH_BACKLOG_MAX_S (default 600). ``--short`` sets them all tiny (SHORT_SIZES below)
unless set: what the suite runs (tests/e2e/test_bench_short.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bus.sqlite import SqliteBus
from bus.types import Bus
from consumer.signature import sign
from pubrelay.logging import configure_logging
from tests.bench import results
from tests.bench.attack import RunFigures
from tests.bench.attack import run as attack_run
from tests.bench.e2e import e2e_env, run_e2e, start_smtp
from tests.bench.memory import bench_backlog, bench_memory
from tests.bench.processes import server
from tests.bench.results import record
from tests.bench.retention import bench_retention
from tests.bench.summary import summary_lines
from tests.bench.worker import bench_worker_on, run_as_in_production
from tests.bench.wrk import LoadResult, run_wrk
from tests.fixtures.app import EXAMPLE
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings, make_kafka_bus
from tests.fixtures.process import free_port, pubrelay_bin

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
WORKER_EVENTS = int(os.environ.get("BENCH_WORKER_EVENTS", "30000"))
E2E_EVENTS = int(os.environ.get("BENCH_E2E_EVENTS", "2000"))
ATTACK_RATE = float(os.environ.get("BENCH_ATTACK_RATE", "200"))
INTAKE_P99_TARGET_MS = 25.0  # issue 13's targets
WORKER_TARGET_PER_S = 20_000.0
SECRET = "bench-secret"
REPO = Path(__file__).resolve().parents[2]
PATH = "/webhooks/voucherify"


def sample_body() -> bytes:
    """The official example in its envelope, compact as Voucherify sends it (~4.4 KB)."""
    envelope = json.loads((EXAMPLE / "customer.publication.succeeded.json").read_bytes())
    return json.dumps(envelope, separators=(",", ":")).encode()


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
        f"(acks=all, 1 MiB batches; no idempotence, which Tansu refuses, so pubrelay's own "
        f"produce requests), wrk -t1 -c{CONNECTIONS} -d{SECONDS}s"
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
        kafka, baseline = in_turns(tmp, "pubrelay webhook, Kafka (Tansu)", env)
    finally:
        broker.stop()
    record_throughput("kafka", "webhook, Kafka (Tansu, acks=all)", kafka, baseline, 0.45)


def bench_worker(tmp: Path) -> None:
    count = WORKER_EVENTS
    print(f"# worker: {count} events through the no-op handler, bounded to 120 s per run")

    async def sqlite_bus() -> Bus:
        bus = SqliteBus(tmp / f"worker-bench-{time.monotonic_ns()}.sqlite3")
        await bus.start()
        return bus

    record_worker(
        "sqlite", run_as_in_production(bench_worker_on("sqlite", sqlite_bus, tmp, count, ROUNDS))
    )
    broker = TansuBroker(tmp / "tansu-worker.log")
    broker.start()
    try:

        async def kafka_bus() -> Bus:
            bus = make_kafka_bus(kafka_bus_settings(broker, partitions=6))
            await bus.start()
            return bus

        record_worker(
            "kafka",
            run_as_in_production(bench_worker_on("kafka", kafka_bus, tmp, count, ROUNDS)),
        )
    finally:
        broker.stop()


def record_worker(bus: str, rates: dict[str, float]) -> None:
    """The worker's events/s with each ledger, beside the bus read alone and (for the
    SQLite ledger, issue 13's figure) the in-memory ledger of the same run."""
    record(
        "worker",
        f"{bus}: worker, no-op handler, in-memory ledger",
        rates["memory"],
        "events/s",
        baseline=rates["bus"],
        baseline_name=f"{bus}: bus alone (fetch + commit)",
    )
    target = WORKER_TARGET_PER_S if bus == "sqlite" else None
    record(
        "worker",
        f"{bus}: worker, no-op handler, SQLite ledger",
        rates["sqlite"],
        "events/s",
        baseline=rates["memory"],
        baseline_name=f"{bus}: worker, no-op handler, in-memory ledger",
        target=None if target is None else f">= {target:,.0f} events/s",
        met=None if target is None else rates["sqlite"] >= target,
    )


def bench_e2e(tmp: Path) -> None:
    rate = float(os.environ.get("BENCH_E2E_RATE", "200"))
    closed = E2E_EVENTS
    print(
        f"# end to end: signed POSTs at {rate:.0f}/s for {SECONDS}s (open loop), then {closed} "
        "32 at a time (closed loop) -> pubrelay serve (embedded bus, email handler, 4 SMTP "
        "connections) -> e-mail accepted by an SMTP server on loopback (its own process)"
    )
    smtp_port, http_port = free_port(), free_port()
    sink = start_smtp(smtp_port)
    try:
        args = [pubrelay_bin(), "serve"]
        with server(args, http_port, e2e_env(tmp, http_port, smtp_port), tmp) as proc:
            url = f"http://127.0.0.1:{http_port}{PATH}"
            figures = run_e2e(url, sink, proc.pid, rate=rate, seconds=SECONDS, closed_count=closed)
    finally:
        sink.stop()
    for row in figures.rows():
        print(row)
    figures.record()


BASELINE_NAME = (
    "bare aiohttp (read body, 204), mean of the runs before and after; "
    "the round with the median ratio"
)


def in_turns(tmp: Path, name: str, env: dict[str, str]) -> tuple[LoadResult, LoadResult]:
    """``pubrelay webhook`` (with ``env``) and bare aiohttp in turns, :data:`ROUNDS` times
    (bare, pubrelay, bare, …, bare): the machine's speed moves by minutes, and each of
    our runs is divided by the mean of the bare runs just before and after it. Returns
    the round with the median ratio: our run and its baseline."""
    before = bare(tmp)
    print(before.row("bare aiohttp (read body, 204)"))
    rounds: list[tuple[LoadResult, LoadResult]] = []
    for _ in range(ROUNDS):
        ours = pubrelay_webhook(tmp, env)
        print(ours.row(name))
        after = bare(tmp)
        print(after.row("bare aiohttp again"))
        rounds.append((ours, mean(before, after)))
        before = after
    ratios = [ours.requests_per_s / baseline.requests_per_s for ours, baseline in rounds]
    median = sorted(range(len(rounds)), key=ratios.__getitem__)[len(rounds) // 2]
    ours, baseline = rounds[median]
    each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    print(f"{ratio_line(name, ours, baseline)}  (the median of {len(rounds)}: {each})")
    return ours, baseline


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


def record_throughput(
    section: str, name: str, result: LoadResult, baseline: LoadResult, target: float | None
) -> None:
    """Requests/s beside the bare handler's mean of the same run (issue 13's ratio)."""
    ratio = result.requests_per_s / baseline.requests_per_s
    record(
        section,
        f"{name}, requests/s",
        result.requests_per_s,
        "requests/s",
        baseline=baseline.requests_per_s,
        baseline_name=BASELINE_NAME,
        target=None if target is None else f"ratio >= {target:.2f}",
        met=None if target is None else ratio >= target,
        extra={"p50_ms": result.p50_ms, "non_2xx": result.non_2xx, "errors": result.errors},
    )


def bench_intake(tmp: Path) -> None:
    print(
        f"# intake: signed {len(sample_body())}-byte deliveries, wrk -t1 -c{CONNECTIONS} "
        f"-d{SECONDS}s, one server process"
    )
    sqlite, baseline = in_turns(tmp, "pubrelay webhook, embedded SQLite bus", {})
    # The index's cost: against a run without it just before (the rounds ran minutes ago).
    plain = pubrelay_webhook(tmp, {})
    print(plain.row("the same without the index, again"))
    indexed = pubrelay_webhook(tmp, {"PUBRELAY_CONSOLE__TOKEN": "bench-console-token"})
    print(indexed.row("the same with the console's event index"))
    print(
        f"{'event index on / off':<38} "
        f"{indexed.requests_per_s / plain.requests_per_s:.2f} (requests/s)"
    )
    record_throughput("intake", "webhook, embedded SQLite bus", sqlite, baseline, 0.50)
    record(
        "intake",
        "webhook, embedded SQLite bus, p99",
        sqlite.p99_ms,
        "ms",
        baseline=baseline.p99_ms,
        baseline_name=BASELINE_NAME,
        target=f"<= {INTAKE_P99_TARGET_MS:.0f} ms",
        met=sqlite.p99_ms <= INTAKE_P99_TARGET_MS,
    )
    record(
        "intake",
        "webhook with the console's event index, requests/s",
        indexed.requests_per_s,
        "requests/s",
        baseline=plain.requests_per_s,
        baseline_name="webhook, embedded SQLite bus (no index), the run just before",
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
        record(
            "attack",
            f"{name}: legitimate deliveries, p99",
            figures.percentile(0.99),
            "ms",
            baseline=rows[0].percentile(0.99),
            baseline_name="quiet: legitimate deliveries, p99",
            target="within 2x of quiet, every delivery 202",
            met=figures.percentile(0.99) <= 2 * rows[0].percentile(0.99)
            and figures.not_accepted == 0,
            extra={"not_202": figures.not_accepted, "peak_rss_mib": figures.peak_rss_mib},
        )
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
    "memory": bench_memory,
    "backlog": bench_backlog,
}

# --short: every size tiny (a second per load run), for the suite's check that each section
# runs and records its figures (tests/e2e/test_bench_short.py); an explicit BENCH_* wins.
SHORT_SIZES = {
    "BENCH_SECONDS": "1",
    "BENCH_ROUNDS": "1",
    "BENCH_CONNECTIONS": "16",
    "BENCH_WORKER_EVENTS": "3000",  # several fetches: the clock starts after the first
    "BENCH_E2E_EVENTS": "50",
    "BENCH_E2E_RATE": "50",
    "BENCH_ATTACK_RATE": "50",
    "BENCH_RETENTION_ROWS": "20000",
    "BENCH_MEMORY_RATE": "50",
    "BENCH_BACKLOG_EVENTS": "3000",
    "BENCH_BACKLOG_MAX_S": "60",
}
DEFAULT_RESULTS = REPO / "build" / "bench-results.json"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default all)")
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="the JSON file of every recorded figure (default build/bench-results.json)",
    )
    parser.add_argument("--short", action="store_true", help="tiny sizes (see SHORT_SIZES)")
    args = parser.parse_args()
    chosen = args.sections or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.short and os.environ.get("BENCH_SHORT") != "1":
        # The sizes are read when the modules are imported: start again with them set.
        env = {**SHORT_SIZES, **os.environ, "BENCH_SHORT": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "tests.bench", *sys.argv[1:]], env)
    configure_logging("warning", "json")
    run: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pubrelay-bench-") as tmp:
            for name in chosen:
                run.append(name)
                started = time.monotonic()
                # A directory per section, removed when it ends: the intake's bus files
                # (2.7 GB) left behind cut the next section's Kafka row from 0.58 to
                # 0.42-0.46 (docs/performance.md, "A produce request of our own").
                where = Path(tmp) / name
                where.mkdir()
                try:
                    SECTIONS[name](where)
                except BaseException as err:
                    print(f"({name} failed: {err!r})\n", flush=True)
                    raise
                finally:
                    shutil.rmtree(where, ignore_errors=True)
                print(f"({name}: {time.monotonic() - started:.0f} s)\n")
    finally:
        results.write(args.results, sections=run, short=os.environ.get("BENCH_SHORT") == "1")
        for line in summary_lines(results.figures(), run):
            print(line)
        print(f"results: {args.results}")


if __name__ == "__main__":
    main()
