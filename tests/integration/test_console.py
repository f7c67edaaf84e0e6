"""The operator console on the webhook app: the token guards every page, forms need their
CSRF token, every value is escaped, the search finds an event by any of its ids, the
timeline shows each handler's outcome, and a dead letter replayed from the console is done.

Real pieces: the embedded bus, the ledger, the worker with a scripted handler, the
webhook app with the console mounted, the event index and its recorder.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from bus.pending import SMALL_BATCH_RECORDS
from bus.sqlite import SqliteBus
from consumer.app import create_app
from consumer.quarantine import tail_quarantined
from handlers.builtin.email.outbox import OutboxTransport
from handlers.types import Event
from handlers.worker.ledger import SqliteLedger
from handlers.worker.service import Worker
from pubrelay.console import operations
from pubrelay.console.app import CONSOLE, CSP, MAX_LOGIN_READS, create_console_app
from pubrelay.console.auth import COOKIE
from pubrelay.console.mail import FRAME_CSP, MAX_SHOWN_CHARS
from pubrelay.console.recorder import MAX_ID_CHARS, IndexRecorder
from pubrelay.console.sqlite_index import SqliteEventIndex
from pubrelay.settings import Settings
from schemas.errors import HandlerError
from schemas.topics import dlq_topic, retry_topic
from tests.fixtures.app import event_body, signed_headers
from tests.fixtures.worker import ScriptedHandler, eventually, fast_worker_settings

TOKEN = "console-test-token-0123456789"
HTML = {"Accept": "text/html"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@dataclass
class Stack:
    client: TestClient[Any, Any]
    handler: ScriptedHandler
    recorder: IndexRecorder
    failing: set[str]
    outbox: Path
    console: web.Application
    bus: SqliteBus


@pytest.fixture
async def stack(
    tmp_path: Path, settings: Settings, aiohttp_client: ClientFactory
) -> AsyncIterator[Stack]:
    failing: set[str] = set()

    async def script(event: Event) -> None:
        if event.id in failing:
            if event.id.startswith("evt_mailbox"):  # a relay's refusal quoting an address
                raise HandlerError("550 5.1.1 <owner.private@example.org>: mailbox unavailable")
            raise HandlerError("the downstream refused it <b>bold</b>")

    handler = ScriptedHandler(name="recorder", script=script)
    bus = SqliteBus(tmp_path / "bus.sqlite3", poll_interval_s=0.05)
    await bus.start()
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=3600)
    await ledger.open()
    index = SqliteEventIndex(tmp_path / "index.sqlite3", retention_s=3600)
    await index.open()
    recorder = IndexRecorder(index, queue_max=1000)
    prefix = settings.bus.topic_prefix
    worker = Worker(
        [handler],
        bus=bus,
        ledger=ledger,
        settings=fast_worker_settings(max_attempts=1),
        topic_prefix=prefix,
        metrics_registry=CollectorRegistry(),
        observer=recorder,
    )
    console = create_console_app(
        token=TOKEN,
        session_ttl_s=600,
        bus=bus,
        index=index,
        recorder=recorder,
        handlers=["recorder"],
        topic_prefix=prefix,
        group_prefix=fast_worker_settings().group_prefix,
        failure_delay_s=0.05,
        outbox=tmp_path / "outbox",
        form_read_timeout_s=1.0,
    )
    app = create_app(
        bus=bus,
        http=settings.http,
        webhook=settings.webhook,
        secrets=["test-webhook-secret"],
        topic_prefix=prefix,
        publish_timeout_s=1.0,
        registry=CollectorRegistry(),
        observer=recorder,
        console=console,
    )
    stop = asyncio.Event()
    async with recorder.running():
        task = asyncio.create_task(worker.run_until_stopped(stop))
        try:
            client = await aiohttp_client(app)
            yield Stack(client, handler, recorder, failing, tmp_path / "outbox", console, bus)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    await index.close()
    await ledger.close()
    await bus.close()


async def send(stack: Stack, body: bytes) -> None:
    response = await stack.client.post(
        "/webhooks/voucherify", data=body, headers=signed_headers(body)
    )
    assert response.status == 202, await response.text()


async def login(client: TestClient[Any, Any]) -> str:
    """Log in with the form; the CSRF token of the session, read from a page."""
    response = await client.post(
        "/console/login", data={"token": TOKEN, "next": "/console/"}, allow_redirects=False
    )
    assert response.status == 303
    page = await (await client.get("/console/events", headers=HTML)).text()
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page
    return found.group(1)


async def replay_preview(stack: Stack, waiting: int) -> str:
    """The replay preview, once it lists ``waiting`` dead letters (each is written just
    after its last attempt)."""
    text = ""
    for _ in range(100):
        preview = await stack.client.get("/console/dead-letters/recorder/replay", headers=HTML)
        text = await preview.text()
        if f"Replay {waiting} dead letters" in text:
            break
        await asyncio.sleep(0.1)
    assert f"Replay {waiting} dead letters" in text
    return text


async def outcome_of(stack: Stack, event_id: str) -> str:
    response = await stack.client.get(f"/console/events?q={event_id}", headers=BEARER)
    return await response.text()


async def test_without_the_token_every_console_page_is_refused_and_shows_no_data(
    stack: Stack,
) -> None:
    body = event_body(event_id="evt_secret_1")
    await send(stack, body)
    for path in ("/console/", "/console/events?q=evt_secret_1", "/console/events/evt_secret_1",
                 "/console/dead-letters", "/console/quarantine", "/console/nope"):  # fmt: skip
        plain = await stack.client.get(path, allow_redirects=False)
        assert plain.status == 401, path
        assert "evt_secret_1" not in await plain.text()
        browser = await stack.client.get(path, headers=HTML, allow_redirects=False)
        assert browser.status in (303, 401), path
        if browser.status == 303:
            assert browser.headers["Location"].startswith("/console/login?next=")
    wrong = await stack.client.get(
        "/console/events?q=evt_secret_1", headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status == 401
    forged = await stack.client.get(
        "/console/", headers=HTML, cookies={"pubrelay_console": "99999999999.deadbeef"}
    )
    assert "evt_secret_1" not in await forged.text()


async def test_the_login_form_sets_a_strict_http_only_cookie_and_a_wrong_token_is_refused(
    stack: Stack,
) -> None:
    wrong = await stack.client.post("/console/login", data={"token": "guess", "next": "/"})
    assert wrong.status == 401
    assert "not right" in await wrong.text()
    response = await stack.client.post(
        "/console/login",
        data={"token": TOKEN, "next": "https://evil.example/"},
        allow_redirects=False,
    )
    assert response.status == 303
    assert response.headers["Location"] == "/console/"  # never another site
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/console/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; over HTTPS it is Secure
    page = await stack.client.get("/console/", headers=HTML)
    assert page.status == 200
    assert "Overview" in await page.text()


async def test_every_console_answer_carries_a_strict_content_security_policy(stack: Stack) -> None:
    for path in ("/console/login", "/console/", "/console/events"):
        response = await stack.client.get(path, headers=BEARER)
        assert response.headers["Content-Security-Policy"] == CSP
        assert "script-src" not in CSP  # default-src 'none': no script runs at all
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"


async def test_a_replay_without_its_csrf_token_is_refused_and_changes_nothing(
    stack: Stack,
) -> None:
    stack.failing.add("evt_csrf_1")
    await send(stack, event_body(event_id="evt_csrf_1"))
    await wait_indexed(stack, "evt_csrf_1", "dead lettered")
    await login(stack.client)
    refused = await stack.client.post(
        "/console/dead-letters/recorder/replay", data={"event_id": "evt_csrf_1"}
    )
    assert refused.status == 403
    forged = await stack.client.post(
        "/console/dead-letters/recorder/replay", data={"event_id": "evt_csrf_1", "csrf": "0" * 64}
    )
    assert forged.status == 403
    assert stack.handler.calls["evt_csrf_1"] <= 1


async def wait_indexed(stack: Stack, event_id: str, text: str, *, timeout_s: float = 10) -> str:
    """The event's timeline once it shows ``text`` (the index is written in batches)."""
    page = ""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        response = await stack.client.get(f"/console/events/{event_id}", headers=BEARER)
        page = await response.text()
        if response.status == 200 and text in page:
            return page
        await asyncio.sleep(0.1)
    raise AssertionError(f"{event_id} never showed {text!r}:\n{page}")


