"""The event index: what the console searches and shows, beside the ledger.

Written in batches by :class:`console.recorder.IndexRecorder` (the intake's deliveries,
the worker's outcomes), read by the console's pages and ``pubrelay events``. For each
event: its type, received time, the search fields read from the verified body (customer
id and e-mail, publication id, voucher codes, campaign, channel), the body itself (cut to
``MAX_STORED_BODY_BYTES``), every delivery (delivery id, time, topic, answer), every
handler outcome (time, attempt, outcome, detail, where it was read) and each handler's
latest outcome (the overview's counts). Nothing is kept past the retention (the ledger's).

:func:`create_index` picks the store beside the ledger: SQLite in the data directory
(``pubrelay/console/sqlite_index.py``), or Redis when the ledger is Redis
(``pubrelay/console/redis_index.py``), so that every process of a deployment writes and
reads one index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from handlers.config import LedgerSettings
from pubrelay.console.config import ConsoleSettings
from pubrelay.console.fields import EventFields

MAX_STORED_BODY_BYTES: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    delivery_id: str
    at: float
    topic: str
    status: int
    outcome: str


@dataclass(frozen=True, slots=True)
class Attempt:
    event_id: str
    handler: str
    at: float
    attempt: int
    outcome: str
    detail: str
    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class EventRow:
    """One event as the pages show it: its fields and each handler's latest outcome."""

    event_id: str
    event_type: str
    received_at: float
    fields: EventFields
    body: bytes = b""
    body_truncated: bool = False
    handlers: dict[str, str] = field(default_factory=dict)
    """handler name -> its latest outcome."""


@dataclass(slots=True)
class Timeline:
    event: EventRow
    deliveries: list[Delivery]
    attempts: list[Attempt]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event first seen (by the intake, or by the worker for an injected one)."""

    event_id: str
    event_type: str
    received_at: float
    fields: EventFields
    body: bytes
    terms: frozenset[str]


@dataclass(slots=True)
class Batch:
    """What the recorder writes in one transaction."""

    events: list[NewEvent] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.deliveries) + len(self.attempts)


@dataclass(slots=True)
class Counts:
    """The overview's figures over one window."""

    intake: dict[str, int]
    """answer outcome -> requests"""
    handlers: dict[str, dict[str, int]]
    """handler -> latest outcome -> events"""
    oldest_retrying: dict[str, float]
    """handler -> the time of the oldest event still retrying"""


class EventIndex(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, batch: Batch) -> None:
        """Store one batch; forget what is older than the retention now and then."""
        ...

    async def search(self, query: str, *, limit: int = 50) -> list[EventRow]:
        """Events whose id is ``query``, or whose delivery id, publication id, customer id
        or e-mail or voucher code is ``query`` in any case, newest first."""
        ...

    async def recent(self, *, limit: int = 50) -> list[EventRow]: ...

    async def timeline(self, event_id: str) -> Timeline | None: ...

    async def counts(self, since: float) -> Counts: ...

    async def series(self, since: float, buckets: int) -> dict[str, list[int]]:
        """Intake outcomes per bucket of equal width from ``since`` to now."""
        ...

    async def end_session(self, session_id: str, expiry: float) -> None:
        """Remember that a console session was logged out, until ``expiry`` (when it would
        have expired anyway), for every process that reads this index."""
        ...

    async def session_ended(self, session_id: str) -> bool:
        """Whether the session was logged out (in any process)."""
        ...


def index_path(url: str, data_dir: Path) -> Path:
    """The SQLite file ``PUBRELAY_CONSOLE__INDEX_URL`` names, else ``<data dir>/index.sqlite3``."""
    if url:
        return Path(url.removeprefix("sqlite:///"))
    return data_dir / "index.sqlite3"


def create_index(console: ConsoleSettings, ledger: LedgerSettings, data_dir: Path) -> EventIndex:
    """The index beside the ledger: Redis when the ledger is Redis (unless
    ``PUBRELAY_CONSOLE__INDEX_URL`` names a SQLite file), else SQLite."""
    retention_s, timeout_s = ledger.retention_s, ledger.timeout_s
    if not console.index_url and ledger.url.startswith(("redis://", "rediss://", "unix://")):
        from pubrelay.console.redis_index import RedisEventIndex  # noqa: PLC0415 - Redis only

        return RedisEventIndex(
            ledger.url,
            key_prefix=console.redis_key_prefix,
            retention_s=retention_s,
            timeout_s=timeout_s,
        )
    from pubrelay.console.sqlite_index import SqliteEventIndex  # noqa: PLC0415 - SQLite only

    path = index_path(console.index_url, data_dir)
    return SqliteEventIndex(path, retention_s=retention_s, timeout_s=timeout_s)
