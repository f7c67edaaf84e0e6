"""``intake-hostile``: real deliveries while hostile clients attack the intake.

The attackers of :mod:`tests.bench.attack` run in a process of their own: slowloris
clients that send headers and part of a chunked body and then nothing (``--stalled``), and
clients posting ~1 MiB bodies with a bad signature (``--bogus``). Beside them, oversize
bodies with a valid signature are posted one after another (413 expected). Proves: every
real event the sender delivers (re-delivering what got a 503 ``busy``, as Voucherify does)
is accepted and forwarded, none twice, and no hostile request got a 2xx.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter

import aiohttp

from consumer.signature import sign
from tests.bench.attack import PeakRss
from tests.chaos.fakes import PoisonReceiver
from tests.chaos.load import SECRET, Deliveries
from tests.chaos.report import Row
from tests.chaos.sizes import Sizes
from tests.chaos.stack import Run, open_stack

OVERSIZE_BYTES = 2 * 1024 * 1024
ATTACK_READY_TIMEOUT_S = 40.0


async def post_oversize(url: str, until: float, counts: Counter[str]) -> None:
    """Validly signed bodies over ``PUBRELAY_HTTP__MAX_BODY_BYTES``, one after another."""
    payload = b'{"pad": "' + b"x" * OVERSIZE_BYTES + b'"}'
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, payload)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < until:
            try:
                async with session.post(url, data=payload, headers=headers) as answer:
                    counts[f"oversize_{answer.status}"] += 1
            except (aiohttp.ClientError, TimeoutError):
                counts["oversize_error"] += 1
            await asyncio.sleep(0.2)


def intake_hostile(run: Run, sizes: Sizes) -> Row:
    row = Row("intake-hostile", sent=sizes.hostile_events)
    tag = "hostile"
    with open_stack(row.scenario, run) as stack:
        receiver = PoisonReceiver()
        receiver.start(stack.loop)
        webhook, _ = stack.start_flow("http", receiver.env(), receiver.effects, tag)
        url = stack.webhook_url(webhook)
        seconds = sizes.hostile_events / sizes.hostile_rate_per_s
        attack_args = [str(webhook.port), str(seconds + 4)]
        attack_args += ["--bogus", str(sizes.bogus_clients)]
        attack_args += ["--stalled", str(sizes.stalled_clients)]
        attackers = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.attack", *attack_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        deliveries = Deliveries()
        oversize: Counter[str] = Counter()
        attacked: dict[str, int] = {}
        try:
            assert attackers.stdout is not None
            attackers.stdout.readline()  # "ready": every slowloris client is connected

            async def scenario() -> None:
                until = time.monotonic() + seconds
                big = asyncio.create_task(post_oversize(url, until, oversize))
                await stack.send(
                    webhook, tag, sizes.hostile_events, sizes.hostile_rate_per_s, deliveries
                )
                await big

            with PeakRss(webhook.proc.pid) as webhook_rss:
                asyncio.run(scenario())
            out, _ = attackers.communicate(timeout=seconds + 60)
            attacked = json.loads(out.strip().splitlines()[-1])
        finally:
            if attackers.poll() is None:
                attackers.kill()
                attackers.wait()
        lost = stack.finish(
            row, receiver.effects, deliveries, handler="http", tag=tag, settle_s=sizes.settle_s
        )
        row.peak_rss_mib = stack.peak_rss_mib
        hostile_2xx = sum(n for k, n in {**attacked, **oversize}.items() if "_2" in k)
        retried = deliveries.tries - len(deliveries.status)
        row.notes.insert(
            0,
            f"{sizes.stalled_clients} slowloris, {sizes.bogus_clients} bad-signature senders "
            f"({attacked.get('bogus_401', 0)} x 401), {oversize.get('oversize_413', 0)} "
            f"oversize x 413; {retried} real deliveries re-sent; {hostile_2xx} hostile 2xx; "
            f"webhook peak RSS {webhook_rss.peak:.0f} MiB",
        )
        if hostile_2xx:
            row.error = f"{hostile_2xx} hostile requests got a 2xx"
        row.note_repeated_and_lost(receiver.effects(), lost)
    return row
