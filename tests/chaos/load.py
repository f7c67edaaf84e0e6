"""The events of the chaos scenarios, and the sender that delivers them as Voucherify does.

Event ``n`` of a scenario is a ``customer.publication.succeeded`` body from
:mod:`tests.fixtures.samples`: event id ``<tag>_ev<n>``, its own customer address
``<tag>.<n>@example.com`` (so an e-mail and a HubSpot contact update name the event),
50 customers' keys. The sender posts them signed at a steady rate and, like Voucherify,
delivers again what did not get a 2xx (a 503 during an outage, a refused connection, a
408) a bounded number of times, one second apart.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import aiohttp

from consumer.signature import sign
from schemas.record import HEADER_DELIVERY_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE
from tests.fixtures.samples import sample_publication_body

SECRET: Final = "chaos-webhook-secret"
EVENT_TYPE: Final = "customer.publication.succeeded"
WEBHOOK_PATH: Final = "/webhooks/voucherify"
CUSTOMERS: Final = 50
REQUEST_TIMEOUT_S: Final = 10.0  # Voucherify's
RETRY_DELAY_S: Final = 1.0


def event_id(tag: str, n: int) -> str:
    return f"{tag}_ev{n}"


def address(tag: str, n: int) -> str:
    return f"{tag}.{n}@example.com"


def body(tag: str, n: int, *, delivery: int = 0) -> bytes:
    return sample_publication_body(
        event_id=event_id(tag, n),
        delivery_id=f"{tag}_whs{n}_{delivery}",
        customer_id=f"{tag}_cust{n % CUSTOMERS}",
        email=address(tag, n),
        code=f"{tag.upper()}-{n}",
        created_at=datetime.now(UTC),
    )


def record(tag: str, n: int) -> tuple[bytes, bytes, tuple[tuple[str, bytes], ...]]:
    """Value, key and headers of event ``n`` as the intake would store it."""
    headers = (
        (HEADER_EVENT_ID, event_id(tag, n).encode()),
        (HEADER_EVENT_TYPE, EVENT_TYPE.encode()),
        (HEADER_DELIVERY_ID, f"{tag}_whs{n}_0".encode()),
    )
    return body(tag, n), f"{tag}_cust{n % CUSTOMERS}".encode(), headers


@dataclass
class Deliveries:
    """What the sender saw: per event, the final status (0: no answer) and its tries."""

    status: dict[str, int] = field(default_factory=dict)
    tries: int = 0

    @property
    def accepted(self) -> set[str]:
        return {e for e, s in self.status.items() if 200 <= s < 300}


async def deliver(
    url: str,
    tag: str,
    numbers: Iterable[int],
    *,
    rate_per_s: float,
    deliveries: Deliveries,
    max_tries: int = 30,
    concurrency: int = 64,
) -> None:
    """Post each event once at ``rate_per_s``, open loop; re-deliver non-2xx ones."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(n: int) -> None:
            key = event_id(tag, n)
            for attempt in range(max_tries):
                payload = body(tag, n, delivery=attempt)
                headers = {
                    "Content-Type": "application/json",
                    "x-voucherify-signature": sign(SECRET, payload),
                }
                status = 0
                async with limit:
                    deliveries.tries += 1
                    try:
                        async with session.post(url, data=payload, headers=headers) as answer:
                            await answer.read()
                            status = answer.status
                    except (aiohttp.ClientError, TimeoutError):
                        status = 0
                deliveries.status[key] = status
                if 200 <= status < 300:
                    return
                await asyncio.sleep(RETRY_DELAY_S)

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i, n in enumerate(numbers):
            if (delay := start + i / rate_per_s - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.5) -> bool:
    """Poll ``condition()`` until true or ``timeout_s``; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


def by_event(per_address: Counter[str]) -> Counter[str]:
    """Effects counted per address (``<tag>.<n>@example.com``), re-keyed by event id."""
    out: Counter[str] = Counter()
    for addr, count in per_address.items():
        local = addr.split("@", 1)[0]
        tag, _, n = local.rpartition(".")
        out[event_id(tag, int(n)) if n.isdigit() else addr] += count
    return out
