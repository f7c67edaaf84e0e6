"""The ``email`` handler against a real SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from bus.sqlite import SqliteBus
from handlers.builtin.email.handler import EmailHandler, create
from handlers.types import Event, HandlerContext, KeyLedger
from handlers.worker.ledger import SqliteLedger
from handlers.worker.service import Worker
from schemas.errors import ConfigError, HandlerError, RetryLater, SkipEvent
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED
from schemas.record import header
from schemas.topics import dlq_topic
from tests.fixtures.handler_harness import Harness as GenericHarness
from tests.fixtures.handler_harness import capturing_context
from tests.fixtures.process import free_port
from tests.fixtures.samples import sample_publication_event
from tests.fixtures.smtp import SmtpServer, TlsFiles
from tests.fixtures.worker import (
    eventually,
    fast_worker_settings,
    outcome,
    publish_event,
    read_all,
    running,
)

PUBLISHED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SENDER = "Spring Shop <coupons@shop.example>"
REPLY_TO = "help@shop.example"
USER, PASSWORD = "relay-user", "relay-password-s3cret"
ServerFactory = Callable[..., SmtpServer]


def envelope(
    n: int,
    *,
    email: str | None = "",
    name: str | None = "Jack Webhook",
    campaign: str = "Spring Discounts",
    channel: str = "API",
    metadata: dict[str, Any] | None = None,
    publication_id: str | None = None,
) -> dict[str, Any]:
    """A ``customer.publication.succeeded`` body: customer ``cust_<n>``, code ``SPRING-<n>``."""
    body = sample_publication_event(
        event_id=f"evcus_{n:04d}",
        delivery_id=f"whs_{n:04d}",
        customer_id=f"cust_{n:04d}",
        email=f"customer{n}@example.com" if email == "" else email,
        code=f"SPRING-{n:04d}",
        channel=channel,
        campaign=campaign,
        created_at=PUBLISHED,
    )
    data = body["data"]
    data["customer"]["name"] = name
    if metadata is not None:
        data["customer"]["metadata"].update(metadata)
    if publication_id is not None:
        data["publication"]["id"] = body["event"]["entity_id"] = publication_id
    return body


def multi_code(n: int, codes: list[str], *, publication_id: str | None = None) -> dict[str, Any]:
    """The project-level ``publication.succeeded`` of one publication with several codes."""
    body = envelope(n, publication_id=publication_id)
    body["event"]["id"] = f"evpub_{n:04d}"
    body["type"] = body["event"]["type"] = PUBLICATION_SUCCEEDED
    data = body["data"]
    template = data.pop("voucher")
    template["discount"] = {"type": "AMOUNT", "amount_off": 1000}
    data["vouchers"] = [{**copy.deepcopy(template), "code": code} for code in codes]
    data["publication"]["vouchers"] = codes
    del data["publication"]["voucher"]
    data["user"] = None
    return body


def as_event(body: dict[str, Any], attempt: int = 1) -> Event:
    event_type = body["event"]["type"]
    return Event(
        id=body["event"]["id"],
        type=event_type,
        raw=json.dumps(body, separators=(",", ":")).encode(),
        headers=(),
        key=str(body["data"]["customer"]["id"]).encode(),
        attempt=attempt,
        topic="voucherify." + event_type,
        partition=0,
        offset=0,
    )


Harness = GenericHarness[EmailHandler]


def email_env(url: str, **settings: str) -> dict[str, str]:
    env = {
        "PUBRELAY_EMAIL__SMTP_URL": url,
        "PUBRELAY_EMAIL__SENDER": SENDER,
        "PUBRELAY_EMAIL__REPLY_TO": REPLY_TO,
        "PUBRELAY_EMAIL__HELO_HOSTNAME": "worker.test",
        "PUBRELAY_EMAIL__TIMEOUT_S": "3",
        "PUBRELAY_EMAIL__MAX_PER_S": "0",
        "PUBRELAY_EMAIL__CURRENCY_SYMBOL": "$",
        "PUBRELAY_EMAIL__LIST_UNSUBSCRIBE": (
            "https://shop.example/unsubscribe?customer={{ customer.id|urlencode }}"
        ),
    }
    env.update({f"PUBRELAY_EMAIL__{k.upper()}": v for k, v in settings.items()})
    return env


@asynccontextmanager
async def running_email(
    url: str, tmp_path: Path, *, ledger: KeyLedger | None = None, **settings: str
) -> AsyncIterator[Harness]:
    context, logs = capturing_context("email", tmp_path, email_env(url, **settings), ledger=ledger)
    handler = create(context)
    await handler.start()
    try:
        yield Harness(handler, context.metrics_registry, logs)
    finally:
        await handler.stop()


@asynccontextmanager
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3", retention_s=3600)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


def parts(message: EmailMessage) -> dict[str, str]:
    """The decoded leaf parts by content type."""
    found: dict[str, str] = {}
    for part in message.walk():
        if not part.is_multipart():
            content = str(part.get_content())
            found[part.get_content_type()] = content.replace("\r\n", "\n")
    return found


async def test_a_publication_arrives_once_with_its_headers_and_the_code_in_both_parts(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        await h.handler.handle(as_event(envelope(7)))

    assert len(smtp_server.mailbox) == 1
    received = smtp_server.mailbox[0]
    assert received.mail_from == "coupons@shop.example"
    assert received.rcpt_tos == ["customer7@example.com"]
    message = received.message
    assert message["From"] == SENDER
    assert message["To"] == "Jack Webhook <customer7@example.com>"
    assert message["Reply-To"] == REPLY_TO
    assert message["Subject"] == "Your coupon code SPRING-0007 for Spring Discounts"
    publication_id = envelope(7)["data"]["publication"]["id"]
    assert message["Message-ID"] == f"<pubrelay.{publication_id}@shop.example>"
    assert message["List-Unsubscribe"] == ("<https://shop.example/unsubscribe?customer=cust_0007>")
    assert message["Date"]
    assert message.get_content_type() == "multipart/alternative"
    body = parts(message)
    assert list(body) == ["text/plain", "text/html"]
    for text in body.values():
        assert "SPRING-0007" in text
        assert "10% off" in text
    assert h.metric("pubrelay_email_messages_total", outcome="sent") == 1
    assert "email_sent" in h.log_events()
    assert "customer7@example.com" not in h.log_text()
    assert "c***@example.com" in h.log_text()


async def test_a_customer_id_holding_separators_gives_one_encoded_list_unsubscribe_uri(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    body = envelope(8)
    body["data"]["customer"]["id"] = "a>b, <https://evil.example/x>"
    template = "https://shop.example/unsub?c={{ customer.id }}"
    async with running_email(smtp_server.url, tmp_path, list_unsubscribe=template) as h:
        await h.handler.handle(as_event(body))

    header = smtp_server.mailbox[0].message["List-Unsubscribe"]
    assert (
        header == "<https://shop.example/unsub?c=a%3Eb%2C%20%3Chttps%3A%2F%2Fevil.example%2Fx%3E>"
    )


async def test_the_html_part_escapes_a_customer_name_holding_markup(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    name = '<script>alert("x")</script> Jack'
    async with running_email(smtp_server.url, tmp_path) as h:
        await h.handler.handle(as_event(envelope(1, name=name)))

    body = parts(smtp_server.mailbox[0].message)
    assert "<script>" not in body["text/html"]
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; Jack" in body["text/html"]
    assert name in body["text/plain"]  # text is not HTML: no entities there


async def test_a_lone_surrogate_in_the_customer_name_is_sent_as_a_replacement_character(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    # json.dumps writes the lone surrogate as the escape "\\ud83d": valid JSON, half an emoji.
    name = "Jack \ud83d"
    async with running_email(smtp_server.url, tmp_path) as h:
        await h.handler.handle(as_event(envelope(3, name=name)))

    [received] = smtp_server.mailbox
    assert received.rcpt_tos == ["customer3@example.com"]
    assert received.message["To"] == "Jack \ufffd <customer3@example.com>"
    for text in parts(received.message).values():
        assert "Hello Jack \ufffd," in text
        assert "SPRING-0003" in text
    assert h.metric("pubrelay_email_messages_total", outcome="sent") == 1


async def test_campaign_and_channel_templates_override_the_default(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    (templates / "campaign").mkdir(parents=True)
    (templates / "channel").mkdir()
    for base, label in (
        ("campaign/spring-discounts", "Spring campaign"),
        ("channel/automation", "Automation channel"),
    ):
        (templates / f"{base}.subject.txt").write_text(f"{label}: {{{{ voucher.code }}}}")
        (templates / f"{base}.txt").write_text(f"{label} text {{{{ voucher.code }}}}\n")
        (templates / f"{base}.html").write_text(
            f"<p>{label} html {{{{ voucher.code }}}} {{{{ customer.name }}}}</p>\n"
        )

    async with running_email(smtp_server.url, tmp_path, template_dir=str(templates)) as h:
        await h.handler.handle(as_event(envelope(1, channel="Automation")))
        await h.handler.handle(as_event(envelope(2, campaign="Summer", channel="Automation")))
        await h.handler.handle(as_event(envelope(3, campaign="Summer", channel="API")))

    subjects = [m.message["Subject"] for m in smtp_server.mailbox]
    assert subjects == [
        "Spring campaign: SPRING-0001",
        "Automation channel: SPRING-0002",
        "Your coupon code SPRING-0003 for Summer",
    ]
    first = parts(smtp_server.mailbox[0].message)
    assert first["text/plain"] == "Spring campaign text SPRING-0001\n"
    assert first["text/html"] == "<p>Spring campaign html SPRING-0001 Jack Webhook</p>\n"
    assert parts(smtp_server.mailbox[1].message)["text/plain"].startswith("Automation channel")


async def test_a_multi_code_publication_sends_one_email_listing_every_code(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    codes = ["SPRING-aaa", "SPRING-bbb", "SPRING-ccc"]
    async with running_email(smtp_server.url, tmp_path) as h:
        await h.handler.handle(as_event(multi_code(4, codes)))

    assert len(smtp_server.mailbox) == 1
    message = smtp_server.mailbox[0].message
    assert message["Subject"] == "Your 3 coupon codes for Spring Discounts"
    for text in parts(message).values():
        for code in codes:
            assert code in text
        assert "$10.00 off" in text


async def test_both_publication_events_of_one_publication_send_one_email(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    project_level = multi_code(5, ["SPRING-0005"], publication_id="pub_shared")
    customer_level = envelope(5, publication_id="pub_shared")
    async with sqlite_ledger(tmp_path) as ledger:
        async with running_email(smtp_server.url, tmp_path, ledger=ledger) as h:
            await h.handler.handle(as_event(project_level))
            with pytest.raises(SkipEvent, match="already sent"):
                await h.handler.handle(as_event(customer_level))
            assert h.metric("pubrelay_email_skipped_total", reason="already_sent") == 1

        # A restarted worker (a fresh handler) still knows: the ledger is on disk.
        async with running_email(smtp_server.url, tmp_path, ledger=ledger) as h:
            with pytest.raises(SkipEvent):
                await h.handler.handle(as_event(customer_level))
        assert await ledger.is_done("email", "publication:pub_shared")

    assert len(smtp_server.mailbox) == 1
    assert smtp_server.mailbox[0].message["Message-ID"] == "<pubrelay.pub_shared@shop.example>"


async def test_a_sent_publication_the_store_refuses_to_record_is_recorded_once_it_can(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """The ledger refuses the record of the mail (a full disk, for 1.5 s): the handler keeps
    trying, so the sibling event on a restarted worker still finds the mail recorded and
    sends nothing. Given up at once, the record was lost and the sibling mailed it again
    once the claim expired."""
    project_level = multi_code(6, ["SPRING-0006"], publication_id="pub_full_disk")
    customer_level = envelope(6, publication_id="pub_full_disk")
    async with sqlite_ledger(tmp_path) as ledger:
        with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
            db.executescript(
                f"""
                CREATE TABLE refuse_until (at REAL);
                INSERT INTO refuse_until VALUES ({time.time() + 1.5});
                CREATE TRIGGER refuse BEFORE INSERT ON ledger
                WHEN NEW.event_id = 'publication:pub_full_disk'
                 AND (julianday('now') - 2440587.5) * 86400.0 < (SELECT at FROM refuse_until)
                BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;
                """
            )
        async with running_email(smtp_server.url, tmp_path, ledger=ledger) as h:
            await h.handler.handle(as_event(project_level))
            assert "email_dedupe_record_retrying" in h.log_events()
            assert "email_dedupe_recorded" in h.log_events()
            assert "disk is full" in h.log_text()
        assert await ledger.is_done("email", "publication:pub_full_disk")

        async with running_email(smtp_server.url, tmp_path / "b", ledger=ledger) as h:
            with pytest.raises(SkipEvent, match="already sent"):
                await h.handler.handle(as_event(customer_level))

    assert len(smtp_server.mailbox) == 1


async def test_two_workers_sending_the_two_events_of_one_publication_at_once_send_one_email(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    """Two worker processes (two handlers, two ledger clients on one file, no shared lock)
    get the publication's two events at the same moment; the relay is slow."""
    smtp_server.data_delay_s = 1.0
    project_level = multi_code(9, ["SPRING-0009"], publication_id="pub_raced")
    customer_level = envelope(9, publication_id="pub_raced")
    async with (
        sqlite_ledger(tmp_path) as ledger_a,
        sqlite_ledger(tmp_path) as ledger_b,
        running_email(smtp_server.url, tmp_path / "a", ledger=ledger_a) as a,
        running_email(smtp_server.url, tmp_path / "b", ledger=ledger_b) as b,
    ):
        outcomes = await asyncio.gather(
            a.handler.handle(as_event(project_level)),
            b.handler.handle(as_event(customer_level)),
            return_exceptions=True,
        )
        await asyncio.sleep(1.5)  # a second DATA, had one started, would have landed
        assert len(smtp_server.mailbox) == 1
        sent_by_a = outcomes[0] is None
        loser = b if sent_by_a else a
        assert isinstance(outcomes[1 if sent_by_a else 0], SkipEvent)
        assert loser.metric("pubrelay_email_skipped_total", reason="already_sent") == 1

    assert smtp_server.mailbox[0].message["Message-ID"] == "<pubrelay.pub_raced@shop.example>"


