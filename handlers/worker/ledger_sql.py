"""The SQLite ledger's tables and statements: one group commit in a few statements.

:class:`~handlers.worker.ledger.SqliteLedger` queues the claims, completions, renewals and
releases that arrive together and sends them to its writer process
(:mod:`handlers.worker.ledger_writer`), which makes them with :func:`write_batch` in one
``BEGIN IMMEDIATE`` transaction (atomic across the processes sharing the file, durable at
its commit). Operations and results are tuples: they cross to that process pickled, and it
imports the standard library and this module only.

Claims and completions are made a run at a time, not a row at a time: a run's claims
read the state of all their keys in one statement and write their new claims in one
more; its completions are one insert and one delete. The rows travel as one JSON
parameter (``json_each``, ``json_extract``: SQLite's JSON functions, built in since 3.38 and
compiled into most older builds), so each statement's text is fixed and stays prepared and
a transaction of hundreds of writes is a handful of SQLite calls (docs/performance.md, "The
worker and its ledger").

A run never holds two operations on the same key: the batch keeps its order, and a key
seen again (say a release and a new claim of the same event) starts a new run after the
first one's statements were made. Renewals, releases and the purge are rare and run as
single statements in their turn.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Final

from bus.sqlite.connection import transaction
from schemas.errors import ConfigError

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger (
    handler TEXT NOT NULL,
    event_id TEXT NOT NULL,
    completed_at REAL NOT NULL,
    PRIMARY KEY (handler, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_completed_at ON ledger (completed_at);
CREATE TABLE IF NOT EXISTS claims (
    handler TEXT NOT NULL,
    key TEXT NOT NULL,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (handler, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_updated_at ON claims (updated_at);
"""

_RUN_MAX: Final = 500
"""Operations per run at most (bounds one statement's JSON parameter)."""

# Each row of the state: [its index in the run, 1 when done, holder, expires_at, attempts].
_CLAIM_STATE: Final = """
SELECT json_group_array(json_array(
    j.key,
    (SELECT 1 FROM ledger AS l
     WHERE l.handler = json_extract(j.value, '$[0]')
       AND l.event_id = json_extract(j.value, '$[1]')
       AND l.completed_at >= ?),
    c.token, c.expires_at, c.attempts))
FROM json_each(?) AS j
LEFT JOIN claims AS c
    ON c.handler = json_extract(j.value, '$[0]') AND c.key = json_extract(j.value, '$[1]')
"""

_CLAIM_WRITE: Final = """
INSERT INTO claims (handler, key, token, expires_at, attempts, updated_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), ?
FROM json_each(?) WHERE true
ON CONFLICT (handler, key) DO UPDATE SET
    token = excluded.token, expires_at = excluded.expires_at,
    attempts = excluded.attempts, updated_at = excluded.updated_at
"""

_DONE_WRITE: Final = """
INSERT INTO ledger (handler, event_id, completed_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ? FROM json_each(?) WHERE true
ON CONFLICT (handler, event_id) DO UPDATE SET completed_at = excluded.completed_at
"""

_DONE_DROP_CLAIMS: Final = """
DELETE FROM claims WHERE (handler, key) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))
"""


CLAIM: Final = "claim"
"""Take ``key`` for ``token`` for ``number`` seconds (see :meth:`Ledger.claim`); the result
is a :data:`ClaimState`."""
DONE: Final = "done"
"""Record ``key``'s effect as completed and drop its claim (``token`` and ``number`` unused)."""
RENEW: Final = "renew"
"""Extend ``token``'s claim on ``key`` to ``number`` seconds from now; the result: whether
``token`` still held it."""
RELEASE: Final = "release"
"""End ``token``'s claim on ``key``; the attempts are forgotten when ``number`` is 1."""

_RUNS: Final = frozenset({CLAIM, DONE})
"""The kinds made a run at a time; the others are made alone in their turn."""

Op = tuple[str, str, str, str, float]
"""``(kind, handler, key, token, number)``, ``kind`` one of the four above. Plain tuples of
one shape: they pickle at C speed (a named tuple costs a Python call each, 1.5 µs)."""


ClaimState = tuple[str, int, float]
"""A claim's answer: ``("done" | "held" | "claimed", attempts, seconds until it expires)``
(:class:`handlers.types.Claim`'s fields)."""

_DONE: Final[ClaimState] = ("done", 0, 0.0)