async def test_search_finds_an_event_by_each_of_its_ids_and_fields(stack: Stack) -> None:
    envelope = json.loads(event_body(event_id="evt_find_1", delivery_id="whs_find_1"))
    publication = envelope["data"]["publication"]
    publication["id"] = "pub_find_1"
    publication["voucher"]["code"] = "FIND-CODE-1"
    envelope["data"]["customer"].update(id="cust_find_1", email="Find.Me@Example.com")
    await send(stack, json.dumps(envelope).encode())
    await wait_indexed(stack, "evt_find_1", "done")
    for query in ("evt_find_1", "whs_find_1", "pub_find_1", "cust_find_1",
                  "find.me@example.com", "FIND-CODE-1", "find-code-1"):  # fmt: skip
        page = await outcome_of(stack, query)
        assert 'href="/console/events/evt_find_1"' in page, query
    nothing = await outcome_of(stack, "FIND-CODE")  # whole values only
    assert "evt_find_1" not in nothing


async def test_an_attacker_controlled_body_is_escaped_in_every_field(stack: Stack) -> None:
    script = "<script>alert(1)</script>"
    envelope = json.loads(event_body(event_id="evt_xss_1"))
    data = envelope["data"]
    data["customer"].update(id=f"c{script}", email=f"x{script}@example.com", name=script)
    data["campaign"]["name"] = script
    data["publication"].update(id=f"p{script}", channel=script)
    data["publication"]["voucher"]["code"] = script
    stack.failing.add("evt_xss_1")
    await send(stack, json.dumps(envelope).encode())
    timeline = await wait_indexed(stack, "evt_xss_1", "dead lettered")
    found = await outcome_of(stack, script)
    letters = await (await stack.client.get("/console/dead-letters", headers=BEARER)).text()
    for page in (timeline, found, letters):
        assert "<script>" not in page
        assert "<b>bold</b>" not in page  # the handler's error is escaped too
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in timeline
    assert "evt_xss_1" in found


