"""``pubrelay dlq list`` and ``pubrelay replay`` told to a person (or, with ``--json``, a
program): the bus and topic first, a table or JSON, ``N of M`` when ``--limit`` cut the
list, and the event ids a replay sends (or, with ``--dry-run``, would send)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from bus.types import Bus
from handlers.worker.dead_letters import DeadLetter
from handlers.worker.replay import replay, scan_dead_letters
from pubrelay.bus_access import bus_url, check_known_handler, describe, with_existing_bus
from pubrelay.settings import Settings
from pubrelay.text import for_terminal
from schemas.topics import dlq_topic


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def letter_json(letter: DeadLetter) -> dict[str, object]:
    return {
        "event_id": letter.event_id,
        "event_type": letter.event_type,
        "attempts": letter.attempts,
        "first_failed_at": _iso(letter.first_failed_at),
        "last_failed_at": _iso(letter.last_failed_at),
        "error": letter.error,
        "error_type": letter.error_type,
        "source_topic": letter.source_topic,
        "partition": letter.message.partition,
        "offset": letter.message.offset,
    }


def _print_table(letters: list[DeadLetter], *, full: bool) -> None:
    print(f"{'EVENT ID':<32} {'TYPE':<32} {'TRIES':>5} {'LAST FAILED (UTC)':<19}  ERROR")
    for letter in letters:
        row = (
            f"{for_terminal(letter.event_id, 32):<32} {for_terminal(letter.event_type, 32):<32} "
            f"{letter.attempts or 0:>5} {when(letter.last_failed_at):<19}  "
        )
        if not full:
            print(row + for_terminal(letter.error, 80))
            continue
        print(row + for_terminal(letter.error_type))
        for line in (letter.error or "-").splitlines() or ["-"]:
            print(f"    {for_terminal(line)}")


async def dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    handler = check_known_handler(settings, args.handler)
    topic = dlq_topic(settings.bus.topic_prefix, handler)

    async def work(bus: Bus) -> int:
        shown, total = await scan_dead_letters(
            bus,
            handler,
            keep=args.limit,
            topic_prefix=settings.bus.topic_prefix,
            group_prefix=settings.worker.group_prefix,
            event_id=args.event_id,
        )
        if args.json:
            document = {
                "bus": bus_url(settings),
                "topic": topic,
                "handler": handler,
                "total": total,
                "shown": len(shown),
                "dead_letters": [letter_json(letter) for letter in shown],
            }
            print(json.dumps(document, indent=2))
            return 0
        _print_table(shown, full=args.full)
        count = f"{len(shown)} of {total}" if len(shown) < total else f"{total}"
        more = f" (--limit {args.limit}: raise it to see the rest)" if len(shown) < total else ""
        print(f"{count} dead letter(s) waiting for handler {handler!r}{more}")
        return 0

    print(describe(settings, topic), file=sys.stderr if args.json else sys.stdout)
    return await with_existing_bus(settings, work)


async def replay_command(settings: Settings, args: argparse.Namespace) -> int:
    handler = check_known_handler(settings, args.handler)
    since: datetime | None = args.since  # parsed by the command line (cli.iso_time)
    interactive = sys.stderr.isatty()
    done = 0

    def progress(letter: DeadLetter) -> None:
        nonlocal done
        done += 1
        if interactive:
            bar = "#" * min(done, 30)
            print(
                f"\r[{bar:<30}] {done} {for_terminal(letter.event_id, 40)}", end="", file=sys.stderr
            )

    async def work(bus: Bus) -> int:
        summary = await replay(
            bus,
            handler,
            topic_prefix=settings.bus.topic_prefix,
            group_prefix=settings.worker.group_prefix,
            event_id=args.event_id,
            since=since,
            dry_run=args.dry_run,
            progress=progress,
        )
        if interactive and done:
            print(file=sys.stderr)
        verb = "would replay" if summary.dry_run else "replayed"
        for event_id in summary.event_ids:
            print(f"{verb} {for_terminal(event_id)}")
        print(
            f"{verb} {summary.replayed if not summary.dry_run else summary.matched} of "
            f"{summary.read} dead letter(s) for handler {handler!r} "
            f"({summary.matched} matched the filters)"
        )
        if summary.incomplete:
            print(
                "the replay ended before the last dead letter waiting at its start, in "
                f"{', '.join(summary.incomplete)}: run it again (what was sent is committed)",
                file=sys.stderr,
            )
            return 1
        return 0

    print(describe(settings, dlq_topic(settings.bus.topic_prefix, handler)))
    return await with_existing_bus(settings, work)
