"""Opening one new SQLite file from several connections at the same moment
(:func:`bus.sqlite.connection.connect`): two workers sharing a ledger start together."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from bus.sqlite.connection import connect

_OPENERS = 4
_ROUNDS = 40


def _open_together(path: Path) -> list[str]:
    """``_OPENERS`` threads connect to ``path`` at once; what each saw ("wal" or the error)."""
    start = threading.Barrier(_OPENERS)
    seen: list[str] = []

    def open_one() -> None:
        start.wait()
        try:
            conn = connect(path, busy_timeout_s=5.0)
        except sqlite3.Error as exc:
            seen.append(repr(exc))
            return
        try:
            seen.append(conn.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            conn.close()

    threads = [threading.Thread(target=open_one) for _ in range(_OPENERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return seen


def test_connections_opening_a_new_file_together_all_get_it_in_wal_mode(tmp_path: Path) -> None:
    # Without the retry, about one round in five had an opener told "database is locked".
    for round_ in range(_ROUNDS):
        seen = _open_together(tmp_path / f"ledger-{round_}.sqlite")
        assert seen == ["wal"] * _OPENERS, f"round {round_}"


def test_a_file_locked_past_the_busy_timeout_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            connect(path, busy_timeout_s=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
