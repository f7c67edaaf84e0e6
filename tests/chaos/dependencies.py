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

from tests.chaos.fakes import SlowSmtpServer, ThrottledHubSpot
from tests.chaos.load import Deliveries
from tests.chaos.report import Row
from tests.chaos.sizes import Sizes
from tests.chaos.stack import Run, open_stack, run_with_fault

PATIENT_RETRIES = {
    "PUBRELAY_WORKER__MAX_ATTEMPTS": "10",
    "PUBRELAY_WORKER__RETRY_MAX_DELAY_S": "15",
}


def smtp_down(run: Run, sizes: Sizes) -> Row:
    row = Row("smtp-down", sent=sizes.smtp_events)
    tag = "smtpdown"
    with open_stack(row.scenario, run) as stack:
        smtp = SlowSmtpServer()
        with smtp.serving():
            env = {**smtp.env(), **PATIENT_RETRIES}
            webhook, _ = stack.start_flow("email", env, smtp.effects, tag)
            deliveries = Deliveries()
            stop_after_s = sizes.smtp_events / sizes.smtp_rate_per_s / 5

            async def stop_relay() -> None:
                await asyncio.sleep(stop_after_s)
                await asyncio.to_thread(smtp.stop)
                await asyncio.sleep(sizes.smtp_down_s)
                await asyncio.to_thread(smtp.start)

            run_with_fault(
                stack.send(webhook, tag, sizes.smtp_events, sizes.smtp_rate_per_s, deliveries),
                stop_relay,
            )
            lost = stack.finish(
                row, smtp.effects, deliveries, handler="email", tag=tag, settle_s=sizes.settle_s
            )
        row.peak_rss_mib = stack.peak_rss_mib
        row.notes.insert(0, f"SMTP down {sizes.smtp_down_s:.0f} s after {stop_after_s:.0f} s")
        row.note_repeated_and_lost(smtp.effects(), lost)
    return row


def hubspot_429(run: Run, sizes: Sizes) -> Row:
    row = Row("hubspot-429", sent=sizes.hubspot_events)
    tag = "hubspot"
    with open_stack(row.scenario, run) as stack:
        hubspot = ThrottledHubSpot()
        hubspot.start(stack.loop)
        env = {**hubspot.env(), **PATIENT_RETRIES, "PUBRELAY_WORKER__CONCURRENCY": "100"}
        webhook, _ = stack.start_flow("crm", env, hubspot.effects, tag)
        deliveries = Deliveries()
        hubspot.throttle_until = time.monotonic() + sizes.throttle_s
        asyncio.run(
            stack.send(webhook, tag, sizes.hubspot_events, sizes.hubspot_rate_per_s, deliveries)
        )

        lost = stack.finish(
            row, hubspot.effects, deliveries, handler="crm", tag=tag, settle_s=sizes.settle_s
        )
        row.peak_rss_mib = stack.peak_rss_mib
        calls = len(hubspot.requests)
        row.notes.insert(
            0,
            f"429 to 4 calls in 5 for {sizes.throttle_s:.0f} s: {hubspot.throttled} of "
            f"{calls} calls throttled",
        )
        row.note_repeated_and_lost(hubspot.effects(), lost)
    return row
