"""The ledger's writer process's loop (handlers/worker/ledger_writer.py) over a real pipe:
requests split across reads, answered in order, one per request, errors as answers."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from handlers.worker import ledger_sql
from handlers.worker.ledger_writer import Open, Purge, Write, encode, serve
from tests.fixtures.process import decode_answers


def run(requests: bytes, *, split_at: int) -> list[tuple[bool, Any]]:
    """Serve ``requests`` written in two parts (the first ends mid-request), then the end."""
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    with open(request_read, "rb", buffering=0) as stdin, open(answer_write, "wb") as stdout:
        server = threading.Thread(target=serve, args=(stdin, stdout))
        server.start()
        os.write(request_write, requests[:split_at])
        time.sleep(0.2)  # served what was whole; the rest of the cut request still to come
        os.write(request_write, requests[split_at:])
        os.close(request_write)
        server.join(10)
        assert not server.is_alive()
    with open(answer_read, "rb") as out:
        return decode_answers(out.read())


def claim(key: str, token: str) -> ledger_sql.Op:
    return (ledger_sql.CLAIM, "email", key, token, 15.0)


def test_requests_are_answered_in_order_across_reads(tmp_path: Path) -> None:
    stream = [
        encode(Open(str(tmp_path / "l.sqlite3"), 5.0)),
        encode(Write([claim("k1", "a"), claim("k2", "a")], 3600.0)),
        encode(Write([claim("k1", "b")], 3600.0)),  # held by a
        encode(Write([(ledger_sql.DONE, "email", "k1", "", 0.0)], 3600.0)),
        encode(Write([claim("k1", "b")], 3600.0)),  # done now
        encode(Purge(cutoff=0.0)),
    ]
    data = b"".join(stream)
    got = run(data, split_at=len(b"".join(stream[:2])) + 7)
    assert [ok for ok, _ in got] == [True] * 6
    assert got[0][1] is None
    assert got[1][1] == [("claimed", 1, 0.0), ("claimed", 1, 0.0)]
    [(state, attempts, wait_s)] = got[2][1]
    assert (state, attempts) == ("held", 1)
    assert 14.0 < wait_s <= 15.0
    assert got[3][1] == [None]
    assert got[4][1] == [("done", 0, 0.0)]
    assert got[5][1] == 0


def test_a_request_that_fails_is_answered_with_its_error_and_the_next_ones_are_served(
    tmp_path: Path,
) -> None:
    stream = [
        encode(Write([claim("k1", "a")], 3600.0)),  # before Open: no connection
        encode(Open(str(tmp_path / "l.sqlite3"), 5.0)),
        encode(Write([claim("k1", "a")], 3600.0)),
    ]
    got = run(b"".join(stream), split_at=3)
    assert [ok for ok, _ in got] == [False, True, True]
    assert "not opened" in str(got[0][1])
    assert got[2][1] == [("claimed", 1, 0.0)]


def test_writes_sent_before_the_worker_died_are_all_made(tmp_path: Path) -> None:
    """The worker killed: no one reads the answers, and every write it sent still lands."""
    path = tmp_path / "l.sqlite3"
    keys = [f"k{n}" for n in range(600)]
    stream = [encode(Open(str(path), 5.0))] + [
        encode(Write([(ledger_sql.DONE, "email", key, "", 0.0) for key in keys[i : i + 60]], 3600))
        for i in range(0, len(keys), 60)
    ]
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    os.close(answer_read)  # the worker is gone
    os.write(request_write, b"".join(stream))
    os.close(request_write)
    # Unbuffered: nothing left to flush at close (the process itself exits without flushing).
    with (
        open(request_read, "rb", buffering=0) as stdin,
        open(answer_write, "wb", buffering=0) as stdout,
    ):
        assert serve(stdin, stdout) is True
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (600,)