async def test_an_e_mail_address_in_a_handler_error_is_masked_in_the_timeline(
    stack: Stack,
) -> None:
    stack.failing.add("evt_mailbox_1")
    await send(stack, event_body(event_id="evt_mailbox_1"))
    timeline = await wait_indexed(stack, "evt_mailbox_1", "dead lettered")
    assert "owner.private@example.org" not in timeline
    assert "o***@example.org" in timeline  # enough to tell addresses apart


async def test_a_dead_letter_replayed_from_the_console_turns_done(stack: Stack) -> None:
    stack.failing.add("evt_replay_1")
    await send(stack, event_body(event_id="evt_replay_1"))
    timeline = await wait_indexed(stack, "evt_replay_1", "dead lettered")
    assert "the downstream refused it" in timeline
    csrf = await login(stack.client)
    letters = await (await stack.client.get("/console/dead-letters", headers=HTML)).text()
    assert "evt_replay_1" in letters
    preview = await stack.client.get(
        "/console/dead-letters/recorder/replay?event_id=evt_replay_1", headers=HTML
    )
    text = await preview.text()
    assert "Dry run: nothing was sent" in text
    assert "Replay 1 dead letter" in text
    stack.failing.discard("evt_replay_1")
    replayed = await stack.client.post(
        "/console/dead-letters/recorder/replay", data={"event_id": "evt_replay_1", "csrf": csrf}
    )
    assert replayed.status == 200
    assert "sent back to recorder" in await replayed.text()
    await eventually(lambda: "evt_replay_1" in stack.handler.effects)
    timeline = await wait_indexed(stack, "evt_replay_1", "badge done")
    steps = timeline.split("<h2>Timeline</h2>")[1]
    assert steps.index("dead lettered") < steps.index("badge done")  # in that order
    letters = await (await stack.client.get("/console/dead-letters", headers=HTML)).text()
    assert "evt_replay_1" not in letters


