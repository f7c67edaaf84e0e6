"""The embedded bus's file format: its two tables and how a record's headers are stored.

``log`` holds the records of every topic; a record's offset is its row id (one partition,
0, per topic). ``group_offsets`` holds each consumer group's next offset per topic and
when the group was last seen (it committed, or its worker reported its lag): retention
passes over a group silent for longer than itself.
Headers are stored as one msgpack list of ``(name, value)`` pairs. The file's format
version is SQLite's ``user_version``: :func:`migrate` brings an older file up to
:data:`FORMAT_VERSION` and refuses a newer one.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Final

import msgspec

from bus.sqlite.connection import transaction
from schemas.record import Headers

FORMAT_VERSION: Final = 1
"""0: before ``group_offsets.seen_ms``; 1: with it."""

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL,
    headers BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_topic_id ON log (topic, id);
CREATE TABLE IF NOT EXISTS group_offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, topic)
);
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the bus's file (its :data:`SCHEMA` run) to :data:`FORMAT_VERSION`; refuse a
    file a newer pubrelay wrote, whose format this one cannot know."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > FORMAT_VERSION:
        raise sqlite3.DatabaseError(
            f"the file is in format {version}, written by a newer pubrelay; this one "
            f"reads up to format {FORMAT_VERSION}: run the newer version (a rollback "
            "needs the file from before the upgrade)"
        )
    if version == FORMAT_VERSION:
        return
    with transaction(conn):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(group_offsets)")}
        if "seen_ms" not in columns:
            conn.execute("ALTER TABLE group_offsets ADD COLUMN seen_ms INTEGER NOT NULL DEFAULT 0")
            # Every group counts as seen now: none is passed over before its worker could
            # have been seen by this version.
            conn.execute("UPDATE group_offsets SET seen_ms = ?", (int(time.time() * 1000),))
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")


_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(tuple[tuple[str, bytes], ...])


def encode_headers(headers: Headers) -> bytes:
    return _headers_encoder.encode(headers)


def decode_headers(data: bytes) -> Headers:
    return _headers_decoder.decode(data)
