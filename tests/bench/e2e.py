"""End to end: signed POST -> `pubrelay serve` -> e-mail accepted by an SMTP server.

Figures: events/s from the first POST to the last accepted e-mail, and p50/p99 of each
event's POST -> SMTP-accepted latency; beside them, from the same run, the POST -> 202
latency of the same requests (the intake alone).
"""

from __future__ import annotations

import asyncio
import email
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiosmtpd.controller import Controller

from consumer.signature import sign
from tests.fixtures.samples import sample_publication_body

SECRET = "bench-secret"
TIME_LIMIT_S = 120.0


class _Recorder:
    """aiosmtpd handler noting when each event's e-mail was accepted."""

    def __init__(self) -> None:
        self.accepted: dict[str, float] = {}
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        del server, session
        message = email.message_from_bytes(envelope.content)
        event_id = message.get("X-Pubrelay-Event-Id", "")
        with self.lock:
            self.accepted[event_id] = time.monotonic()
        return "250 2.0.0 Ok"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_e2e(url: str, recorder: _Recorder, count: int, concurrency: int) -> dict[str, float]:
    sent_at: dict[str, float] = {}
    acked: list[float] = []
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

        async def one(n: int) -> None:
            body = sample_publication_body(
                event_id=f"ev_{n}",
                delivery_id=f"whs_{n}",
                customer_id=f"cust_{n}",
                email=f"customer{n}@example.com",
                code=f"C{n}",
            )
            headers = {
                "Content-Type": "application/json",
                "x-voucherify-signature": sign(SECRET, body),
            }
            async with limit:
                started = time.monotonic()
                sent_at[f"ev_{n}"] = started
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 202, response.status
                acked.append(time.monotonic() - started)

        first = time.monotonic()
        await asyncio.gather(*(one(n) for n in range(count)))
    for _ in range(int(TIME_LIMIT_S / 0.05)):  # bounded wait for the last e-mails
        if len(recorder.accepted) >= count:
            break
        await asyncio.sleep(0.05)
    with recorder.lock:
        accepted = dict(recorder.accepted)
    latencies = [accepted[k] - sent_at[k] for k in accepted if k in sent_at]
    last = max(accepted.values()) if accepted else time.monotonic()
    return {
        "delivered": float(len(latencies)),
        "events_per_s": len(latencies) / (last - first),
        "e2e_p50_ms": _percentile(latencies, 0.5) * 1000,
        "e2e_p99_ms": _percentile(latencies, 0.99) * 1000,
        "intake_p50_ms": statistics.median(acked) * 1000,
        "intake_p99_ms": _percentile(acked, 0.99) * 1000,
    }


def start_smtp(port: int) -> tuple[Controller, _Recorder]:
    recorder = _Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, recorder


def e2e_env(tmp: Path, http_port: int, smtp_port: int) -> dict[str, str]:
    return {
        "PUBRELAY_HTTP__PORT": str(http_port),
        "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
        "PUBRELAY_DATA_DIR": str(tmp / f"e2e-{http_port}"),
        "PUBRELAY_LOG__FORMAT": "json",
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_EMAIL__MAX_PER_S": "0",
        "PUBRELAY_EMAIL__CONNECTIONS": "4",
        "PUBRELAY_WORKER__CONCURRENCY": "64",
    }
