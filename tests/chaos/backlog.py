"""``backlog-poison``: a big backlog with one poison event, read by one worker.

The events are published straight to the topic before the worker starts (a worker that
was down for a while). The forward receiver answers 503 to one of them forever. Proves:
the worker's memory stays flat (back-pressure counts every uncommitted record, so the
partition behind the poison event pauses instead of buffering), the rest of the backlog
flows, and the poison event is dead-lettered after ``PUBRELAY_WORKER__MAX_ATTEMPTS``
attempts (read back as ``pubrelay dlq list`` reads it).
"""

from __future__ import annotations

import time

from tests.bench.attack import rss_mib
from tests.chaos.fakes import PoisonReceiver
from tests.chaos.load import event_id, wait_until
from tests.chaos.report import Row, few
from tests.chaos.sizes import Sizes
from tests.chaos.stack import Run, open_stack

MAX_ATTEMPTS = 3
BACKLOG_DRAIN_PER_S = 200  # the slowest drain this harness waits for


def backlog_poison(run: Run, sizes: Sizes) -> Row:
    row = Row("backlog + poison", sent=sizes.backlog_events)
    tag = "backlog"
    poison = event_id(tag, sizes.backlog_events // 3)
    with open_stack("backlog", run) as stack:
        receiver = PoisonReceiver(poison={poison})
        receiver.start(stack.loop)
        acked = stack.publish(tag, range(sizes.backlog_events))
        published = time.monotonic()
        worker = stack.start(
            "worker",
            ["http"],
            {
                **receiver.env(),
                "PUBRELAY_WORKER__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                "PUBRELAY_WORKER__RETRY_BASE_DELAY_S": "1",
            },
        )
        early_rss: list[float] = []

        def progressed() -> bool:
            done = len(receiver.arrivals)
            if not early_rss and done >= sizes.backlog_events // 10:
                early_rss.append(rss_mib(worker.proc.pid))
            return done >= acked - 1

        drain_s = sizes.backlog_events / BACKLOG_DRAIN_PER_S + sizes.settle_s
        wait_until(progressed, drain_s, step_s=0.5)
        drained_s = time.monotonic() - published
        lost = stack.finish(
            row, receiver.effects, handler="http", tag=tag, settle_s=sizes.settle_s, published=acked
        )
        row.sent = acked
        row.peak_rss_mib = stack.peak_rss_mib
        letters = [d for d in stack.dead_letters("http") if d.event_id == poison]
        tries = letters[0].attempts if letters else None
        row.notes.insert(
            0,
            f"{acked:,} acknowledged by the broker; drained in {drained_s:.0f} s; worker RSS "
            f"{early_rss[0] if early_rss else 0:.0f} MiB at 10%; poison event "
            + (
                f"dead-lettered after {tries} attempts (MAX_ATTEMPTS {MAX_ATTEMPTS})"
                if letters
                else "NOT dead-lettered"
            ),
        )
        if letters and tries != MAX_ATTEMPTS:
            row.error = f"poison dead-lettered after {tries} attempts, not {MAX_ATTEMPTS}"
        if lost:
            row.notes.append(f"lost: {few(lost)}")
    return row
