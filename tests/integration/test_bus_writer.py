"""The embedded bus's writer process: replaced when it dies, deaf to Ctrl-C, gone with the
process that started it (bus/sqlite/writer.py, bus/sqlite/writer_process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import structlog

from bus.sqlite import SqliteBus
from schemas.errors import BusUnavailable
from tests.fixtures.process import child_ends_with_its_parent, ended, running_writer
from tests.fixtures.worker import eventually

TOPIC = "p.events"


def stored(path: Path) -> set[bytes]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT value FROM log WHERE topic = ?", (TOPIC,))}


async def test_a_killed_writer_is_replaced_and_every_acknowledged_record_is_stored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, publish_timeout_s=5.0)
    await bus.start()
    first = running_writer(bus)
    acknowledged: list[bytes] = []
    refused: list[bytes] = []

    async def publish(value: bytes) -> None:
        try:
            await bus.publish(TOPIC, value, key=b"cust_1")
        except BusUnavailable:
            refused.append(value)  # the sender retries (Voucherify does, after a 503)
        else:
            acknowledged.append(value)

    try:
        with structlog.testing.capture_logs() as logs:
            for wave in range(30):
                if wave == 10:
                    os.kill(first, signal.SIGKILL)  # while the next waves are sent
                await asyncio.gather(*(publish(b"%d-%d" % (wave, n)) for n in range(20)))
            await eventually(
                lambda: bus.writer_pid not in (None, first), timeout_s=10, what="a new writer"
            )
            await publish(b"after")
    finally:
        await bus.close()

    assert acknowledged[-1] == b"after"
    assert len(acknowledged) + len(refused) == 30 * 20 + 1
    assert set(acknowledged) <= stored(path)  # nothing acknowledged is lost
    [exited] = [e for e in logs if e["event"] == "bus_writer_exited"]
    assert exited["exit_code"] == -signal.SIGKILL
    assert any(e["event"] == "bus_writer_started" for e in logs)


async def test_the_writer_ignores_ctrl_c_and_ends_with_the_bus(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group; the shutdown still commits its last records."""
    bus = SqliteBus(tmp_path / "bus.sqlite3")
    await bus.start()
    pid = running_writer(bus)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await bus.publish(TOPIC, b"kept")
    assert bus.writer_pid == pid
    await bus.close()
    assert ended(pid)
    assert stored(tmp_path / "bus.sqlite3") == {b"kept"}


async def test_the_writer_ends_with_a_process_killed_outright(tmp_path: Path) -> None:
    script = (
        "import asyncio, pathlib\n"
        "from bus.sqlite import SqliteBus\n"
        "async def main():\n"
        f"    bus = SqliteBus(pathlib.Path({str(tmp_path / 'bus.sqlite3')!r}))\n"
        "    await bus.start()\n"
        "    print(bus.writer_pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    await child_ends_with_its_parent(script)
