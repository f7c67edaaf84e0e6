"""`pubrelay serve` and multi-code publications: one e-mail per customer, every code once.

Voucherify sends a publication of several codes as `publication.succeeded` (every code) and
`customer.publication.succeeded` (one code, every voucher id), in either order and with a
gap; reconciliation injects one event listing every code. A real `serve` and a real SMTP
server (aiosmtpd); the Voucherify API is the contract server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from consumer.signature import sign
from tests.fixtures.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify
from tests.fixtures.process import Launcher, PubrelayProcess
from tests.fixtures.samples import sample_multi_code_events
from tests.fixtures.smtp import ReceivedMessage, SmtpServer

SECRET = "multi-code-secret"
HOLD_S = 4.0
SIBLING_GAP_S = 1.0
"""How long after the customer event its sibling comes, in the 'late' case (< HOLD_S)."""


def codes_of(n: int) -> list[str]:
    return [f"MULTI-{n}-{k}" for k in (1, 2, 3)]


def pair(n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(publication.succeeded, customer.publication.succeeded) of customer ``n``'s publication."""
    return sample_multi_code_events(
        publication_event_id=f"evpub_{n}",
        customer_event_id=f"evcus_{n}",
        customer_id=f"cust_{n}",
        email=f"customer{n}@example.com",
        codes=codes_of(n),
    )


def reconciled(n: int) -> dict[str, Any]:
    """The record reconciliation injects: the first code as `voucher`, all in the publication."""
    _, event = pair(n)
    event["event"]["id"] = f"evrec_{n}"
    publication = event["data"]["publication"]
    publication.pop("voucher")
    publication["vouchers"] = codes_of(n)
    return event


def env_for(smtp: SmtpServer, **extra: str) -> dict[str, str]:
    return {
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": smtp.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_EMAIL__SIBLING_HOLD_S": str(HOLD_S),
        "PUBRELAY_WORKER__RETRY_BASE_DELAY_S": "0.1",
        **extra,
    }


async def post(server: PubrelayProcess, event: dict[str, Any]) -> None:
    data = json.dumps(event, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, data)}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.post(f"{server.url}/webhooks/voucherify", data=data, headers=headers) as response,
    ):
        assert response.status == 202, await response.text()


async def metric(server: PubrelayProcess, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def settled(server: PubrelayProcess, events: int, timeout_s: float = 30) -> None:
    """Until the e-mail handler finished ``events`` events (handled or skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = sum(
            [
                await metric(
                    server, "pubrelay_handler_events_total", handler="email", outcome=outcome
                )
                for outcome in ("handled", "skipped", "duplicate")
            ]
        )
        if done >= events:
            return
        assert time.monotonic() < deadline, f"{done} of {events} events finished"
        await asyncio.sleep(0.2)


def mail_by_recipient(mailbox: list[ReceivedMessage]) -> dict[str, list[list[str]]]:
    """Each recipient's e-mails, each as the codes its text part lists (in order)."""
    found: dict[str, list[list[str]]] = {}
    for received in mailbox:
        part = received.message.get_body(preferencelist=("plain",))
        assert part is not None
        codes = re.findall(r"MULTI-\d+-\d", part.get_content())
        found.setdefault(received.rcpt_tos[0], []).append(codes)
    return found


async def test_three_code_publications_mail_each_customer_every_code_once_in_any_order(
    run_pubrelay: Launcher, smtp_server: SmtpServer
) -> None:
    server = run_pubrelay(["serve"], env=env_for(smtp_server))
    await asyncio.to_thread(server.wait_ready)

    # 1: publication.succeeded first. 2: the customer event first, its sibling right behind
    # it (same customer, queued behind it). 3: the sibling a second later, within the hold.
    # 4: reconciliation's one event. 5: the customer event alone (no API configured).
    pub1, cus1 = pair(1)
    pub2, cus2 = pair(2)
    pub3, cus3 = pair(3)
    _, cus5 = pair(5)
    for event in (pub1, cus1, cus2, pub2, cus3, reconciled(4), cus5):
        await post(server, event)
    await asyncio.sleep(SIBLING_GAP_S)
    await post(server, pub3)
    await settled(server, events=8)

    mail = mail_by_recipient(smtp_server.mailbox)
    assert sorted(mail) == [f"customer{n}@example.com" for n in range(1, 6)]
    for n in range(1, 5):
        assert mail[f"customer{n}@example.com"] == [codes_of(n)], n
    # Nothing lists customer 5's other codes: the e-mail says what it has, counted.
    assert mail["customer5@example.com"] == [codes_of(5)[:1]]
    assert await metric(server, "pubrelay_email_messages_total", outcome="sent") == 4
    assert await metric(server, "pubrelay_email_messages_total", outcome="partial") == 1
    assert "email_sent_partial" in server.output()
    assert server.terminate() == 0


async def test_a_lone_customer_event_gets_the_missing_codes_from_the_voucherify_api(
    run_pubrelay: Launcher, smtp_server: SmtpServer, fake_voucherify: FakeVoucherify
) -> None:
    pub, cus = pair(7)
    for voucher in pub["data"]["vouchers"]:
        fake_voucherify.vouchers[voucher["id"]] = {**voucher, "object": "voucher"}
    env = env_for(
        smtp_server,
        PUBRELAY_VOUCHERIFY__API_URL=fake_voucherify.url,
        PUBRELAY_VOUCHERIFY__APP_ID=APP_ID,
        PUBRELAY_VOUCHERIFY__APP_TOKEN=APP_TOKEN,
        PUBRELAY_VOUCHERIFY__REQUEST_INTERVAL_S="0",
    )
    server = run_pubrelay(["serve"], env=env)
    await asyncio.to_thread(server.wait_ready)

    await post(server, cus)
    await settled(server, events=1)
    # The sibling comes after the hold ran out: the e-mail is out already.
    await post(server, pub)
    await settled(server, events=2)

    assert mail_by_recipient(smtp_server.mailbox) == {"customer7@example.com": [codes_of(7)]}
    assert sorted(fake_voucherify.voucher_requests) == sorted(
        cus["data"]["publication"]["vouchers_id"][1:]
    )
    assert await metric(server, "pubrelay_email_voucher_lookups_total", outcome="found") == 2
    assert await metric(server, "pubrelay_email_messages_total", outcome="partial") == 0
    assert APP_TOKEN not in server.output()
    assert server.terminate() == 0
