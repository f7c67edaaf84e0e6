"""``pubrelay reconcile``: one reconciliation with the server's settings, told to a person.

Same data directory, ledger and bus as ``serve``. A dry run prints the missing
publications (id, created at, channel, campaign, masked customer) and injects nothing.
The last line sums the run up; a progress line on a terminal keeps long windows alive.
Exit 0 when the window was read to its start, :data:`EXIT_RECONCILE_FAILED` with one clear
message otherwise (credentials, quota, network, another runner, a window too deep).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from bus.types import Bus
from handlers.builtin.voucherify_api import ListedPublication
from handlers.reconcile.reconciler import Reconciler, Summary
from handlers.reconcile.store import create_store
from pubrelay.exit_codes import EXIT_CONFIG, EXIT_RECONCILE_FAILED, EXIT_UNAVAILABLE
from pubrelay.settings import Settings
from pubrelay.text import for_terminal
from schemas.errors import ApiError, BusError, ReconcileBusy
from schemas.masking import mask_address


def _customer(pub: ListedPublication) -> str:
    email = pub.customer_email
    return for_terminal(mask_address(email) if email else (pub.customer_id or "-"))


def _row(pub: ListedPublication) -> str:
    created = pub.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{for_terminal(pub.id):<36} {created:<19}  {for_terminal(pub.channel or '-', 20):<20} "
        f"{for_terminal(pub.campaign or '-', 24):<24} {_customer(pub)}"
    )


class _ProgressLine:
    """``pages … seen … missing … injected …`` rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, summary: Summary) -> None:
        if sys.stderr.isatty():
            self.shown = True
            print(
                f"\rpages {summary.pages}, seen {summary.seen}, missing {len(summary.missing)}, "
                f"injected {summary.injected}",
                end="",
                file=sys.stderr,
            )

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


async def reconcile(settings: Settings, bus: Bus, *, since: datetime | None, dry_run: bool) -> int:
    if not settings.voucherify.configured:
        print(
            "pubrelay reconcile: set PUBRELAY_VOUCHERIFY__APP_ID and "
            "PUBRELAY_VOUCHERIFY__APP_TOKEN (a read-only API key pair)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    store = create_store(settings.ledger, settings.reconcile, settings.data_dir)
    await store.open()
    progress = _ProgressLine()
    try:
        reconciler = Reconciler(
            api=settings.voucherify,
            settings=settings.reconcile,
            store=store,
            bus=bus,
            topic_prefix=settings.bus.topic_prefix,
        )
        summary = await reconciler.run_once(since=since, dry_run=dry_run, progress=progress)
    except (ApiError, ReconcileBusy) as err:
        progress.end()
        print(f"pubrelay reconcile: {err}", file=sys.stderr)
        return EXIT_RECONCILE_FAILED
    except BusError as err:
        progress.end()
        print(f"pubrelay reconcile: the bus failed: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        await store.close()
    progress.end()
    if dry_run:
        print(
            f"{'PUBLICATION':<36} {'CREATED (UTC)':<19}  {'CHANNEL':<20} {'CAMPAIGN':<24} CUSTOMER"
        )
        for pub in summary.missing:
            print(_row(pub))
    print(summary.line())
    return 0 if summary.complete else EXIT_RECONCILE_FAILED
