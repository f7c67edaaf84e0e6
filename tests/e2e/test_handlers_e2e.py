"""`pubrelay serve` with the e-mail, CRM and metrics handlers, against real servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from consumer.signature import sign
from tests.fixtures.fake_hubspot import TOKEN, FakeHubSpot
from tests.fixtures.process import Launcher, pubrelay_bin
from tests.fixtures.samples import sample_publication_body
from tests.fixtures.smtp import SmtpServer

SECRET = "e2e-secret"
CHANNELS = ("API", "Dashboard", "Automation", "voucherify-web-ui")
CREATED_AT = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def body(n: int, *, delivery: str = "a") -> bytes:
    return sample_publication_body(
        event_id=f"evcus_{n}",
        delivery_id=f"whs_{n}_{delivery}",
        customer_id=f"cust_{n}",
        email=None if n % 20 == 0 else f"customer{n}@example.com",
        code=f"CODE-{n:04d}",
        channel=CHANNELS[n % len(CHANNELS)],
        created_at=CREATED_AT,
    )


async def post_all(url: str, bodies: list[bytes]) -> list[int]:
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

        async def one(data: bytes) -> int:
            headers = {
                "Content-Type": "application/json",
                "x-voucherify-signature": sign(SECRET, data),
            }
            async with limit, session.post(url, data=data, headers=headers) as response:
                return response.status

        return list(await asyncio.gather(*(one(b) for b in bodies)))


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def metric_total(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def serve_env(smtp: SmtpServer, hubspot: FakeHubSpot) -> dict[str, str]:
    return {
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_HANDLERS__ENABLED": '["email", "crm", "metrics"]',
        "PUBRELAY_EMAIL__SMTP_URL": smtp.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_CRM__TOKEN": TOKEN,
        "PUBRELAY_CRM__BASE_URL": hubspot.url,
        "PUBRELAY_CRM__BATCH_WINDOW_S": "0.2",
        "PUBRELAY_WORKER__CONCURRENCY": "100",
        "PUBRELAY_WORKER__RETRY_BASE_DELAY_S": "0.1",
    }


async def test_200_publications_with_redeliveries_mail_upsert_and_count_each_once(
    run_pubrelay: Launcher, smtp_server: SmtpServer, fake_hubspot: FakeHubSpot
) -> None:
    server = run_pubrelay(["serve"], env=serve_env(smtp_server, fake_hubspot))
    await asyncio.to_thread(server.wait_ready)
    url = f"{server.url}/webhooks/voucherify"

    first = await post_all(url, [body(n) for n in range(200)])
    # Voucherify retries 20 already-sent events: same event ids, new delivery ids.
    again = await post_all(url, [body(n, delivery="retry") for n in range(1, 200, 10)])

    assert first == [202] * 200
    assert again == [202] * 20
    await eventually(lambda: len(smtp_server.mailbox) >= 190, "190 e-mails")
    await eventually(lambda: len(fake_hubspot.contacts) >= 190, "190 contacts")
    deadline = time.monotonic() + 30
    while await metric_total(server.url, "pubrelay_publications_total") < 200:
        assert time.monotonic() < deadline, "pubrelay_publications_total never reached 200"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # would-be duplicates have had time to arrive

    recipients = [m.rcpt_tos[0] for m in smtp_server.mailbox]
    assert len(recipients) == 190
    assert len(set(recipients)) == 190
    assert not any(f"customer{n}@example.com" in recipients for n in range(0, 200, 20))
    assert len(fake_hubspot.contacts) == 190
    # Each contact upserted once: the fake's contacts overwrite, its requests do not.
    upserted = Counter(email for r in fake_hubspot.upserts for email in r.ids)
    assert len(upserted) == 190
    assert set(upserted.values()) == {1}
    assert fake_hubspot.contacts["customer7@example.com"]["voucherify_last_coupon_code"] == (
        "CODE-0007"
    )
    assert await metric_total(server.url, "pubrelay_publications_total") == 200
    assert server.terminate() == 0


async def test_dead_letters_are_listed_and_replayed_through_the_cli(
    run_pubrelay: Launcher, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = {
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": smtp_server.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
    }
    smtp_server.reject("customer3@example.com")
    server = run_pubrelay(["serve"], env=env)
    await asyncio.to_thread(server.wait_ready)

    assert await post_all(f"{server.url}/webhooks/voucherify", [body(3)]) == [202]
    await eventually(
        lambda: (
            _run_cli(["dlq", "list", "--handler", "email"], tmp_path, env).count("evcus_3") == 1
        ),
        "the rejected e-mail in the dead-letter list",
        timeout_s=30,
    )
    listing = _run_cli(["dlq", "list", "--handler", "email"], tmp_path, env)
    assert "550" in listing
    assert "1 dead letter(s)" in listing
    assert smtp_server.mailbox == []

    smtp_server.clear_rejections()
    dry = _run_cli(["replay", "--handler", "email", "--dry-run"], tmp_path, env)
    assert "would replay 1" in dry
    await asyncio.sleep(0.5)
    assert smtp_server.mailbox == []

    replayed = _run_cli(["replay", "--handler", "email"], tmp_path, env)
    assert "replayed 1" in replayed
    await eventually(lambda: len(smtp_server.mailbox) == 1, "the replayed e-mail", timeout_s=30)
    assert smtp_server.mailbox[0].rcpt_tos == ["customer3@example.com"]
    assert "0 dead letter(s)" in _run_cli(["dlq", "list", "--handler", "email"], tmp_path, env)
    assert server.terminate() == 0


def _run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [pubrelay_bin(), *args],
        cwd=cwd,
        env={**os.environ, **env, "PUBRELAY_LOG__LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
