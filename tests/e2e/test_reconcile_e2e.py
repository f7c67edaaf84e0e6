"""`pubrelay reconcile` against a real `pubrelay serve`, aiosmtpd and the Voucherify
contract server: the publications whose webhook was lost get their e-mail, once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.signature import sign
from tests.fixtures.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify, list_item_from_event
from tests.fixtures.kafka import TansuBroker, kafka_bus_settings
from tests.fixtures.process import Launcher, pubrelay_bin
from tests.fixtures.samples import sample_publication_event
from tests.fixtures.smtp import SmtpServer

SECRET = "e2e-reconcile-secret"
N = 40
LOST = (3, 11, 17, 25, 31, 38)


def event(n: int, base: datetime) -> dict[str, Any]:
    return sample_publication_event(
        event_id=f"evcus_{n}",
        delivery_id=f"whs_{n}",
        customer_id=f"cust_{n}",
        email=f"customer{n}@example.com",
        code=f"CODE-{n:04d}",
        channel=("API", "Automation")[n % 2],
        created_at=base + timedelta(seconds=n),
    )


async def post(url: str, body: dict[str, Any]) -> int:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, data)}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.post(url, data=data, headers=headers) as response,
    ):
        return response.status


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def metric(url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def recorded(url: str) -> float:
    """Events the worker's reconciliation recorder handled (received publication ids)."""
    return await metric(
        url, "pubrelay_handler_events_total", handler="reconcile", outcome="handled"
    )


async def reconcile_runs(url: str) -> float:
    """Reconciliations this worker ran, or found the other one running (busy)."""
    return await metric(url, "pubrelay_reconcile_runs_total")


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None, "the e-mail has no text part"
    return str(body.get_content())


@dataclass
class Cli:
    code: int
    out: str
    err: str