async def test_a_publication_claimed_by_a_worker_that_died_is_mailed_once_its_claim_expires(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with sqlite_ledger(tmp_path) as ledger:
        # The dead worker's claim: never released, it expires in 1.5 s.
        claim = await ledger.claim("email", "publication:pub_orphan", "dead-worker", ttl_s=1.5)
        assert claim.state == "claimed"
        async with running_email(smtp_server.url, tmp_path, ledger=ledger) as h:
            await h.handler.handle(as_event(envelope(10, publication_id="pub_orphan")))
            assert len(smtp_server.mailbox) == 1
            with pytest.raises(SkipEvent, match="already sent"):
                await h.handler.handle(as_event(multi_code(10, ["X"], publication_id="pub_orphan")))
        assert await ledger.is_done("email", "publication:pub_orphan")
    assert len(smtp_server.mailbox) == 1


async def test_without_a_ledger_duplicates_are_caught_in_memory_with_a_warning(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        assert "email_dedupe_in_memory" in h.log_events()
        await h.handler.handle(as_event(envelope(6, publication_id="pub_6")))
        with pytest.raises(SkipEvent):
            await h.handler.handle(as_event(multi_code(6, ["X"], publication_id="pub_6")))
    assert len(smtp_server.mailbox) == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (envelope(1, email=None), "no_address"),
        (envelope(2, email="   "), "no_address"),
        (envelope(3, metadata={"email_opt_out": True}), "opted_out"),
        (envelope(4, metadata={"email_opt_out": "yes"}), "opted_out"),
        (envelope(5, metadata={"email_opt_out": 1}), "opted_out"),
    ],
)
async def test_customers_without_an_address_or_opted_out_are_skipped_and_sent_nothing(
    smtp_server: SmtpServer, tmp_path: Path, body: dict[str, Any], reason: str
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        with pytest.raises(SkipEvent):
            await h.handler.handle(as_event(body))
        assert h.metric("pubrelay_email_skipped_total", reason=reason) == 1
    assert smtp_server.mailbox == []
    assert smtp_server.sessions == 0


async def test_a_4xx_is_retried_later_and_the_retry_sends_it_once(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    smtp_server.fail_rcpt(1)
    smtp_server.fail_data(1)
    async with running_email(smtp_server.url, tmp_path) as h:
        event = as_event(envelope(8))
        with pytest.raises(RetryLater, match=r"451 4\.7\.1 Try again later"):
            await h.handler.handle(event)
        with pytest.raises(RetryLater, match=r"451 4\.3\.0"):
            await h.handler.handle(as_event(envelope(8), attempt=2))
        await h.handler.handle(as_event(envelope(8), attempt=3))
        assert h.metric("pubrelay_email_messages_total", outcome="deferred") == 2
        assert h.metric("pubrelay_email_messages_total", outcome="sent") == 1

    assert [m.rcpt_tos for m in smtp_server.mailbox] == [["customer8@example.com"]]
    assert smtp_server.sessions == 1  # the refused transactions were reset, not reconnected


async def test_a_550_for_the_recipient_is_a_handler_error_carrying_the_reply(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    smtp_server.reject("customer9@example.com")
    async with running_email(smtp_server.url, tmp_path) as h:
        with pytest.raises(HandlerError) as caught:
            await h.handler.handle(as_event(envelope(9)))
        await h.handler.handle(as_event(envelope(10)))  # the connection is still usable
        assert h.metric("pubrelay_email_messages_total", outcome="rejected") == 1

    text = str(caught.value)
    assert "550" in text
    assert "Recipient unknown" in text
    assert "c***@example.com" in text
    assert "customer9@example.com" not in text
    assert "customer9@example.com" not in h.log_text()
    assert [m.rcpt_tos for m in smtp_server.mailbox] == [["customer10@example.com"]]


async def test_a_relay_that_is_down_means_retry_later_then_delivery_when_it_is_back(
    smtp_server_factory: ServerFactory, tmp_path: Path
) -> None:
    port = free_port()
    async with running_email(f"smtp://127.0.0.1:{port}", tmp_path) as h:
        with pytest.raises(RetryLater, match="cannot reach SMTP relay"):
            await h.handler.handle(as_event(envelope(11)))
        server = smtp_server_factory(port=port)
        await h.handler.handle(as_event(envelope(11), attempt=2))
        assert "email_smtp_unreachable" in h.log_events()

    assert len(server.mailbox) == 1


async def test_one_connection_carries_many_messages(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        for n in range(5):
            await h.handler.handle(as_event(envelope(20 + n)))
        assert h.metric("pubrelay_email_smtp_connections_total") == 1

    assert len(smtp_server.mailbox) == 5
    assert smtp_server.sessions == 1
    assert {m.session for m in smtp_server.mailbox} == {1}


async def test_a_connection_the_relay_dropped_is_reopened_for_the_next_message(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        await h.handler.handle(as_event(envelope(30)))
        smtp_server.drop_connections()
        await h.handler.handle(as_event(envelope(31)))
        smtp_server.stop()  # a relay restart: the old connection is gone
        smtp_server.start()
        await h.handler.handle(as_event(envelope(32)))

    assert [m.rcpt_tos[0] for m in smtp_server.mailbox][-1] == "customer32@example.com"
    assert len(smtp_server.mailbox) == 3
    assert smtp_server.sessions == 1  # counted since the restart


async def test_the_send_rate_is_limited(smtp_server: SmtpServer, tmp_path: Path) -> None:
    async with running_email(smtp_server.url, tmp_path, max_per_s="20") as h:
        started = time.monotonic()
        for n in range(5):
            await h.handler.handle(as_event(envelope(40 + n)))
        elapsed = time.monotonic() - started
    assert len(smtp_server.mailbox) == 5
    assert elapsed >= 4 / 20 * 0.9


async def test_starttls_and_auth_deliver_over_an_encrypted_authenticated_session(
    smtp_server_factory: ServerFactory, tls_files: TlsFiles, tmp_path: Path
) -> None:
    server = smtp_server_factory(auth=(USER, PASSWORD), tls=tls_files)
    async with running_email(
        server.url,
        tmp_path,
        starttls="always",
        ca_file=str(tls_files.ca_file),
        username=USER,
        password=PASSWORD,
    ) as h:
        await h.handler.handle(as_event(envelope(50)))
        await h.handler.handle(as_event(envelope(51)))

    assert [(m.tls, m.authenticated_as) for m in server.mailbox] == [(True, USER)] * 2
    assert len(server.auth_attempts) == 1  # logged in once per connection
    assert PASSWORD not in h.log_text()
    assert PASSWORD not in repr(h.handler)


async def test_implicit_tls_with_smtps(
    smtp_server_factory: ServerFactory, tls_files: TlsFiles, tmp_path: Path
) -> None:
    server = smtp_server_factory(tls=tls_files, implicit_tls=True)
    async with running_email(server.url, tmp_path, ca_file=str(tls_files.ca_file)) as h:
        await h.handler.handle(as_event(envelope(52)))
    assert [m.tls for m in server.mailbox] == [True]


async def test_an_untrusted_certificate_is_retry_later_and_nothing_is_sent(
    smtp_server_factory: ServerFactory, tls_files: TlsFiles, tmp_path: Path
) -> None:
    server = smtp_server_factory(tls=tls_files)
    async with running_email(server.url, tmp_path, starttls="always") as h:  # no CA_FILE
        with pytest.raises(RetryLater, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await h.handler.handle(as_event(envelope(53)))
    assert server.mailbox == []


async def test_wrong_credentials_are_retry_later_and_never_logged(
    smtp_server_factory: ServerFactory, tls_files: TlsFiles, tmp_path: Path
) -> None:
    server = smtp_server_factory(auth=(USER, PASSWORD), tls=tls_files)
    wrong = "not-the-password-123"
    async with running_email(
        server.url, tmp_path, ca_file=str(tls_files.ca_file), username=USER, password=wrong
    ) as h:
        with pytest.raises(RetryLater, match="rejected the credentials") as caught:
            await h.handler.handle(as_event(envelope(54)))
        assert "email_smtp_auth_rejected" in h.log_events()
    assert wrong not in h.log_text()
    assert wrong not in str(caught.value)
    assert server.mailbox == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_the_password_is_not_sent_without_tls_unless_allowed(
    smtp_server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = smtp_server_factory(auth=(USER, PASSWORD))  # aiosmtpd warns: no TLS required
    async with running_email(server.url, tmp_path, username=USER, password=PASSWORD) as h:
        with pytest.raises(RetryLater, match="offers no TLS"):
            await h.handler.handle(as_event(envelope(55)))
    assert server.auth_attempts == []

    async with running_email(
        server.url, tmp_path, allow_plaintext_auth="true", username=USER, password=PASSWORD
    ) as h:
        await h.handler.handle(as_event(envelope(55)))
    assert [m.authenticated_as for m in server.mailbox] == [USER]


async def test_event_types_are_both_publication_events(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    async with running_email(smtp_server.url, tmp_path) as h:
        assert h.handler.event_types == {CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED}
        assert h.handler.name == "email"


async def test_through_the_worker_one_email_per_publication_retries_and_dead_letters(
    smtp_server: SmtpServer, tmp_path: Path, topic_prefix: str
) -> None:
    """The real worker around the handler: the outcomes above, as the runtime applies them."""
    smtp_server.fail_rcpt(1)  # the first message is deferred once, then sent on its retry
    smtp_server.reject("customer62@example.com")
    shared = "pub_through_worker"
    bus = SqliteBus(tmp_path / "bus.sqlite3", poll_interval_s=0.05)
    await bus.start()
    try:
        async with (
            sqlite_ledger(tmp_path) as ledger,
            running_email(smtp_server.url, tmp_path, ledger=ledger) as h,
        ):
            worker = Worker(
                [h.handler],
                bus=bus,
                ledger=ledger,
                settings=fast_worker_settings(group_prefix=topic_prefix),
                topic_prefix=topic_prefix,
                metrics_registry=h.registry,
            )
            async with running(worker):
                for body in (
                    multi_code(61, ["SPRING-0061"], publication_id=shared),
                    envelope(61, publication_id=shared),
                    envelope(62),
                ):
                    await publish_event(
                        bus,
                        topic_prefix,
                        event_id=body["event"]["id"],
                        customer_id=body["data"]["customer"]["id"],
                        event_type=body["event"]["type"],
                        body=json.dumps(body).encode(),
                    )
                await eventually(
                    lambda: (
                        (
                            outcome(h.registry, "email", "handled")
                            + outcome(h.registry, "email", "skipped")
                            + outcome(h.registry, "email", "dead_lettered")
                        )
                        == 3
                    ),
                    what="three finished events",
                )
            [dead] = await read_all(bus, dlq_topic(topic_prefix, "email"), expect=1)
    finally:
        await bus.close()

    assert [m.rcpt_tos for m in smtp_server.mailbox] == [["customer61@example.com"]]
    assert outcome(h.registry, "email", "retried") == 1
    assert outcome(h.registry, "email", "skipped") == 1
    assert header(dead.headers, "event-id") == b"evcus_0062"
    error = header(dead.headers, "dlq-error") or b""
    assert b"550" in error
    assert b"Recipient unknown" in error
    assert b"customer62@example.com" not in error


def lacking_codes(n: int) -> dict[str, Any]:
    """A ``customer.publication.succeeded`` of a three-code publication: one code, three ids."""
    body = envelope(n, publication_id=f"pub_three_{n}")
    carried = body["data"]["voucher"]["id"]
    body["data"]["publication"]["vouchers_id"] = [carried, f"v_{n}_2", f"v_{n}_3"]
    return body


async def test_an_event_lacking_codes_is_held_once_then_sent_partial_with_the_missing_ids(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    event = lacking_codes(11)
    async with (
        sqlite_ledger(tmp_path) as ledger,
        running_email(smtp_server.url, tmp_path, ledger=ledger, sibling_hold_s="7") as h,
    ):
        with pytest.raises(RetryLater) as held:
            await h.handler.handle(as_event(event, attempt=1))
        assert (held.value.delay_s, held.value.keep_order) == (7.0, False)
        assert smtp_server.mailbox == []

        await h.handler.handle(as_event(event, attempt=2))  # the hold ran out
        assert h.metric("pubrelay_email_messages_total", outcome="partial") == 1
        assert h.metric("pubrelay_email_messages_total", outcome="sent") == 0
        partial = [c for c in h.logs.calls if c.kwargs.get("event") == "email_sent_partial"]
        assert partial[0].kwargs["missing_voucher_ids"] == ["v_11_2", "v_11_3"]
    assert len(smtp_server.mailbox) == 1


async def test_an_event_lacking_codes_is_skipped_when_its_sibling_was_mailed(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    sibling = multi_code(12, ["A-1", "A-2", "A-3"], publication_id="pub_three_12")
    async with sqlite_ledger(tmp_path) as ledger:
        async with running_email(smtp_server.url, tmp_path, ledger=ledger) as h:
            await h.handler.handle(as_event(sibling))
        # Another worker, another process: the shared ledger says the e-mail is out.
        async with running_email(smtp_server.url, tmp_path / "b", ledger=ledger) as h:
            with pytest.raises(SkipEvent, match="already sent"):
                await h.handler.handle(as_event(lacking_codes(12), attempt=1))
    assert len(smtp_server.mailbox) == 1


def test_a_hold_with_a_single_attempt_stops_start_up(tmp_path: Path) -> None:
    def context(max_attempts: int, **settings: str) -> HandlerContext:
        env = email_env("smtp://127.0.0.1:25", **settings)
        built, _ = capturing_context("email", tmp_path, env)
        return dataclasses.replace(built, max_attempts=max_attempts)

    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        create(context(1))
    create(context(2))
    create(context(1, sibling_hold_s="0"))


async def test_without_publication_succeeded_in_the_event_types_nothing_is_held(
    smtp_server: SmtpServer, tmp_path: Path
) -> None:
    only_customer = json.dumps([CUSTOMER_PUBLICATION_SUCCEEDED])
    async with running_email(smtp_server.url, tmp_path, event_types=only_customer) as h:
        await h.handler.handle(as_event(lacking_codes(13), attempt=1))
        assert h.metric("pubrelay_email_sibling_holds_total") == 0
        assert h.metric("pubrelay_email_messages_total", outcome="partial") == 1
    assert len(smtp_server.mailbox) == 1
