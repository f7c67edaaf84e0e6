"""Retention of the embedded bus: which records may go, deleted a small chunk at a time.

A record older than the retention is deleted once every consumer group that reads its
topic has committed past it, so nothing unhandled is lost; records of topics no group
reads are deleted by age alone, except quarantine and dead letters (kept for a human). A
group not seen for longer than the retention itself (no commit, and no lag reported by
its worker, which does so every ``PUBRELAY_WORKER__LAG_INTERVAL_S``: a handler disabled
or renamed, a worker stopped that long) no longer holds records back, as on Kafka, where
retention is by age alone: without that, one disabled handler kept every record from its
last commit on, until the disk was full. Each pass counts the records it deleted before
such a group had read them (:attr:`RetentionPass.passed_over`). Quarantine and dead
letters keep waiting for their groups (a person's release or replay) however long ago
those committed, and for ever without one, unless ``kept_cutoff_ms`` is given
(``PUBRELAY_BUS__KEPT_TOPICS_RETENTION_S``): then whatever is older than it goes, as
Kafka's ``retention.ms`` of those topics would have it.

A pass walks the topics one after another. Each step is one short transaction that looks
at no more than ``chunk_rows`` of a topic's oldest records, in offset order, and deletes
the leading ones that may go: every statement is an index search (``log_topic_id`` or a
primary key), never a scan of the log, so a step costs the same on a log of a thousand
records or of millions, and the write lock is held for one step only. The writer of
:class:`bus.sqlite.log.SqliteBus` runs the steps between its publish batches. Deleting in
offset order stops at a topic's first record still inside the retention: a record
written while the clock stood behind an earlier one's time waits for that one.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Final

from bus.sqlite.connection import transaction
from schemas.topics import DLQ_TOPIC_PREFIX, QUARANTINE_TOPIC

DEFAULT_CHUNK_ROWS: Final = 500
MAX_PASS_INTERVAL_S: Final = 60.0

# Distinct topics by hopping along the (topic, id) index: one search per topic.
_TOPICS_SQL: Final = """
WITH RECURSIVE t(topic) AS (
    SELECT (SELECT MIN(topic) FROM log)
    UNION ALL
    SELECT (SELECT MIN(topic) FROM log WHERE topic > t.topic) FROM t WHERE t.topic IS NOT NULL
)
SELECT topic FROM t WHERE topic IS NOT NULL
"""
# group_offsets is small (groups x topics); its primary key starts with the group.
_GROUPS_SQL: Final = (
    "SELECT COUNT(*), MIN(next_offset), "
    "MIN(CASE WHEN seen_ms >= ? THEN next_offset END) "
    "FROM group_offsets WHERE topic = ?"
)
_SILENT_GROUPS_SQL: Final = (
    "SELECT grp, next_offset FROM group_offsets "
    "WHERE topic = ? AND seen_ms < ? AND next_offset <= ?"
)
_OLDEST_SQL: Final = (
    "SELECT id, ts_ms FROM log INDEXED BY log_topic_id "
    "WHERE topic = ? AND id < ? ORDER BY id LIMIT ?"
)
_DELETE_SQL: Final = (
    "DELETE FROM log INDEXED BY log_topic_id WHERE topic = ? AND id >= ? AND id <= ?"
)
STATEMENTS: Final = (_TOPICS_SQL, _GROUPS_SQL, _SILENT_GROUPS_SQL, _OLDEST_SQL, _DELETE_SQL)
"""Every statement a pass runs (for checking their query plans)."""

_NO_BOUND: Final = 2**63 - 1


def kept_for_a_human(topic: str) -> bool:
    """Quarantine and dead-letter topics are never deleted by age alone."""
    return topic.endswith(QUARANTINE_TOPIC) or DLQ_TOPIC_PREFIX in topic


@dataclass(slots=True)
class RetentionPass:
    """One walk over every topic, deleting what may go, one step per :meth:`step` call."""

    cutoff_ms: int
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    kept_cutoff_ms: int | None = None
    topics: list[str] | None = None
    deleted: int = 0
    steps: int = 0
    longest_step_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    passed_over: dict[tuple[str, str], int] = field(default_factory=dict)
    """(group, topic): records deleted before that silent group had read them."""

    @property
    def done(self) -> bool:
        return self.topics is not None and not self.topics

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def step(self, conn: sqlite3.Connection) -> None:
        """The first call lists the topics (a read); each later one is one short transaction
        on the next chunk of the current topic (on the writer's connection and thread)."""
        started = time.monotonic()
        if self.topics is None:
            self.topics = [row[0] for row in conn.execute(_TOPICS_SQL)]
        elif self.topics:
            topic = self.topics[0]
            with transaction(conn):
                if kept_for_a_human(topic) and self.kept_cutoff_ms is not None:
                    removed = _delete_by_age(conn, topic, self.kept_cutoff_ms, self.chunk_rows)
                else:
                    removed = _delete_chunk(
                        conn, topic, self.cutoff_ms, self.chunk_rows, self.passed_over
                    )
            self.deleted += removed
            if removed < self.chunk_rows:  # cut short: nothing more may go in this topic
                self.topics.pop(0)
        self.steps += 1
        self.longest_step_s = max(self.longest_step_s, time.monotonic() - started)


def _delete_by_age(conn: sqlite3.Connection, topic: str, cutoff_ms: int, limit: int) -> int:
    """Delete up to ``limit`` of ``topic``'s oldest records older than ``cutoff_ms``."""
    return len(_delete_expired(conn, topic, _NO_BOUND, cutoff_ms, limit))


def _delete_chunk(
    conn: sqlite3.Connection,
    topic: str,
    cutoff_ms: int,
    limit: int,
    passed_over: dict[tuple[str, str], int],
) -> int:
    """Delete up to ``limit`` of ``topic``'s oldest records that may go; return how many,
    adding those a silent group had not read to ``passed_over``."""
    groups, lowest, lowest_seen = conn.execute(_GROUPS_SQL, (cutoff_ms, topic)).fetchone()
    if kept_for_a_human(topic):
        if not groups:
            return 0
        bound = int(lowest)  # a person's release or replay marks what is done, however old
    elif lowest_seen is not None:
        bound = int(lowest_seen)  # every group still seen is past this offset
    else:
        bound = _NO_BOUND  # no group, or none seen within the retention: by age
    deleted = _delete_expired(conn, topic, bound, cutoff_ms, limit)
    if deleted and groups and int(lowest) <= deleted[-1][0]:
        silent = conn.execute(_SILENT_GROUPS_SQL, (topic, cutoff_ms, deleted[-1][0]))
        for group, next_offset in silent:
            unread = sum(1 for offset, _ in deleted if offset >= next_offset)
            key = (group, topic)
            passed_over[key] = passed_over.get(key, 0) + unread
    return len(deleted)


def _delete_expired(
    conn: sqlite3.Connection, topic: str, bound: int, cutoff_ms: int, limit: int
) -> list[tuple[int, int]]:
    """Delete ``topic``'s oldest records below offset ``bound`` that are older than
    ``cutoff_ms``, up to ``limit``, in offset order (stopping at the first one still
    inside); the deleted ones' ``(id, ts_ms)``."""
    rows = conn.execute(_OLDEST_SQL, (topic, bound, limit)).fetchall()
    expired = 0
    for _, ts_ms in rows:
        if ts_ms >= cutoff_ms:
            break
        expired += 1
    if expired:
        conn.execute(_DELETE_SQL, (topic, rows[0][0], rows[expired - 1][0]))
    return rows[:expired]
