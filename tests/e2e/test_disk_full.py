"""A full disk (or a quota) under `pubrelay webhook`: 503 + Retry-After while it lasts,
nothing half written, and 202 again by itself once there is room.

Two ways to run out of room, each a real one: a tmpfs volume of 4 MiB that this test
mounts (needs root, as CI has) and fills with a file, holding the data directory *and*
the process's log file; and a file-size limit (``RLIMIT_FSIZE``, set on the running
process and its bus writer process with ``prlimit``) under which every write that would
grow a file fails with ``EFBIG`` (Python ignores ``SIGXFSZ``, so neither is killed).
Lifting the limit or deleting the filler is "space returns".
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bench.processes import descendants
from tests.fixtures.app import SECRET, event_body, signed_headers
from tests.fixtures.process import PubrelayProcess, free_port, pubrelay_bin

Squeeze = tuple[Callable[[], None], Callable[[], None]]  # (fill, free)


def limit_file_size(pid: int, limit: tuple[int, int]) -> None:
    """``RLIMIT_FSIZE`` of the process and of its children (the bus's writer process)."""
    for process in (pid, *descendants(pid)):
        resource.prlimit(process, resource.RLIMIT_FSIZE, limit)


def post(process: PubrelayProcess, body: bytes) -> tuple[int, str | None]:
    request = urllib.request.Request(
        f"{process.url}/webhooks/voucherify",
        data=body,
        headers=signed_headers(body),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Retry-After")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After")


def readyz(process: PubrelayProcess) -> int:
    try:
        with urllib.request.urlopen(f"{process.url}/readyz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@contextlib.contextmanager
def small_volume(where: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the file-size limit variant still runs)")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(volume: Path, log_file: Path) -> None:
    """Write a filler file until the volume refuses another byte, then fill the last
    page of the process's log file with blank lines (tmpfs allocates whole pages)."""
    for path, byte in ((volume / "filler", b"\0"), (log_file, b"\n")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1 << 12, 1 << 9, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, byte * size)
        finally:
            os.close(fd)


@pytest.mark.parametrize("mechanism", ["tmpfs", "file_size_limit"])
def test_a_full_disk_answers_503_keeps_nothing_half_written_and_recovers_by_itself(
    mechanism: str, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if mechanism == "tmpfs":
            home = stack.enter_context(small_volume(tmp_path / "volume"))
        else:
            if not hasattr(resource, "prlimit"):
                pytest.skip("resource.prlimit is Linux only")
            home = tmp_path
        env = {
            "PUBRELAY_HTTP__PORT": str(port := free_port()),
            "PUBRELAY_DATA_DIR": str(home / "data"),
            "PUBRELAY_WEBHOOK__SECRETS": json.dumps([SECRET]),
            "PUBRELAY_LOG__FORMAT": "json",
        }
        # The log file lives on the same volume: a log line that cannot be written must
        # not change an answer, nor stop the process.
        webhook = PubrelayProcess(["webhook"], home, env, port)
        stack.callback(webhook.terminate)  # closes its log file before the umount
        webhook.wait_ready()

        earlier = [event_body() for _ in range(5)]
        assert [post(webhook, body)[0] for body in earlier] == [202] * 5

        if mechanism == "tmpfs":
            fill(home, webhook.log_path)
        else:  # every write that would grow a file now fails (EFBIG), the log file's too
            limit_file_size(webhook.proc.pid, (1, resource.RLIM_INFINITY))
        delivery = event_body()
        while_full = [post(webhook, delivery) for _ in range(3)]
        assert webhook.proc.poll() is None, webhook.output()
        assert [status for status, _ in while_full] == [503] * 3
        assert all(retry_after and retry_after.isdigit() for _, retry_after in while_full)
        assert readyz(webhook) == 503  # what every publish meets, not the bus's SELECT 1

        if mechanism == "tmpfs":
            (home / "filler").unlink()
        else:
            limit_file_size(webhook.proc.pid, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 10
        while (status := post(webhook, delivery)[0]) != 202 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 202
        assert readyz(webhook) == 200
        assert webhook.terminate() == 0
        output = webhook.output()
        assert "Traceback" not in output
        assert '"event":"log_lines_lost"' in output  # said once there was room again

        with contextlib.closing(sqlite3.connect(home / "data" / "bus.sqlite3")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            stored = [row[0] for row in conn.execute("SELECT value FROM log ORDER BY id")]
    assert stored == [*earlier, delivery]  # the refused attempts left nothing behind


@pytest.mark.parametrize(
    ("command", "bus_on_the_volume", "named", "said"),
    [
        ("webhook", True, "bus.sqlite3", "its file system is full, 0 bytes free"),
        ("serve", True, "bus.sqlite3.worker.lock", "No space left on device"),
        ("serve", False, "console-token", "No space left on device"),
        ("serve", False, "index.sqlite3", "its file system is full, 0 bytes free"),
    ],
    ids=["webhook-bus", "serve-worker-lock", "serve-console-token", "serve-console-index"],
)
def test_a_start_on_a_full_disk_names_the_file_and_the_full_disk_and_exits_3(
    command: str, bus_on_the_volume: bool, named: str, said: str, tmp_path: Path
) -> None:
    """SQLite answers a full disk at open with a bare "disk I/O error" (it cannot create
    the -shm file): the bus's failure said only that, the ledger's and the console index's
    stopped `serve` with a traceback, and the worker's lock file with exit 2, the code of a
    bad setting."""
    with small_volume(tmp_path / "volume") as home:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PUBRELAY_")},
            "PUBRELAY_HTTP__PORT": str(free_port()),
            "PUBRELAY_DATA_DIR": str(home / "data"),
            "PUBRELAY_WEBHOOK__SECRETS": json.dumps([SECRET]),
            "PUBRELAY_LOG__FORMAT": "json",
        }
        if not bus_on_the_volume:
            env["PUBRELAY_BUS__URL"] = f"sqlite:///{tmp_path / 'bus.sqlite3'}"
        if named == "index.sqlite3":  # no token to generate: the index is the next file
            env["PUBRELAY_CONSOLE__TOKEN"] = "t" * 32
        (home / "data").mkdir(mode=0o700)
        fill(home, home / "data" / "unused.log")
        started = subprocess.run(
            [pubrelay_bin(), command, *(["--console"] if command == "serve" else [])],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert started.returncode == 3, (started.stdout, started.stderr)
    assert "Traceback" not in started.stderr
    output = started.stdout + started.stderr
    assert said in output
    assert f"{home / 'data' / named}" in output
