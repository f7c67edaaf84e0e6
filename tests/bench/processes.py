"""The servers `make bench` measures: each a subprocess on a free loopback port, healthy
before it is measured, stopped by its own PID; and its resident memory, read from
``/proc/<pid>/status``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    """``args`` running with ``env`` added, its output in ``cwd/server-<port>.log``."""
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


def rss_mb(pid: int) -> float:
    """The resident memory (``VmRSS``) of the process and its descendants (`pubrelay
    worker`'s ledger writer) in MB (10^6 bytes); 0 once the process is gone."""
    total = 0
    for each in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total / 1e6


def descendants(pid: int) -> list[int]:
    """The ids of the process's children, theirs, and so on (from ``/proc``)."""
    found: list[int] = []
    parents = [pid]
    while parents:
        children = []
        for parent in parents:
            for task in Path(f"/proc/{parent}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    children += [int(c) for c in task.read_text().split()]
        found += children
        parents = children
    return found
