"""The "under attack" section: legitimate signed deliveries at a steady rate, with and
without hostile clients, and the server's memory meanwhile.

The legitimate load is open loop: request ``i`` is due at ``start + i / rate`` whatever
happened to the others, and its latency counts from that moment, so a stalled server
shows as latency rather than as fewer requests. The attackers run in a process of their
own (``python -m tests.bench.attack PORT SECONDS --bogus N --stalled N``), so their work
does not delay the client that measures:

- bogus senders post ~1 MiB bodies with a made-up signature, one after another, shaped
  like the bodies that were the most expensive to check (``"" "" ""...``, ``a a a...``);
- stallers send headers and 512 KiB of a chunked body, then nothing; once the server
  closes the connection they open another, so there are always that many.

Loopback only; every loop ends at its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

PATH = "/webhooks/voucherify"
BOGUS_SIGNATURE = "0" * 64
BOGUS_BODY_BYTES = 1_000_000
STALLED_BODY_BYTES = 512 * 1024
REQUEST_TIMEOUT_S = 10.0  # Voucherify's


# --- the legitimate load and the server's memory -------------------------------------------


@dataclass
class RunFigures:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    server_cpu_s: float = 0.0
    seconds: float = 1.0
    attackers: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    @property
    def not_accepted(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "202")

    def row(self) -> str:
        return (
            f"{self.name:<38} p50 {self.percentile(0.50):>7.2f} ms   p99 "
            f"{self.percentile(0.99):>7.2f} ms   non-202 {self.not_accepted}/"
            f"{sum(self.statuses.values())}   RSS {self.idle_rss_mib:.0f} -> "
            f"{self.peak_rss_mib:.0f} MiB (+{self.peak_rss_mib - self.idle_rss_mib:.0f})"
            f"   server CPU {100 * self.server_cpu_s / self.seconds:.0f}%"
        )


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """Samples a process's resident memory every 50 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def steady_load(
    url: str, body: bytes, signature: str, *, rate: float, seconds: float, figures: RunFigures
) -> None:
    """``rate`` signed deliveries per second for ``seconds``, open loop."""
    headers = {"Content-Type": "application/json", "x-voucherify-signature": signature}
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=1024)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(due: float) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    figures.statuses[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as err:
                figures.statuses[type(err).__name__] += 1
            figures.latencies_ms.append((loop.time() - due) * 1000)

        start = loop.time() + 0.05
        tasks = []
        for i in range(int(rate * seconds)):
            due = start + i / rate
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)


def receiving_bodies(port: int) -> float | None:
    """The server's ``pubrelay_webhook_bodies_receiving{size="any"}``, if it has one."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('pubrelay_webhook_bodies_receiving{size="any"}'):
            return float(line.split()[-1])
    return None


def wait_calm(port: int, timeout_s: float = 15.0) -> None:
    """Until the server receives no body (what the last attack left is cut or closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not receiving_bodies(port):
            return
        time.sleep(0.2)


def run(
    name: str,
    port: int,
    pid: int,
    body: bytes,
    signature: str,
    *,
    rate: float,
    seconds: int,
    bogus: int = 0,
    stalled: int = 0,
) -> RunFigures:
    """One row: the legitimate load while ``bogus`` and ``stalled`` attackers run."""
    wait_calm(port)
    figures = RunFigures(name, idle_rss_mib=rss_mib(pid), seconds=seconds)
    attackers: subprocess.Popen[str] | None = None
    if bogus or stalled:
        args = ["--bogus", str(bogus), "--stalled", str(stalled)]
        attackers = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.attack", str(port), str(seconds + 4), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert attackers.stdout is not None
        attackers.stdout.readline()  # "ready": every staller has sent its first chunk
        time.sleep(1.0)  # the server takes in the first wave before the measure starts
    try:
        cpu_before = cpu_s(pid)
        with PeakRss(pid) as peak:
            url = f"http://127.0.0.1:{port}{PATH}"
            asyncio.run(
                steady_load(url, body, signature, rate=rate, seconds=seconds, figures=figures)
            )
        figures.peak_rss_mib = peak.peak
        figures.server_cpu_s = cpu_s(pid) - cpu_before
    finally:
        if attackers is not None:
            try:
                out, _ = attackers.communicate(timeout=seconds + 60)
                figures.attackers = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                attackers.kill()
                attackers.wait()
    return figures


# --- the attackers (their own process) ---------------------------------------------------------


def bogus_bodies() -> list[bytes]:
    half = BOGUS_BODY_BYTES // 2
    return [b'"" ' * (BOGUS_BODY_BYTES // 3), b"a " * half, b'{"a": "' + b"a " * (half - 8) + b'"}']


async def send_bogus(url: str, deadline: float, counts: Counter[str]) -> None:
    bodies = bogus_bodies()
    headers = {"Content-Type": "application/json", "x-voucherify-signature": BOGUS_SIGNATURE}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            try:
                async with session.post(url, data=bodies[n % 3], headers=headers) as response:
                    await response.read()
                    counts[f"bogus_{response.status}"] += 1
            except (aiohttp.ClientError, TimeoutError):
                counts["bogus_error"] += 1
                await asyncio.sleep(0.05)


async def stall(port: int, deadline: float, counts: Counter[str], ready: asyncio.Event) -> None:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"x-voucherify-signature: {BOGUS_SIGNATURE}\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{STALLED_BODY_BYTES:x}\r\n"
    ).encode() + b" " * STALLED_BODY_BYTES
    first = True
    while (left := deadline - time.monotonic()) > 0:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(left):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                await writer.drain()
                counts["stalled_connections"] += 1
                if first:
                    first = False
                    ready.set()
                answer = await reader.read()  # nothing more is sent; wait for the close
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
            counts[f"stalled_answered_{status}"] += 1
        except TimeoutError:
            counts["stalled_held_to_the_end"] += 1
        except OSError:
            counts["stalled_error"] += 1
            await asyncio.sleep(0.05)
        finally:
            if first:
                first = False
                ready.set()
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


async def attack(port: int, seconds: float, bogus: int, stalled: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    readies = [asyncio.Event() for _ in range(stalled)]
    tasks = [asyncio.create_task(stall(port, deadline, counts, r)) for r in readies]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    print("ready", flush=True)
    url = f"http://127.0.0.1:{port}{PATH}"
    tasks += [asyncio.create_task(send_bogus(url, deadline, counts)) for _ in range(bogus)]
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.attack")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--bogus", type=int, default=4)
    parser.add_argument("--stalled", type=int, default=300)
    args = parser.parse_args()
    counts = asyncio.run(attack(args.port, args.seconds, args.bogus, args.stalled))
    print(json.dumps(dict(sorted(counts.items()))), flush=True)


if __name__ == "__main__":
    main()
