"""Scenarios where a handler's dependency fails for a while, then recovers.

- ``smtp-down``: signed deliveries flow to an e-mail worker; the SMTP relay is stopped
  (connections refused) and started again on the same port. Proves: every event gets its
  one e-mail once the relay is back (retries with back-off span the outage), none twice.
- ``hubspot-429``: deliveries flow to a CRM worker while HubSpot answers 429
  (``Retry-After: 1``) to four calls in five. Proves: every contact update arrives once
  the limit lifts, none twice, none given up.

Both workers get retries that outlast the outage (``MAX_ATTEMPTS`` 10, back-off capped at
15 s: about 70 s or more); with the defaults (5 attempts from 1 s) a relay down for a
minute dead-letters events after about 15 s, which this harness counts as dead letters,
not as lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from tests.chaos.fakes import SlowSmtpServer, ThrottledHubSpot
from tests.chaos.load import Deliveries, by_event, deliver
from tests.chaos.report import Row, few
from tests.chaos.sizes import Sizes
from tests.chaos.stack import Run, open_stack

PATIENT_RETRIES = {
    "PUBRELAY_WORKER__MAX_ATTEMPTS": "10",
    "PUBRELAY_WORKER__RETRY_MAX_DELAY_S": "15",
}


def smtp_down(run: Run, sizes: Sizes) -> Row:
    row = Row("smtp-down", sent=sizes.smtp_events)
    tag = "smtpdown"
    with open_stack(row.scenario, run) as stack:
        smtp = SlowSmtpServer()
        smtp.start()
        try:
            webhook = stack.start("webhook")
            stack.start("worker", ["email"], {**smtp.env(), **PATIENT_RETRIES})
            stack.warm_up(stack.webhook_url(webhook), lambda: by_event(smtp.effects()), tag)
            deliveries = Deliveries()
            stop_after_s = sizes.smtp_events / sizes.smtp_rate_per_s / 5

            async def scenario() -> None:
                sender = asyncio.create_task(
                    deliver(
                        stack.webhook_url(webhook),
                        tag,
                        range(sizes.smtp_events),
                        rate_per_s=sizes.smtp_rate_per_s,
                        deliveries=deliveries,
                    )
                )
                await asyncio.sleep(stop_after_s)
                await asyncio.to_thread(smtp.stop)
                await asyncio.sleep(sizes.smtp_down_s)
                await asyncio.to_thread(smtp.start)
                await sender

            asyncio.run(scenario())
            accepted = deliveries.accepted
            row.accepted = len(accepted)

            def mailbox() -> Counter[str]:
                return by_event(smtp.effects())

            lost = stack.finish(
                row,
                mailbox,
                handler="email",
                tag=tag,
                accepted=accepted,
                settle_s=sizes.settle_s,
                stored_at_most=deliveries.tries,
            )
        finally:
            smtp.stop()
        row.peak_rss_mib = stack.peak_rss_mib
        row.notes.insert(0, f"SMTP down {sizes.smtp_down_s:.0f} s after {stop_after_s:.0f} s")
        _describe(row, mailbox(), lost)
    return row


def hubspot_429(run: Run, sizes: Sizes) -> Row:
    row = Row("hubspot-429", sent=sizes.hubspot_events)
    tag = "hubspot"
    with open_stack(row.scenario, run) as stack:
        hubspot = ThrottledHubSpot()
        hubspot.start(stack.loop)
        webhook = stack.start("webhook")
        stack.start(
            "worker",
            ["crm"],
            {**hubspot.env(), **PATIENT_RETRIES, "PUBRELAY_WORKER__CONCURRENCY": "100"},
        )
        stack.warm_up(stack.webhook_url(webhook), lambda: by_event(hubspot.effects()), tag)
        deliveries = Deliveries()
        hubspot.throttle_until = time.monotonic() + sizes.throttle_s
        asyncio.run(
            deliver(
                stack.webhook_url(webhook),
                tag,
                range(sizes.hubspot_events),
                rate_per_s=sizes.hubspot_rate_per_s,
                deliveries=deliveries,
            )
        )
        accepted = deliveries.accepted
        row.accepted = len(accepted)

        def updates() -> Counter[str]:
            return by_event(hubspot.effects())

        lost = stack.finish(
            row,
            updates,
            handler="crm",
            tag=tag,
            accepted=accepted,
            settle_s=sizes.settle_s,
            stored_at_most=deliveries.tries,
        )
        row.peak_rss_mib = stack.peak_rss_mib
        calls = len(hubspot.requests)
        row.notes.insert(
            0,
            f"429 to 4 calls in 5 for {sizes.throttle_s:.0f} s: {hubspot.throttled} of "
            f"{calls} calls throttled",
        )
        _describe(row, updates(), lost)
    return row


def _describe(row: Row, effects: dict[str, int], lost: list[str]) -> None:
    repeated = sorted(e for e, n in effects.items() if n > 1)
    if repeated:
        row.notes.append(f"repeated: {few(repeated)}")
    if lost:
        row.notes.append(f"lost: {few(lost)}")
