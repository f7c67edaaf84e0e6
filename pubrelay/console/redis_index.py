"""The event index in Redis, when the ledger is Redis (``pubrelay/console/index.py``).

Every process of a deployment (webhook and worker hosts) writes the same index. Keys,
after ``PUBRELAY_CONSOLE__REDIS_KEY_PREFIX``, each with the retention as its TTL:

* ``ev:<event id>``: a hash of the event's fields and body, as first received (a later
  delivery of the same event id changes nothing, as in SQLite's ``INSERT OR IGNORE``);
* ``term:<value>``: a sorted set of the event ids with that searchable value (lower-cased;
  the event id itself is looked up as it is), scored by the time first received;
  ``recent``: every event id, the same way;
* ``dl:<event id>``, ``at:<event id>``: lists of its deliveries and outcomes (JSON);
* ``st:<event id>``: a hash, handler to its latest outcome; ``hs:<handler>:<outcome>``:
  a sorted set of the events whose latest outcome for that handler it is, scored by time
  (the overview's counts and oldest retrying); ``handlers``: the handler names seen;
* ``in:m:<minute>``, ``in:h:<hour>``: intake outcomes counted per minute and per hour.
* ``ended:<session id>``: a console session logged out, until it would have expired.

A batch is one pipeline (no transaction: a view, not a record). Sorted sets drop what is
older than the retention as they are written; the other keys expire.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Final

from pubrelay.console.fields import EventFields
from pubrelay.console.index import (
    MAX_STORED_BODY_BYTES,
    Attempt,
    Batch,
    Counts,
    Delivery,
    EventRow,
    Timeline,
)

if TYPE_CHECKING:
    import redis.asyncio

OUTCOMES: Final = ("done", "skipped", "duplicate", "retrying", "dead_lettered")
_FIELDS: Final = (
    "customer_id",
    "customer_email",
    "publication_id",
    "voucher_code",
    "campaign",
    "channel",
)


# The event's hash is written, and its TTL set, only by the first delivery of its id, in one
# step: KEYS[1] the hash, ARGV[1] received_at, ARGV[2] the TTL, then field, value, ...
_FIRST_WRITE: Final = """
if redis.call('HSETNX', KEYS[1], 'received_at', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisEventIndex:
    def __init__(
        self, url: str, *, key_prefix: str, retention_s: float, timeout_s: float = 5.0
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.retention_s = retention_s
        self.timeout_s = timeout_s
        self._ttl = max(1, math.ceil(retention_s))
        self._client: redis.asyncio.Redis | None = None

    async def open(self) -> None:
        if self._client is None:
            import redis.asyncio as aioredis  # noqa: PLC0415 - only with a Redis ledger

            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _redis(self) -> redis.asyncio.Redis:
        assert self._client is not None, "index not open"
        return self._client

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def write(self, batch: Batch) -> None:
        pipe = self._redis().pipeline(transaction=False)
        cutoff = time.time() - self.retention_s
        for e in batch.events:
            body = e.body[:MAX_STORED_BODY_BYTES]
            values: list[Any] = [e.received_at, self._ttl]
            for name in _FIELDS:
                values += (name, getattr(e.fields, name))
            values += ("event_type", e.event_type, "body", body)
            values += ("body_truncated", int(len(body) < len(e.body)))
            pipe.eval(_FIRST_WRITE, 1, self._k("ev", e.event_id), *values)
            for term in e.terms:
                self._scored(
                    pipe, self._k("term", term), e.event_id, e.received_at, cutoff, nx=True
                )
            self._scored(pipe, self._k("recent"), e.event_id, e.received_at, cutoff, nx=True)
        for d in batch.deliveries:
            self._delivery(pipe, d, cutoff)
        for a in batch.attempts:
            self._attempt(pipe, a, cutoff)
        await pipe.execute()

    def _scored(
        self, pipe: Any, key: str, member: str, score: float, cutoff: float, *, nx: bool = False
    ) -> None:
        pipe.zadd(key, {member: score}, nx=nx)
        pipe.zremrangebyscore(key, "-inf", cutoff)
        pipe.expire(key, self._ttl)

    def _delivery(self, pipe: Any, d: Delivery, cutoff: float) -> None:
        minute, hour = int(d.at // 60), int(d.at // 3600)
        for key, ttl in (
            (self._k("in", "m", str(minute)), 3720),
            (self._k("in", "h", str(hour)), 90000),
        ):
            pipe.hincrby(key, d.outcome, 1)
            pipe.expire(key, ttl)
        if not d.event_id:
            return
        key = self._k("dl", d.event_id)
        pipe.rpush(key, json.dumps([d.delivery_id, d.at, d.topic, d.status, d.outcome]))
        pipe.expire(key, self._ttl)
        if d.delivery_id and d.status < 300:
            self._scored(pipe, self._k("term", d.delivery_id.lower()), d.event_id, d.at, cutoff)

    def _attempt(self, pipe: Any, a: Attempt, cutoff: float) -> None:
        row = [a.handler, a.at, a.attempt, a.outcome, a.detail, a.topic, a.partition, a.offset]
        key = self._k("at", a.event_id)
        pipe.rpush(key, json.dumps(row))
        pipe.expire(key, self._ttl)
        state = self._k("st", a.event_id)
        pipe.hset(state, a.handler, a.outcome)
        pipe.expire(state, self._ttl)
        pipe.sadd(self._k("handlers"), a.handler)
        for outcome in OUTCOMES:
            if outcome != a.outcome:
                pipe.zrem(self._k("hs", a.handler, outcome), a.event_id)
        self._scored(pipe, self._k("hs", a.handler, a.outcome), a.event_id, a.at, cutoff)

    async def _rows(self, event_ids: list[str], *, body: bool = False) -> list[EventRow]:
        pipe = self._redis().pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hgetall(self._k("ev", event_id))
            pipe.hgetall(self._k("st", event_id))
        found = await pipe.execute()
        rows = []
        for event_id, raw, states in zip(event_ids, found[::2], found[1::2], strict=True):
            if not raw:
                continue  # expired
            h = {_text(k): v for k, v in raw.items()}
            fields = EventFields(*(_text(h.get(name, b"")) for name in _FIELDS))
            row = EventRow(event_id, _text(h.get("event_type", b"")),
                           float(h.get("received_at", 0)), fields)  # fmt: skip
            row.handlers = {_text(k): _text(v) for k, v in sorted(states.items())}
            if body:
                row.body = bytes(h.get("body", b""))
                row.body_truncated = h.get("body_truncated") == b"1"
            rows.append(row)
        return rows

    async def _newest(self, key: str, limit: int) -> list[EventRow]:
        ids = await self._redis().zrevrange(key, 0, limit - 1)
        return await self._rows([_text(i) for i in ids])

    async def search(self, query: str, *, limit: int = 50) -> list[EventRow]:
        query = query.strip()
        ids = [
            _text(i)
            for i in await self._redis().zrevrange(self._k("term", query.lower()), 0, limit - 1)
        ]
        found = await self._rows([query, *(i for i in ids if i != query)] if query else ids)
        found.sort(key=lambda row: row.received_at, reverse=True)
        return found[:limit]

    async def recent(self, *, limit: int = 50) -> list[EventRow]:
        return await self._newest(self._k("recent"), limit)

    async def timeline(self, event_id: str) -> Timeline | None:
        rows = await self._rows([event_id], body=True)
        if not rows:
            return None
        r = self._redis()
        deliveries = [
            Delivery(event_id, *json.loads(x))
            for x in await r.lrange(self._k("dl", event_id), 0, -1)
        ]
        attempts = [
            Attempt(event_id, *json.loads(x))
            for x in await r.lrange(self._k("at", event_id), 0, -1)
        ]
        attempts.sort(key=lambda a: a.at)
        return Timeline(rows[0], sorted(deliveries, key=lambda d: d.at), attempts)

    async def end_session(self, session_id: str, expiry: float) -> None:
        ttl_s = max(1, math.ceil(expiry - time.time()))  # EX: any Redis (EXAT needs 6.2)
        await self._redis().set(self._k("ended", session_id), b"1", ex=ttl_s)

    async def session_ended(self, session_id: str) -> bool:
        return bool(await self._redis().exists(self._k("ended", session_id)))

    async def counts(self, since: float) -> Counts:
        r = self._redis()
        intake: dict[str, int] = {}
        for bucket in await self._intake_buckets(since, time.time()):
            for answer, count in bucket.items():
                intake[_text(answer)] = intake.get(_text(answer), 0) + int(count)
        handlers: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        for handler in sorted(_text(h) for h in await r.smembers(self._k("handlers"))):
            for outcome in OUTCOMES:
                key = self._k("hs", handler, outcome)
                n = await r.zcount(key, since, "+inf")
                if n:
                    handlers.setdefault(handler, {})[outcome] = int(n)
            first = await r.zrange(self._k("hs", handler, "retrying"), 0, 0, withscores=True)
            if first:
                oldest[handler] = float(first[0][1])
        return Counts(intake, handlers, oldest)

    async def _intake_buckets(self, since: float, now: float) -> list[dict[bytes, bytes]]:
        """The per-minute counts when the window is an hour or less, else the per-hour."""
        kind, width = ("m", 60) if now - since <= 3600 else ("h", 3600)
        pipe = self._redis().pipeline(transaction=False)
        for bucket in range(int(since // width), int(now // width) + 1):
            pipe.hgetall(self._k("in", kind, str(bucket)))
        result: list[dict[bytes, bytes]] = await pipe.execute()
        return result

    async def series(self, since: float, buckets: int) -> dict[str, list[int]]:
        now = time.time()
        width = max(1.0, (now - since) / buckets)
        out: dict[str, list[int]] = {}
        first_hour = int(since // 3600)
        for offset, counts in enumerate(await self._intake_buckets(since, now)):
            at = max(since, (first_hour + offset) * 3600)
            slot = min(buckets - 1, int((at - since) // width))
            for outcome, n in counts.items():
                out.setdefault(_text(outcome), [0] * buckets)[slot] += int(n)
        return out
