"""The embedded bus's file format: its two tables and how a record's headers are stored.

``log`` holds the records of every topic; a record's offset is its row id (one partition,
0, per topic). ``group_offsets`` holds each consumer group's next offset per topic.
Headers are stored as one msgpack list of ``(name, value)`` pairs.
"""

from __future__ import annotations

from typing import Final

import msgspec

from schemas.record import Headers

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
    PRIMARY KEY (grp, topic)
);
"""

_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(tuple[tuple[str, bytes], ...])


def encode_headers(headers: Headers) -> bytes:
    return _headers_encoder.encode(headers)


def decode_headers(data: bytes) -> Headers:
    return _headers_decoder.decode(data)
