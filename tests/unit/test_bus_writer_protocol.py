"""The embedded bus's writer process's loop (bus/sqlite/writer.py) over a real pipe: appends
committed in order, a record whose deadline passed left out (and said so), retention steps
and pings answered in order."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from bus.sqlite import pipe
from bus.sqlite.pipe import encode
from bus.sqlite.retention import RetentionPass
from bus.sqlite.schema import encode_headers
from bus.sqlite.writer import Append, Open, Ping, Retain, Row, _Writer
from tests.fixtures.process import decode_answers


def served(stream: list[bytes]) -> list[tuple[bool, Any]]:
    """The answers to ``stream``, written at once (so its appends wait together)."""
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    with open(request_read, "rb", buffering=0) as stdin, open(answer_write, "wb") as stdout:
        server = threading.Thread(target=pipe.serve, args=(stdin, stdout, _Writer))
        server.start()
        os.write(request_write, b"".join(stream))
        os.close(request_write)
        server.join(10)
        assert not server.is_alive()
    with open(answer_read, "rb") as out:
        return decode_answers(out.read())


def row(value: bytes) -> Row:
    return ("t.events", b"cust_1", value, encode_headers((("n", value),)), 1_700_000_000_000)


def stored(path: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute("SELECT value FROM log ORDER BY id")]


def test_appends_are_committed_in_order_and_a_late_record_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    later = time.monotonic() + 60
    got = served(
        [
            encode(Open(str(path), 5.0)),
            encode(Append([row(b"a"), row(b"b")], [later, later])),
            encode(Append([row(b"late"), row(b"c")], [time.monotonic() - 1, later])),
            encode(Ping()),
            encode(Append([row(b"d")], [later])),
        ]
    )
    assert got == [(True, None), (True, []), (True, [0]), (True, None), (True, [])]
    assert stored(path) == [b"a", b"b", b"c", b"d"]


def test_requests_longer_than_one_read_arrive_whole(tmp_path: Path) -> None:
    # Each read of the pipe lands in the same buffer (bus/sqlite/pipe.py): values spread
    # over several reads, and different in every read, must be stored byte for byte.
    path = tmp_path / "bus.sqlite3"
    later = time.monotonic() + 60
    values = [os.urandom(3 << 20), b"small", os.urandom((1 << 20) + 7)]
    got = served(
        [encode(Open(str(path), 5.0)), *(encode(Append([row(v)], [later])) for v in values)]
    )
    assert got == [(True, None), (True, []), (True, []), (True, [])]
    assert stored(path) == values


def test_a_request_before_open_fails_and_the_next_ones_are_served(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    later = time.monotonic() + 60
    got = served(
        [
            encode(Append([row(b"x")], [later])),
            encode(Open(str(path), 5.0)),
            encode(Append([row(b"y")], [later])),
        ]
    )
    assert [ok for ok, _ in got] == [False, True, True]
    assert "not opened" in str(got[0][1])
    assert stored(path) == [b"y"]


def test_a_retention_step_comes_back_with_the_pass(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    old = ("t.old", None, b"old", encode_headers(()), 1_000)  # 1970: expired, read by no group
    got = served(
        [
            encode(Open(str(path), 5.0)),
            encode(Append([old, old], [time.monotonic() + 60] * 2)),
            encode(Retain(RetentionPass(cutoff_ms=int(time.time() * 1000)))),
        ]
    )
    assert got[1] == (True, [])
    first = got[2][1]
    assert isinstance(first, RetentionPass)
    assert first.topics == ["t.old"]  # the first step lists the topics
    again = served([encode(Open(str(path), 5.0)), encode(Retain(first))])
    assert again[1][1].deleted == 2
    assert stored(path) == []
