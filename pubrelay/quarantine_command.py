"""``pubrelay quarantine list`` and ``pubrelay quarantine release`` told to a person.

``list``: the bus and topic first, then each record waiting (reason, event id, received
at, size). ``release``: the records it sent on to their topic (or, with ``--dry-run``,
would), and every chosen record that still fails routing with its reason; exit 1 when
one was held back, so a script notices.
"""

from __future__ import annotations

import argparse
import json
import sys

from bus.types import Bus
from consumer.metrics import QUARANTINE_REASONS
from consumer.quarantine import QuarantinedRecord, Selection, list_quarantined, release
from pubrelay.bus_access import bus_url, describe, with_existing_bus
from pubrelay.dead_letter_commands import when
from pubrelay.exit_codes import EXIT_CONFIG
from pubrelay.settings import Settings
from pubrelay.text import for_terminal
from schemas.topics import quarantine_topic


def _record_json(record: QuarantinedRecord) -> dict[str, object]:
    return {
        "reason": record.reason,
        "detail": record.detail,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "received_at": record.received_at.isoformat() if record.received_at else None,
        "size_bytes": record.size_bytes,
        "partition": record.message.partition,
        "offset": record.message.offset,
    }


def _selection_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the records chosen on the command line, if anything."""
    unknown = [reason for reason in args.reason or () if reason not in QUARANTINE_REASONS]
    if unknown:
        return (
            f"--reason {for_terminal(unknown[0])}: not a quarantine reason "
            f"(one of {', '.join(QUARANTINE_REASONS)})"
        )
    if getattr(args, "all", False) and (args.event_id or args.reason):
        return "--all chooses every record waiting: leave out --event-id and --reason, or --all"
    return None


def _refused(command: str, problem: str) -> int:
    print(f"pubrelay quarantine {command}: {problem}", file=sys.stderr)
    return EXIT_CONFIG


async def quarantine_list(settings: Settings, args: argparse.Namespace) -> int:
    if problem := _selection_problem(args):
        return _refused("list", problem)
    topic = quarantine_topic(settings.bus.topic_prefix)
    selection = Selection(event_ids=args.event_id or (), reasons=args.reason or ())

    async def work(bus: Bus) -> int:
        shown, total = await list_quarantined(
            bus,
            topic_prefix=settings.bus.topic_prefix,
            group_prefix=settings.worker.group_prefix,
            selection=selection,
            keep=args.limit,
        )
        if args.json:
            document = {
                "bus": bus_url(settings),
                "topic": topic,
                "total": total,
                "shown": len(shown),
                "records": [_record_json(r) for r in shown],
            }
            print(json.dumps(document, indent=2))
            return 0
        print(f"{'REASON':<18} {'EVENT ID':<32} {'RECEIVED AT (UTC)':<19} {'BYTES':>8}  DETAIL")
        for record in shown:
            reason = for_terminal(record.reason, 18)
            event_id = for_terminal(record.event_id or "-", 32)
            detail = for_terminal(record.detail, None if args.full else 60)
            print(
                f"{reason:<18} {event_id:<32} {when(record.received_at):<19} "
                f"{record.size_bytes:>8}  {detail}"
            )
        count = f"{len(shown)} of {total}" if len(shown) < total else total
        print(f"{count} quarantined record(s) waiting")
        return 0

    print(describe(settings, topic), file=sys.stderr if args.json else sys.stdout)
    return await with_existing_bus(settings, work)


async def quarantine_release(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.event_id or args.reason or args.all):
        return _refused(
            "release", "choose what to release: --event-id ID, --reason REASON, or --all"
        )
    if problem := _selection_problem(args):
        return _refused("release", problem)
    selection = Selection(event_ids=args.event_id or (), reasons=args.reason or ())

    async def work(bus: Bus) -> int:
        summary = await release(
            bus,
            selection,
            topic_prefix=settings.bus.topic_prefix,
            group_prefix=settings.worker.group_prefix,
            max_json_depth=settings.webhook.max_json_depth,
            max_event_age_s=settings.webhook.max_event_age_s,
            dry_run=args.dry_run,
        )
        verb = "would release" if summary.dry_run else "released"
        for record in summary.released:
            print(
                f"{verb} {for_terminal(record.event_id)} ({for_terminal(record.event_type)}, "
                f"was {for_terminal(record.reason)})"
            )
        for held in summary.held:
            print(
                f"still quarantined {for_terminal(held.record.event_id or '-')}: "
                f"{for_terminal(held.reason)}: {for_terminal(held.detail)}"
            )
        seen = {r.event_id for r in summary.released} | {h.record.event_id for h in summary.held}
        missing = [event_id for event_id in args.event_id or () if event_id not in seen]
        for event_id in missing:
            print(f"not waiting in quarantine: {for_terminal(event_id)}")
        print(
            f"{verb} {len(summary.released)}, still quarantined {len(summary.held)}, "
            f"of {summary.read} record(s) waiting"
        )
        return 1 if summary.held or missing else 0

    print(describe(settings, quarantine_topic(settings.bus.topic_prefix)))
    return await with_existing_bus(settings, work)
