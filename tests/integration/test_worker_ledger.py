"""The idempotency ledger on SQLite and on a real redis-server, alone and under the worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from bus.types import Bus
from handlers.config import LedgerSettings
from handlers.worker.lease import ClaimLost, Lease
from handlers.worker.ledger import Ledger, RedisLedger, SqliteLedger, create_ledger
from tests.fixtures.redis import free_port, start_redis, stop_redis
from tests.fixtures.samples import sample_publication_event
from tests.fixtures.worker import (
    ScriptedHandler,
    eventually,
    ledger_key,
    make_worker,
    metric,
    outcome,
    publish_event,
    running,
)

LedgerFactory = Callable[..., Awaitable[Ledger]]


@pytest.fixture(params=["sqlite", "redis"])
async def ledger_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LedgerFactory]:
    """Opened ledgers of one kind sharing one store (each call: a new client)."""
    opened: list[Ledger] = []
    key_prefix = f"test:{uuid.uuid4().hex}:"

    async def make(retention_s: float = 3600.0) -> Ledger:
        store: Ledger
        if request.param == "redis":
            url = request.getfixturevalue("redis_server")
            store = RedisLedger(url, retention_s=retention_s, key_prefix=key_prefix)
        else:
            store = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=retention_s)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def test_a_completed_effect_is_remembered_per_handler(ledger_factory: LedgerFactory) -> None:
    ledger = await ledger_factory()
    assert not await ledger.is_done("email", "evcus_1")
    await ledger.mark_done("email", "evcus_1")
    assert await ledger.is_done("email", "evcus_1")
    assert not await ledger.is_done("crm", "evcus_1")
    assert not await ledger.is_done("email", "evcus_2")
    await ledger.mark_done("email", "evcus_1")  # marking twice is harmless
    assert await ledger.is_done("email", "evcus_1")


async def test_completions_survive_a_new_client(ledger_factory: LedgerFactory) -> None:
    first = await ledger_factory()
    await asyncio.gather(*(first.mark_done("email", f"ev_{n}") for n in range(200)))
    await first.close()
    second = await ledger_factory()
    done = await asyncio.gather(*(second.is_done("email", f"ev_{n}") for n in range(200)))
    assert all(done)
    assert not await second.is_done("email", "ev_200")


async def test_entries_older_than_the_retention_are_forgotten(
    ledger_factory: LedgerFactory,
) -> None:
    ledger = await ledger_factory(retention_s=0.3)
    await ledger.mark_done("email", "ev_old")
    assert await ledger.is_done("email", "ev_old")
    await asyncio.sleep(0.5)
    assert not await ledger.is_done("email", "ev_old")


async def test_sqlite_ledger_deletes_expired_rows_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path, retention_s=0.2)
    await ledger.open()
    try:
        await ledger.mark_done("email", "ev_1")
        await asyncio.sleep(0.3)
        await ledger.mark_done("email", "ev_2")  # writes purge what expired (bounded rate)
        await ledger.purge()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT handler, event_id FROM ledger").fetchall()
        assert rows == [("email", "ev_2")]
    finally:
        await ledger.close()


async def test_a_completion_arriving_while_the_ledger_purges_is_written(tmp_path: Path) -> None:
    """A ``mark_done`` that joins the group commit while its flusher runs the purge."""
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path, retention_s=0.5)  # purges at most every 0.5 s
    await ledger.open()
    try:
        await asyncio.gather(*(ledger.mark_done("email", f"ev_old_{n}") for n in range(5000)))
        await asyncio.sleep(0.6)  # those expired; the next flush purges them (a while)
        await ledger.mark_done("email", "ev_a")  # returns while its flusher purges
        await asyncio.wait_for(ledger.mark_done("email", "ev_b"), 5)
        assert await ledger.is_done("email", "ev_a")  # the one that met the purge
        assert await ledger.is_done("email", "ev_b")
    finally:
        await ledger.close()


async def test_closing_the_ledger_writes_the_completions_still_pending(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    ledger = SqliteLedger(path, retention_s=3600)
    await ledger.open()
    pending = [asyncio.create_task(ledger.mark_done("email", f"ev_{n}")) for n in range(20)]
    await asyncio.sleep(0)  # every completion queued, the first commit under way
    await ledger.close()
    await asyncio.wait_for(asyncio.gather(*pending), 5)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT count(*) FROM ledger").fetchone()
    assert rows == (20,)


def test_the_ledger_url_picks_the_implementation(tmp_path: Path, redis_server: str) -> None:
    default = create_ledger(LedgerSettings(), tmp_path)
    assert isinstance(default, SqliteLedger)
    assert default.path == tmp_path / "ledger.sqlite3"
    explicit = create_ledger(LedgerSettings(url=f"sqlite:///{tmp_path}/x.db"), tmp_path)
    assert isinstance(explicit, SqliteLedger)
    assert explicit.path == tmp_path / "x.db"
    redis_ledger = create_ledger(LedgerSettings(url=redis_server, retention_s=60), tmp_path)
    assert isinstance(redis_ledger, RedisLedger)
    assert redis_ledger.retention_s == 60


async def test_the_worker_deduplicates_through_the_redis_ledger(
    bus: Bus, redis_server: str, topic_prefix: str
) -> None:
    ledger = RedisLedger(redis_server, retention_s=3600, key_prefix=f"t:{uuid.uuid4().hex}:")
    await ledger.open()
    handler = ScriptedHandler()
    registry = CollectorRegistry()
    worker = make_worker(handler, bus, ledger, registry, topic_prefix)
    try:
        async with running(worker):
            for n in range(10):
                await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id=f"c{n}")
                await publish_event(bus, topic_prefix, event_id=f"ev_{n}", customer_id=f"c{n}")
            await eventually(
                lambda: outcome(registry, "recorder", "duplicate") == 10, what="10 duplicates"
            )
        assert sorted(handler.effects) == sorted(f"ev_{n}" for n in range(10))
        assert await ledger.is_done("recorder", ledger_key("ev_3"))
    finally:
        await ledger.close()


async def test_while_the_ledger_is_down_no_handler_runs_and_the_worker_waits_for_it(
    bus: Bus, topic_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    ledger = RedisLedger(f"redis://127.0.0.1:{port}/0", retention_s=3600, timeout_s=0.5)
    await ledger.open()
    handler = ScriptedHandler()
    registry = CollectorRegistry()
    worker = make_worker(handler, bus, ledger, registry, topic_prefix)
    server = None
    try:
        async with running(worker):
            await publish_event(bus, topic_prefix, event_id="ev_1", customer_id="c1")

            def ledger_errors() -> float:
                return metric(
                    registry,
                    "pubrelay_handler_bus_errors_total",
                    handler="recorder",
                    operation="ledger",
                )

            await eventually(lambda: ledger_errors() >= 2, what="ledger errors")
            assert handler.calls == {}
            server = await asyncio.to_thread(start_redis, tmp_path, port)
            await eventually(lambda: handler.effects == ["ev_1"], what="the effect")
            await eventually(
                lambda: metric(registry, "pubrelay_consumer_lag", handler="recorder") == 0,
                what="the commit",
            )
        assert await ledger.is_done("recorder", ledger_key("ev_1"))
    finally:
        await ledger.close()
        if server is not None:
            stop_redis(server)


# -- claims: atomic across clients, expiring, counting attempts ------------------------------


async def test_of_many_clients_claiming_one_event_at_once_exactly_one_gets_it(
    ledger_factory: LedgerFactory,
) -> None:
    clients = [await ledger_factory() for _ in range(4)]
    claims = await asyncio.gather(
        *(
            client.claim("email", f"ev_{n}", f"worker-{w}", ttl_s=30)
            for n in range(50)
            for w, client in enumerate(clients)
        )
    )
    for n in range(50):
        states = sorted(claim.state for claim in claims[n * 4 : n * 4 + 4])
        assert states == ["claimed", "held", "held", "held"], f"ev_{n}: {states}"
    assert all(0 < c.wait_s <= 30 for c in claims if c.state == "held")


async def test_a_claim_expires_counts_attempts_and_ends_in_done(
    ledger_factory: LedgerFactory,
) -> None:
    first, second = await ledger_factory(), await ledger_factory()
    assert (await first.claim("crm", "ev_1", "a", ttl_s=0.3)).attempts == 1
    assert (await first.claim("crm", "ev_1", "a", ttl_s=0.3)).attempts == 2  # its own again
    held = await second.claim("crm", "ev_1", "b", ttl_s=0.3)
    assert (held.state, held.attempts) == ("held", 2)
    assert not await second.renew("crm", "ev_1", "b", ttl_s=0.3)
    assert await first.renew("crm", "ev_1", "a", ttl_s=0.3)
    await asyncio.sleep(0.4)  # the holder died: no renewal, no release
    taken = await second.claim("crm", "ev_1", "b", ttl_s=30)
    assert (taken.state, taken.attempts) == ("claimed", 3)
    assert not await first.renew("crm", "ev_1", "a")  # a late renewal learns it lost the claim
    await second.release("crm", "ev_1", "b")  # a failed attempt: free at once, still counted
    assert (await first.claim("crm", "ev_1", "a", ttl_s=30)).attempts == 4
    await first.mark_done("crm", "ev_1")
    assert (await second.claim("crm", "ev_1", "b")).state == "done"
    assert await second.is_done("crm", "ev_1")


async def test_writes_sharing_one_group_commit_answer_as_if_made_one_by_one(
    tmp_path: Path,
) -> None:
    """Claims, a release and completions queued together (one transaction, a few
    statements) keep their order where they touch the same key."""
    ledger = SqliteLedger(tmp_path / "l.sqlite3", retention_s=3600)
    await ledger.open()
    try:
        await ledger.claim("crm", "ev_old", "x", ttl_s=30)
        answers = await asyncio.gather(
            ledger.claim("crm", "ev_1", "a", ttl_s=30),
            ledger.claim("crm", "ev_1", "b", ttl_s=30),
            ledger.release("crm", "ev_1", "a"),
            ledger.claim("crm", "ev_1", "b", ttl_s=30),
            ledger.mark_done("crm", "ev_old"),
            ledger.claim("crm", "ev_old", "c", ttl_s=30),
            ledger.claim("email", "ev_1", "d", ttl_s=30),
            *(ledger.claim("crm", f"ev_many_{n}", "e", ttl_s=30) for n in range(1200)),
        )
    finally:
        await ledger.close()
    claims = [(c.state, c.attempts) if c is not None else None for c in answers[:7]]
    assert claims == [
        ("claimed", 1),
        ("held", 1),
        None,
        ("claimed", 2),
        None,
        ("done", 0),
        ("claimed", 1),
    ]
    assert {(c.state, c.attempts) if c is not None else None for c in answers[7:]} == {
        ("claimed", 1)
    }


async def test_a_call_whose_claim_another_worker_took_is_stopped(tmp_path: Path) -> None:
    """The first renewal learns the claim is gone: the call is cancelled (ClaimLost)."""
    path = tmp_path / "l.sqlite3"
    mine, theirs = SqliteLedger(path, retention_s=3600), SqliteLedger(path, retention_s=3600)
    await mine.open()
    await theirs.open()
    finished = asyncio.Event()

    async def long_call() -> None:
        await asyncio.sleep(30)
        finished.set()

    try:
        assert (await mine.claim("crm", "ev_1", "a", ttl_s=0.3)).state == "claimed"
        claimed_at = asyncio.get_running_loop().time()
        await mine.release("crm", "ev_1", "a")  # as if it had expired
        assert (await theirs.claim("crm", "ev_1", "b", ttl_s=30)).state == "claimed"
        lease = Lease(mine, "crm", ttl_s=0.3, log=structlog.get_logger())
        with pytest.raises(ClaimLost):
            await asyncio.wait_for(lease.run("ev_1", "a", claimed_at, long_call, timeout_s=60), 10)
        assert not finished.is_set()
    finally:
        await mine.close()
        await theirs.close()


async def test_a_call_over_its_bound_is_stopped_and_a_handlers_own_timeout_kept(
    tmp_path: Path,
) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3", retention_s=3600)
    await ledger.open()
    lease = Lease(ledger, "crm", ttl_s=30, log=structlog.get_logger())
    loop = asyncio.get_running_loop()

    async def own_timeout() -> None:
        raise TimeoutError("the CRM did not answer")

    try:
        await ledger.claim("crm", "ev_1", "a", ttl_s=30)
        with pytest.raises(TimeoutError, match=r"took more than 0\.1 s"):
            await asyncio.wait_for(
                lease.run("ev_1", "a", loop.time(), lambda: asyncio.sleep(30), timeout_s=0.1),
                10,
            )
        with pytest.raises(TimeoutError, match="the CRM did not answer"):
            await lease.run("ev_1", "a", loop.time(), own_timeout, timeout_s=10)
    finally:
        await ledger.close()


async def test_a_call_longer_than_its_claim_keeps_it_by_renewing(tmp_path: Path) -> None:
    """The lease's ticker starts renewing a call past a third of the claim's lifetime: well
    after the first lifetime, another worker still finds the event held, and the call ends
    on its own (no ClaimLost)."""
    path = tmp_path / "l.sqlite3"
    mine, theirs = SqliteLedger(path, retention_s=3600), SqliteLedger(path, retention_s=3600)
    await mine.open()
    await theirs.open()
    seen: list[str] = []

    async def long_call() -> None:
        await asyncio.sleep(2.0)  # past the claim's 1.5 s lifetime
        seen.append((await theirs.claim("crm", "ev_1", "b", ttl_s=30)).state)
        await asyncio.sleep(0.3)

    try:
        assert (await mine.claim("crm", "ev_1", "a", ttl_s=1.5)).state == "claimed"
        lease = Lease(mine, "crm", ttl_s=1.5, log=structlog.get_logger())
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(lease.run("ev_1", "a", loop.time(), long_call, timeout_s=60), 20)
        assert seen == ["held"]
    finally:
        await mine.close()
        await theirs.close()


async def test_a_release_after_a_dead_letter_forgets_the_attempts(
    ledger_factory: LedgerFactory,
) -> None:
    ledger = await ledger_factory()
    for _ in range(3):
        await ledger.claim("http", "ev_9", "a", ttl_s=30)
    await ledger.release("http", "ev_9", "someone-else", forget_attempts=True)  # not theirs
    assert (await ledger.claim("http", "ev_9", "a", ttl_s=30)).attempts == 4
    await ledger.release("http", "ev_9", "a", forget_attempts=True)
    assert (await ledger.claim("http", "ev_9", "b", ttl_s=30)).attempts == 1


async def test_the_webhook_event_and_the_reconciled_event_of_one_publication_act_once(
    bus: Bus, ledger: Ledger, registry: CollectorRegistry, topic_prefix: str
) -> None:
    """Reconciliation injects ``evrec_<publication id>`` for a publication whose webhook it
    had not seen yet (say, still in the bus backlog): another event id, the same
    publication. Each handler acts once between the two, in either order."""
    handler = ScriptedHandler()

    def body(event_id: str, publication_id: str) -> bytes:
        envelope = sample_publication_event(
            event_id=event_id,
            delivery_id=f"whs_{event_id}",
            customer_id="cust_A",
            email="a@example.com",
            code="SPRING-1",
        )
        envelope["data"]["publication"]["id"] = publication_id
        return json.dumps(envelope).encode()

    worker = make_worker(handler, bus, ledger, registry, topic_prefix)
    async with running(worker):
        for event_id, publication_id in [
            ("evcus_1", "pub_1"),
            ("evrec_pub_1", "pub_1"),  # reconciliation's twin, after the webhook's event
            ("evrec_pub_2", "pub_2"),  # reconciliation first ...
            ("evcus_2", "pub_2"),  # ... the webhook's event late (Voucherify's retry)
        ]:
            await publish_event(
                bus,
                topic_prefix,
                event_id=event_id,
                customer_id="cust_A",
                body=body(event_id, publication_id),
            )
        await eventually(
            lambda: outcome(registry, "recorder", "duplicate") == 2, what="both twins skipped"
        )
    assert handler.effects == ["evcus_1", "evrec_pub_2"]