def write_batch(conn: sqlite3.Connection, ops: list[Op], retention_s: float) -> list[Any]:
    """Make ``ops`` in one transaction, in order; each one's result (a claim's
    :data:`ClaimState`, a renewal's bool, else None)."""
    results: list[Any] = [None] * len(ops)
    with transaction(conn):
        now = time.time()
        cutoff = now - retention_s
        run: list[tuple[int, Op]] = []
        keys: set[tuple[str, str]] = set()
        for i, op in enumerate(ops):
            kind, handler, key = op[0], op[1], op[2]
            if kind in _RUNS:
                if (handler, key) in keys or len(run) >= _RUN_MAX:
                    _make_run(conn, now, cutoff, run, results)
                    run, keys = [], set()
                run.append((i, op))
                keys.add((handler, key))
            else:
                _make_run(conn, now, cutoff, run, results)
                run, keys = [], set()
                results[i] = _single(conn, now, op)
        _make_run(conn, now, cutoff, run, results)
    return results


def _make_run(
    conn: sqlite3.Connection,
    now: float,
    cutoff: float,
    run: list[tuple[int, Op]],
    results: list[Any],
) -> None:
    """The claims and completions of one run (distinct keys: their order does not matter)."""
    claims = [(i, op) for i, op in run if op[0] == CLAIM]
    done = [(op[1], op[2]) for _, op in run if op[0] == DONE]
    if done:
        rows = json.dumps(done)
        conn.execute(_DONE_WRITE, (now, rows))
        conn.execute(_DONE_DROP_CLAIMS, (rows,))
    if not claims:
        return
    (state,) = conn.execute(
        _CLAIM_STATE, (cutoff, json.dumps([(op[1], op[2]) for _, op in claims]))
    ).fetchone()
    writes: list[tuple[str, str, str, float, int]] = []
    for index, is_done, holder, expires_at, held_attempts in json.loads(state):
        i, (_, handler, key, token, ttl_s) = claims[index]
        attempts = held_attempts or 0
        if is_done:
            results[i] = _DONE
        elif holder is not None and holder != token and expires_at > now:
            results[i] = ("held", attempts, expires_at - now)
        else:
            writes.append((handler, key, token, now + ttl_s, attempts + 1))
            results[i] = ("claimed", attempts + 1, 0.0)
    if writes:
        conn.execute(_CLAIM_WRITE, (now, json.dumps(writes)))


def check_json_functions(conn: sqlite3.Connection) -> None:
    """A clear error at start-up when this SQLite has no JSON functions (built without
    JSON1; built in since 3.38): the group commit needs ``json_each``."""
    try:
        conn.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchone()
    except sqlite3.OperationalError as err:
        raise ConfigError(
            f"the SQLite ledger needs SQLite's JSON functions, which this SQLite "
            f"{sqlite3.sqlite_version} lacks ({err}): use a Python whose sqlite3 has them "
            "(SQLite 3.38 or later has them built in) or PUBRELAY_LEDGER__URL=redis://…"
        ) from err


def is_done(conn: sqlite3.Connection, handler: str, event_id: str, cutoff: float) -> bool:
    row = conn.execute(
        "SELECT 1 FROM ledger WHERE handler = ? AND event_id = ? AND completed_at >= ?",
        (handler, event_id, cutoff),
    ).fetchone()
    return row is not None


def _single(conn: sqlite3.Connection, now: float, op: Op) -> bool | None:
    """A renewal or a release, made alone in its turn (they are rare)."""
    kind, handler, key, token, number = op
    if kind == RENEW:
        cursor = conn.execute(
            "UPDATE claims SET expires_at = ?, updated_at = ? "
            "WHERE handler = ? AND key = ? AND token = ?",
            (now + number, now, handler, key, token),
        )
        return cursor.rowcount == 1
    if kind != RELEASE:
        raise ValueError(f"unknown ledger operation {kind!r}")
    if number:
        conn.execute(
            "DELETE FROM claims WHERE handler = ? AND key = ? AND token = ?",
            (handler, key, token),
        )
    else:
        conn.execute(
            "UPDATE claims SET expires_at = 0 WHERE handler = ? AND key = ? AND token = ?",
            (handler, key, token),
        )
    return None


def purge(conn: sqlite3.Connection, cutoff: float) -> int:
    with transaction(conn):
        done = conn.execute("DELETE FROM ledger WHERE completed_at < ?", (cutoff,)).rowcount
        claims = conn.execute("DELETE FROM claims WHERE updated_at < ?", (cutoff,)).rowcount
    return done + claims
