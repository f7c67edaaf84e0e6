"""The SQLite ledger's writer process: replaced when it dies, deaf to Ctrl-C, gone with
the worker, its WAL and its journals as documented (handlers/worker/ledger_writer.py,
bus/sqlite/writer_process.py)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from bus.sqlite.writer_process import WriterExited
from bus.types import Bus
from handlers.worker.ledger import SqliteLedger
from tests.fixtures.process import child_ends_with_its_parent, ended, running_writer
from tests.fixtures.worker import (
    ScriptedHandler,
    eventually,
    ledger_key,
    make_worker,
    publish_event,
    running,
)


async def test_a_killed_writer_is_replaced_and_every_event_is_handled_once(
    bus: Bus, topic_prefix: str, tmp_path: Path
) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=3600)
    await ledger.open()
    killed: list[int] = []

    async def kill_the_writer_at_the_50th(event: object) -> None:
        if len(handler.calls) == 50 and not killed and (pid := ledger.writer_pid):
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # while the other lanes claim and complete

    handler = ScriptedHandler(script=kill_the_writer_at_the_50th)
    worker = make_worker(handler, bus, ledger, CollectorRegistry(), topic_prefix)
    events = [f"ev_{n}" for n in range(150)]
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                for n, event_id in enumerate(events):
                    await publish_event(
                        bus, topic_prefix, event_id=event_id, customer_id=f"c{n % 40}"
                    )
                await eventually(
                    lambda: set(handler.effects) == set(events), timeout_s=20, what="every effect"
                )
        assert killed, "the writer was never killed"
        assert max(handler.calls.values()) == 1, "an effect ran twice"
        assert ledger.writer_pid not in (None, killed[0])
        for event_id in events:
            assert await ledger.is_done("recorder", ledger_key(event_id))
        [exited] = [e for e in logs if e["event"] == "ledger_writer_exited"]
        assert exited["exit_code"] == -signal.SIGKILL
        assert any(e["event"] == "ledger_writer_started" for e in logs)
    finally:
        await ledger.close()


async def test_a_write_while_the_writer_is_gone_fails_clearly_and_the_next_one_lands(
    ledger: SqliteLedger,
) -> None:
    os.kill(running_writer(ledger), signal.SIGKILL)
    await eventually(lambda: ledger.writer_pid is None, timeout_s=5, what="the exit noticed")
    with pytest.raises(WriterExited, match="writer process is not running"):
        await ledger.mark_done("email", "ev_1")  # the worker backs off and tries again
    await eventually(lambda: ledger.writer_pid is not None, timeout_s=10, what="a new writer")
    await ledger.mark_done("email", "ev_2")
    assert await ledger.is_done("email", "ev_2")


async def test_the_writer_ignores_ctrl_c(ledger: SqliteLedger) -> None:
    """Ctrl-C reaches the whole process group; the worker's shutdown still writes."""
    pid = running_writer(ledger)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await ledger.mark_done("email", "ev_1")
    assert ledger.writer_pid == pid
    assert await ledger.is_done("email", "ev_1")
    await ledger.close()
    assert ended(pid)


async def test_the_writer_ends_with_a_worker_killed_outright(tmp_path: Path) -> None:
    script = (
        "import asyncio, sys\n"
        "from handlers.worker.ledger import SqliteLedger\n"
        "async def main():\n"
        f"    ledger = SqliteLedger(__import__('pathlib').Path({str(tmp_path / 'l.sqlite3')!r}),"
        " retention_s=60)\n"
        "    await ledger.open()\n"
        "    print(ledger.writer_pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    await child_ends_with_its_parent(script)


async def test_the_wal_is_checkpointed_every_4000_pages_not_sqlites_1000(tmp_path: Path) -> None:
    """The `-wal` file's size as the README states it: the writer lets 4,000 pages (16 MB)
    of completions gather before a checkpoint copies them into the file, then reuses the
    file (SQLite's default, 1,000 pages, keeps it near 4 MB)."""
    path = tmp_path / "ledger.sqlite3"
    wal = tmp_path / "ledger.sqlite3-wal"
    ledger = SqliteLedger(path, retention_s=3600)
    await ledger.open()
    sizes: list[int] = []
    try:
        for _ in range(70):  # 17,500 completions, 250 per loop turn
            keys = [os.urandom(12).hex() for _ in range(250)]
            await asyncio.gather(*(ledger.mark_done("recorder", key) for key in keys))
            sizes.append(wal.stat().st_size)
    finally:
        await ledger.close()
    page = 4096
    assert 3_000 * page < max(sizes) < 4_500 * page, sizes
    assert sizes[-10:] == [max(sizes)] * 10, "the WAL kept growing: never checkpointed"


async def test_a_group_commit_opens_no_file_of_its_own(tmp_path: Path) -> None:
    """Each run's statements keep their journal in memory: with its writer unable to open
    one more file, 3,000 claims and completions of random keys are all made. A run of 250
    random keys changes a few hundred pages, past the 64 KiB after which SQLite's default
    spills a statement's journal into a temporary file in every transaction."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=3600)
    await ledger.open()
    try:
        pid = running_writer(ledger)
        open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        keys = [os.urandom(12).hex() for _ in range(3000)]
        for start in range(0, len(keys), 250):
            turn = keys[start : start + 250]
            claims = await asyncio.gather(*(ledger.claim("recorder", key, "t1") for key in turn))
            assert {claim.state for claim in claims} == {"claimed"}
            await asyncio.gather(*(ledger.mark_done("recorder", key) for key in turn))
        assert ledger.writer_pid == pid
        for key in keys[::100]:
            assert await ledger.is_done("recorder", key)
    finally:
        await ledger.close()