async def test_the_overview_counts_intake_and_handler_outcomes(stack: Stack) -> None:
    await send(stack, event_body(event_id="evt_count_1"))
    await wait_indexed(stack, "evt_count_1", "done")
    page = await (await stack.client.get("/console/", headers=BEARER)).text()
    assert "<svg" in page
    assert re.search(r"<td>recorder</td>\s*<td class=\"num done\">1</td>", page), page


async def test_an_outbox_e_mail_is_shown_escaped_with_its_html_in_a_sandboxed_frame(
    stack: Stack,
) -> None:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = "x@example.com"
    message["Subject"] = "Your code <script>alert(1)</script>"
    message.set_content("Your code: SPRING-1 <script>alert(2)</script>")
    message.add_alternative(
        "<p>Your code: <b>SPRING-1</b></p><script>alert(3)</script>", subtype="html"
    )
    outbox = OutboxTransport(stack.outbox)
    await outbox.start()
    reply = await outbox.send("shop@example.com", "x@example.com", message.as_bytes())
    name = reply.rsplit(" ", 1)[1]
    assert stat.S_IMODE((stack.outbox / name).stat().st_mode) == 0o600
    listing = await (await stack.client.get("/console/outbox", headers=BEARER)).text()
    assert f'href="/console/outbox/{name}"' in listing
    assert "<script>" not in listing
    page = await (await stack.client.get(f"/console/outbox/{name}", headers=BEARER)).text()
    assert "<script>" not in page
    assert "SPRING-1 &lt;script&gt;alert(2)&lt;/script&gt;" in page  # the text part, as text
    assert f'<iframe class="mail" sandbox src="/console/outbox/{name}/html"' in page
    html = await stack.client.get(f"/console/outbox/{name}/html", headers=BEARER)
    assert html.headers["Content-Security-Policy"] == FRAME_CSP  # sandboxed, no script
    assert "<b>SPRING-1</b>" in await html.text()
    for bad in ("..%2Fbus.sqlite3", "x.eml", f"{name}/../../bus.sqlite3"):
        response = await stack.client.get(f"/console/outbox/{bad}", headers=BEARER)
        assert response.status == 404, bad
    unauthenticated = await stack.client.get(f"/console/outbox/{name}/html")
    assert unauthenticated.status == 401


SLOW_LOGIN = (
    b"POST /console/login HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken="
)  # the body announced, and never sent


