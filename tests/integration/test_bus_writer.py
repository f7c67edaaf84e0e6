"""The embedded bus's writer process: replaced when it dies, deaf to Ctrl-C, gone with the
process that started it (bus/sqlite/writer.py, bus/sqlite/writer_process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import pytest
import structlog

from bus.sqlite import SqliteBus
from bus.sqlite import log as sqlite_log
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


async def test_a_refused_commit_makes_the_bus_unready_until_one_succeeds_or_a_while_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`/readyz` pings the bus: a `SELECT 1` answered while every commit failed (a full disk,
    here a trigger saying so). The bus is unready after a refused commit, ready again at the
    next commit, and also after a while without one: a balancer that stops sending on
    `/readyz` must not keep it unready for good."""
    monkeypatch.setattr(sqlite_log, "UNREADY_AFTER_FAILED_PUBLISH_S", 0.5)
    path = tmp_path / "bus.sqlite3"
    bus = SqliteBus(path, publish_timeout_s=5.0)
    await bus.start()
    try:
        await bus.ping()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.executescript(
                """
                CREATE TABLE refuse (x); INSERT INTO refuse VALUES (1);
                CREATE TRIGGER refuse BEFORE INSERT ON log WHEN EXISTS (SELECT 1 FROM refuse)
                BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
                """
            )
        with pytest.raises(BusUnavailable, match="could not commit"):
            await bus.publish(TOPIC, b"refused", key=b"cust_1")
        with pytest.raises(BusUnavailable, match=r"last commit failed .*disk is full"):
            await bus.ping()
        await asyncio.sleep(0.6)
        await bus.ping()  # a while without a commit: ready, so that traffic comes back

        with pytest.raises(BusUnavailable):
            await bus.publish(TOPIC, b"refused again", key=b"cust_1")
        with pytest.raises(BusUnavailable):
            await bus.ping()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("DELETE FROM refuse")
            conn.commit()
        await bus.publish(TOPIC, b"stored", key=b"cust_1")
        await bus.ping()  # at once
    finally:
        await bus.close()
    assert stored(path) == {b"stored"}