async def cli(args: list[str], cwd: Path, env: dict[str, str]) -> Cli:
    """Run the CLI off the event loop, so the contract server in this loop keeps answering."""
    result = await asyncio.to_thread(
        subprocess.run,
        [pubrelay_bin(), *args],
        cwd=cwd,
        env={**os.environ, **env, "PUBRELAY_LOG__LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Cli(result.returncode, result.stdout, result.stderr)


def environment(smtp: SmtpServer, api: FakeVoucherify) -> dict[str, str]:
    return {
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": smtp.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_VOUCHERIFY__API_URL": api.url,
        "PUBRELAY_VOUCHERIFY__APP_ID": APP_ID,
        "PUBRELAY_VOUCHERIFY__APP_TOKEN": APP_TOKEN,
        "PUBRELAY_VOUCHERIFY__REQUEST_INTERVAL_S": "0.05",
        "PUBRELAY_WORKER__RETRY_BASE_DELAY_S": "0.1",
    }


async def test_reconcile_mails_exactly_the_publications_whose_webhook_was_lost(
    run_pubrelay: Launcher,
    smtp_server: SmtpServer,
    fake_voucherify: FakeVoucherify,
    tmp_path: Path,
) -> None:
    base = datetime.now(UTC) - timedelta(hours=1)
    events = [event(n, base) for n in range(N)]
    fake_voucherify.publications = [list_item_from_event(e) for e in events]
    # A campaign's name is typed by a person: the dry run's table escapes what it shows.
    fake_voucherify.publications[LOST[0]]["voucher"]["campaign"] = "Winter\x1b[2J sale"
    env = environment(smtp_server, fake_voucherify)
    server = run_pubrelay(["serve"], env=env)
    await asyncio.to_thread(server.wait_ready)

    delivered = [n for n in range(N) if n not in LOST]
    statuses = [await post(f"{server.url}/webhooks/voucherify", events[n]) for n in delivered]
    assert statuses == [202] * len(delivered)
    await eventually(lambda: len(smtp_server.mailbox) == len(delivered), "the webhook e-mails")
    deadline = time.monotonic() + 30
    while await recorded(server.url) < len(delivered):
        assert time.monotonic() < deadline, "the recorder never recorded the webhooks"
        await asyncio.sleep(0.1)

    dry = await cli(["reconcile", "--dry-run"], tmp_path, env)
    assert dry.code == 0, dry.err
    for n in LOST:
        assert events[n]["data"]["publication"]["id"] in dry.out
        assert f"customer{n}@example.com" not in dry.out
    assert "c***@example.com" in dry.out
    assert "Winter\\x1b[2J sale" in dry.out
    assert "\x1b" not in dry.out + dry.err
    assert f"{len(LOST)} missing, would inject {len(LOST)}" in dry.out
    await asyncio.sleep(1.0)
    assert len(smtp_server.mailbox) == len(delivered)

    fake_voucherify.fail_next(429, retry_after="1")
    run = await cli(["reconcile"], tmp_path, env)
    assert run.code == 0, run.err
    assert f"{len(LOST)} missing, injected {len(LOST)}, 0 failure(s)" in run.out
    await eventually(lambda: len(smtp_server.mailbox) == N, "the reconciled e-mails")
    reconciled = {m.rcpt_tos[0]: m.message for m in smtp_server.mailbox[len(delivered) :]}
    assert sorted(reconciled) == sorted(f"customer{n}@example.com" for n in LOST)
    for n in LOST:
        assert f"CODE-{n:04d}" in text_of(reconciled[f"customer{n}@example.com"])
    assert fake_voucherify.answered == [200, 429, 200]  # dry run; the run: a 429, its retry

    second = await cli(["reconcile"], tmp_path, env)
    assert second.code == 0, second.err
    assert "0 missing, injected 0" in second.out
    await asyncio.sleep(1.0)
    assert len(smtp_server.mailbox) == N
    assert len({m.rcpt_tos[0] for m in smtp_server.mailbox}) == N
    assert await asyncio.to_thread(server.terminate) == 0


async def test_reconcile_with_refused_credentials_exits_with_one_clear_message(
    smtp_server: SmtpServer, fake_voucherify: FakeVoucherify, tmp_path: Path
) -> None:
    env = {**environment(smtp_server, fake_voucherify), "PUBRELAY_VOUCHERIFY__APP_TOKEN": "nope"}
    result = await cli(["reconcile"], tmp_path, env)
    assert result.code == 5
    assert "refused the key pair" in result.err
    assert "nope" not in result.err + result.out
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.kafka
async def test_two_workers_reconcile_periodically_and_mail_each_lost_publication_once(
    run_pubrelay: Launcher,
    kafka_broker: TansuBroker,
    smtp_server: SmtpServer,
    fake_voucherify: FakeVoucherify,
    tmp_path: Path,
) -> None:
    base = datetime.now(UTC) - timedelta(hours=2)
    events = [event(n, base) for n in range(12)]
    fake_voucherify.publications = [list_item_from_event(e) for e in events]
    bus = kafka_bus_settings(kafka_broker, partitions=3)
    env = {
        **environment(smtp_server, fake_voucherify),
        "PUBRELAY_BUS__URL": bus.url,
        "PUBRELAY_BUS__TOPIC_PREFIX": bus.topic_prefix,
        "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
        "PUBRELAY_BUS__REPLICATION_FACTOR": "1",
        "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
        "PUBRELAY_BUS__PARTITIONS": "3",
        "PUBRELAY_LEDGER__URL": f"sqlite:///{tmp_path / 'shared' / 'ledger.sqlite3'}",
        "PUBRELAY_RECONCILE__INTERVAL_S": "1",
        "PUBRELAY_WORKER__COMMIT_INTERVAL_S": "0.2",
    }
    workers = [
        run_pubrelay(["worker"], env={**env, "PUBRELAY_DATA_DIR": str(tmp_path / name)})
        for name in ("a", "b")
    ]
    for worker in workers:
        await asyncio.to_thread(worker.wait_ready, 60)

    await eventually(lambda: len(smtp_server.mailbox) >= len(events), "12 e-mails", 90)
    # Both workers have reconciled several times since (interval 1 s): no second e-mail.
    runs_before = [await reconcile_runs(w.url) for w in workers]
    deadline = time.monotonic() + 30
    while True:
        runs = [await reconcile_runs(w.url) for w in workers]
        if all(now > before + 2 for now, before in zip(runs, runs_before, strict=True)):
            break  # each of the two, not only the first
        assert time.monotonic() < deadline, "a worker stopped reconciling"
        await asyncio.sleep(0.2)

    recipients = [m.rcpt_tos[0] for m in smtp_server.mailbox]
    assert sorted(recipients) == sorted(f"customer{n}@example.com" for n in range(12))
    for message in smtp_server.mailbox:
        n = int(message.rcpt_tos[0].removeprefix("customer").split("@")[0])
        assert f"CODE-{n:04d}" in text_of(message.message)
    injected = [await metric(w.url, "pubrelay_reconcile_missing_total") for w in workers]
    assert sum(injected) == len(events)  # one runner injected each publication, once
    # Stopped off the loop: the contract server in this loop answers their last requests.
    for worker in workers:
        assert await asyncio.to_thread(worker.terminate) == 0