async def _slow_login(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = stack.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(SLOW_LOGIN)
    await writer.drain()
    return reader, writer


async def test_a_login_form_that_never_arrives_is_answered_408_and_closed(stack: Stack) -> None:
    """Before any token is checked: its connection cannot be held (the webhook shares the
    process and its file descriptors)."""
    reader, writer = await _slow_login(stack)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"Connection: close" in head
    finally:
        writer.close()


async def test_logins_read_at_once_are_bounded_and_the_next_is_refused_at_once(
    stack: Stack,
) -> None:
    slow = [await _slow_login(stack) for _ in range(MAX_LOGIN_READS)]
    try:
        slots = stack.console[CONSOLE].login_reads
        await eventually(slots.locked, what="every login slot taken")
        refused = await stack.client.post(
            "/console/login", data={"token": TOKEN}, allow_redirects=False
        )
        assert refused.status == 429
        for reader, _ in slow:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408"), head
        await login(stack.client)  # the slots are free again
    finally:
        for _, writer in slow:
            writer.close()


async def test_the_quarantine_page_counts_every_record_and_holds_only_the_last_cut(
    stack: Stack, settings: Settings
) -> None:
    bodies = [b"not json " + bytes([65 + n]) * 100_000 for n in range(3)]
    for body in bodies:
        await send(stack, body)  # signed, not JSON: quarantined, answered 202
    page = await (await stack.client.get("/console/quarantine", headers=BEARER)).text()
    assert "3 waiting" in page
    assert page.count("100009 bytes") == 3  # each whole body's size
    assert "A" * 100 in page
    assert "A" * 70_000 not in page  # shown cut to 64 KiB
    records, total = await tail_quarantined(
        stack.bus,
        topic_prefix=settings.bus.topic_prefix,
        group_prefix=fast_worker_settings().group_prefix,
        keep=2,
        max_value_bytes=10,
        idle_timeout_s=0.2,
    )
    assert total == 3
    assert [r.message.value for r in records] == [b"not json B", b"not json C"]
    assert [r.size_bytes for r in records] == [100_009, 100_009]


async def test_the_outbox_lists_headers_cut_to_a_readable_length(stack: Stack) -> None:
    stack.outbox.mkdir(exist_ok=True)
    message = EmailMessage()
    message["Subject"] = "Your code " + "x" * 5000
    message["To"] = "someone@example.com"
    message.set_content("hello")
    (stack.outbox / "1-0123456789abcdef.eml").write_bytes(message.as_bytes())
    page = await (await stack.client.get("/console/outbox", headers=BEARER)).text()
    assert "Your code " + "x" * (MAX_SHOWN_CHARS - 20) in page
    assert "x" * MAX_SHOWN_CHARS not in page


async def test_an_event_id_with_a_slash_links_to_its_own_page(stack: Stack) -> None:
    await send(stack, event_body(event_id="evt/with/slashes"))
    page = await wait_indexed(stack, "evt%2Fwith%2Fslashes", "done")
    assert "evt/with/slashes" in page
    listing = await outcome_of(stack, "evt/with/slashes")
    assert 'href="/console/events/evt%2Fwith%2Fslashes"' in listing


async def test_a_replay_preview_lists_dead_letters_read_in_several_fetches(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dry run reads SMALL_BATCH_RECORDS at a time (memory bounded): it still lists
    every dead letter, in order. The dead-letter page reads one more than it shows, and
    says so when there are more."""
    ids = [f"evt_many_{n:02}" for n in range(SMALL_BATCH_RECORDS + 8)]
    stack.failing.update(ids)
    for event_id in ids:
        await send(stack, event_body(event_id=event_id))
    await eventually(
        lambda: sum(stack.handler.calls[i] for i in ids) == len(ids), what="every attempt"
    )
    await login(stack.client)
    text = await replay_preview(stack, len(ids))
    assert [text.index(f">{i}<") for i in ids] == sorted(text.index(f">{i}<") for i in ids)
    page = await (await stack.client.get("/console/dead-letters", headers=HTML)).text()
    assert f"{len(ids)} waiting for replay" in page
    monkeypatch.setattr(operations, "MAX_SHOWN", 30)
    page = await (await stack.client.get("/console/dead-letters", headers=HTML)).text()
    assert "more than 30 waiting for replay, the oldest shown" in page
    assert [i for i in ids if f">{i}<" in page] == ids[:30]


async def test_a_replay_that_cannot_finish_says_so_on_its_page(
    stack: Stack, tmp_path: Path, settings: Settings
) -> None:
    """Dead letters gone between the replay's two readings (retention, say): the page
    shows what was sent and, as an alert, the partition it could not finish."""
    ids = [f"evt_cut_{n:02}" for n in range(SMALL_BATCH_RECORDS + 5)]
    stack.failing.update(ids)
    for event_id in ids:
        await send(stack, event_body(event_id=event_id))
    csrf = await login(stack.client)
    await replay_preview(stack, len(ids))
    dlq = dlq_topic(settings.bus.topic_prefix, "recorder")
    retry = retry_topic(settings.bus.topic_prefix, "recorder")
    with closing(sqlite3.connect(tmp_path / "bus.sqlite3", timeout=5)) as conn, conn:
        # The first replayed record expires every dead letter, as retention would.
        conn.execute(
            f"CREATE TRIGGER expire AFTER INSERT ON log WHEN NEW.topic = '{retry}' "
            f"BEGIN DELETE FROM log WHERE topic = '{dlq}'; END"
        )
    stack.failing.difference_update(ids)
    replayed = await stack.client.post(
        "/console/dead-letters/recorder/replay", data={"csrf": csrf}, headers=HTML
    )
    assert replayed.status == 200
    page = await replayed.text()
    assert f"<strong>{SMALL_BATCH_RECORDS}</strong> dead letters sent back to recorder" in page
    alert = re.search(r'<p class="error" role="alert">([^<]*)</p>', page)
    assert alert, page
    assert f"in {dlq}[0]: replay again" in alert.group(1)
    sent = ids[:SMALL_BATCH_RECORDS]
    assert [i for i in ids if f">{i}<" in page] == sent
    with closing(sqlite3.connect(tmp_path / "bus.sqlite3", timeout=5)) as conn:
        [(retried,)] = conn.execute("SELECT count(*) FROM log WHERE topic = ?", (retry,))
    assert retried == SMALL_BATCH_RECORDS


async def test_an_event_with_a_very_long_id_has_one_timeline(stack: Stack) -> None:
    """Its delivery and its attempts are indexed under the same (cut) id."""
    long_id = "evt_long_" + "A" * 300
    await send(stack, event_body(event_id=long_id))
    timeline = await wait_indexed(stack, long_id[:MAX_ID_CHARS], "badge done")
    assert "202" in timeline.split("<h2>Timeline</h2>")[1]  # the delivery, on the same page


async def test_a_cookie_kept_from_before_a_logout_is_refused(stack: Stack) -> None:
    csrf = await login(stack.client)
    kept = stack.client.session.cookie_jar.filter_cookies(stack.client.make_url("/console/"))
    cookie = kept["pubrelay_console"].value
    out = await stack.client.post("/console/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    again = await stack.client.get(
        "/console/events", headers={"Cookie": f"pubrelay_console={cookie}"}
    )
    assert again.status == 401


async def test_a_logout_ends_the_session_in_every_process_that_shares_the_index(
    stack: Stack, aiohttp_client: ClientFactory
) -> None:
    """Another process serving the console (a worker's, say) reads the same index: the
    cookie logged out in one is refused by the other, which accepted it before."""
    first = stack.console[CONSOLE]
    other_console = create_console_app(
        token=TOKEN,
        session_ttl_s=600,
        bus=stack.bus,
        index=first.index,
        recorder=None,
        handlers=["recorder"],
        topic_prefix=first.topic_prefix,
        group_prefix=first.group_prefix,
    )
    other_app = web.Application()
    other_app.add_subapp("/console/", other_console)
    other = await aiohttp_client(other_app)
    csrf = await login(stack.client)
    kept = stack.client.session.cookie_jar.filter_cookies(stack.client.make_url("/console/"))
    cookie = {"Cookie": f"pubrelay_console={kept['pubrelay_console'].value}"}
    assert (await other.get("/console/events", headers=cookie)).status == 200
    out = await stack.client.post("/console/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await other.get("/console/events", headers=cookie)).status == 401
    assert (await other.get("/console/events", headers=BEARER)).status == 200


async def test_a_session_is_refused_while_the_index_cannot_tell_if_it_ended(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await login(stack.client)
    unreachable = SqliteEventIndex(tmp_path / "never-opened.sqlite3", retention_s=60)
    monkeypatch.setattr(stack.console[CONSOLE], "index", unreachable)
    refused = await stack.client.get("/console/dead-letters")
    assert refused.status == 503
    assert "the event index is unavailable" in await refused.text()
    letters = await stack.client.get("/console/dead-letters", headers=BEARER)
    assert letters.status == 200  # the token itself needs no index


async def test_a_logout_with_the_bearer_token_only_sends_to_the_login_page(stack: Stack) -> None:
    out = await stack.client.post("/console/logout", headers=BEARER, allow_redirects=False)
    assert out.status == 303


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/x-www-form-urlencoded; charset=bogus"]
)
async def test_a_bearer_replay_whose_body_is_no_form_is_refused_not_a_server_error(
    stack: Stack, content_type: str
) -> None:
    response = await stack.client.post(
        "/console/dead-letters/recorder/replay",
        data=b"event_id=x",
        headers={**BEARER, "Content-Type": content_type},
    )
    assert response.status == 400


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("multipart/form-data", 415),  # no boundary: aiohttp's parser raised, answered 500
        ("text/plain", 415),
        ("application/x-www-form-urlencoded; charset=bogus", 400),
    ],
)
async def test_a_login_body_that_is_no_form_is_refused_not_a_server_error(
    stack: Stack, content_type: str, status: int
) -> None:
    response = await stack.client.post(
        "/console/login",
        data=f"token={TOKEN}".encode(),
        headers={"Content-Type": content_type},
        allow_redirects=False,
    )
    assert response.status == status
    assert COOKIE not in response.cookies
