"""``pubrelay events QUERY``: the console's search, in the terminal.

Reads the event index (``pubrelay/console/index.py``) the console's processes write: the events
whose event, delivery or publication id, customer id or e-mail or voucher code is QUERY,
newest first, each with what every handler did last. A table (customer e-mail addresses
masked), or with ``--json`` one JSON document. Exit 1 when nothing matched, 2 when there
is no index (the console is off).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from pubrelay.console.index import EventRow
from pubrelay.console.sqlite_index import SqliteEventIndex
from pubrelay.console_runtime import open_index
from pubrelay.exit_codes import EXIT_CONFIG
from pubrelay.settings import Settings
from pubrelay.text import printable
from schemas.masking import mask_address


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row_json(row: EventRow) -> dict[str, object]:
    f = row.fields
    return {
        "event_id": row.event_id,
        "event_type": row.event_type,
        "received_at": datetime.fromtimestamp(row.received_at, tz=UTC).isoformat(),
        "customer_id": f.customer_id,
        "customer_email": f.customer_email,
        "publication_id": f.publication_id,
        "voucher_code": f.voucher_code,
        "campaign": f.campaign,
        "channel": f.channel,
        "handlers": row.handlers,
    }


async def events(settings: Settings, args: argparse.Namespace) -> int:
    index = open_index(settings)
    if isinstance(index, SqliteEventIndex) and not index.path.exists():
        print(
            f"pubrelay: no event index at {index.path} (the console is off: set "
            "PUBRELAY_CONSOLE__TOKEN, or run `pubrelay serve --console`)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    await index.open()
    try:
        found = await index.search(args.query, limit=args.limit)
    finally:
        await index.close()
    if args.json:
        json.dump({"query": args.query, "events": [_row_json(r) for r in found]}, sys.stdout)
        print()
    elif found:
        print(f"{'received (UTC)':19}  {'event':28}  {'code':18}  {'customer':28}  handlers")
        for row in found:
            f = row.fields
            customer = mask_address(f.customer_email) if f.customer_email else f.customer_id
            done = ", ".join(f"{h}: {o}" for h, o in row.handlers.items()) or "-"
            print(
                printable(
                    f"{_when(row.received_at):19}  {row.event_id:28}  {f.voucher_code:18}  "
                    f"{customer:28}  {done}"
                )
            )
    else:
        print(f"no event matches {args.query!r}", file=sys.stderr)
    return 0 if found else 1
