"""`python -m tests.chaos [--short] [--only NAME ...]`: run the fault scenarios, print one table.

Every scenario starts real processes on 127.0.0.1 (a Tansu broker of its own, `pubrelay
webhook` and `pubrelay worker`, aiosmtpd, the fake HubSpot, the forward receiver; one
redis-server for the run's ledger), injects its fault, and counts what a user would see.
The exit status is 1 when any row has a repeated or lost event or a scenario failed.
Logs of every process stay in the printed work directory when a row is not clean.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pubrelay.logging import configure_logging
from tests.chaos.backlog import backlog_poison
from tests.chaos.dependencies import hubspot_429, smtp_down
from tests.chaos.intake import intake_hostile
from tests.chaos.processes import broker_kill, rebalance, worker_kill
from tests.chaos.report import Row, table
from tests.chaos.sizes import FULL, SHORT, Sizes
from tests.chaos.stack import Run
from tests.fixtures.process import free_port
from tests.fixtures.redis import start_redis, stop_redis

Scenario = Callable[[Run, Sizes], Row]

SCENARIOS: Final[dict[str, Scenario]] = {
    "broker-kill": broker_kill,
    "worker-kill": worker_kill,
    "rebalance": rebalance,
    "smtp-down": smtp_down,
    "hubspot-429": hubspot_429,
    "backlog": backlog_poison,
    "intake-hostile": intake_hostile,
}


def one_line(err: BaseException) -> str:
    """An error for a table cell: its first line and, when longer, its last one."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return f"{type(err).__name__}: {text}"[:300]


def run_one(name: str, scenario: Scenario, run: Run, sizes: Sizes) -> Row:
    started = time.monotonic()
    print(f"--- {name} ...", file=sys.stderr, flush=True)
    try:
        row = scenario(run, sizes)
    except Exception as err:  # a scenario that breaks is a row, not the end of the run
        traceback.print_exc(file=sys.stderr)
        row = Row(name, error=one_line(err))
    row.seconds = time.monotonic() - started
    print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), metavar="NAME")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    configure_logging("warning", "console")  # the harness's own bus clients: quiet
    sizes = SHORT if args.short else FULL
    names = args.only or list(SCENARIOS)
    workdir = Path(tempfile.mkdtemp(prefix="pubrelay-chaos-"))
    print(f"work directory: {workdir}", file=sys.stderr, flush=True)
    redis = start_redis(workdir, port := free_port())
    try:
        run = Run(workdir=workdir, redis_url=f"redis://127.0.0.1:{port}/0")
        rows = [run_one(name, SCENARIOS[name], run, sizes) for name in names]
    finally:
        stop_redis(redis)
    print(table(rows))
    clean = all(row.ok for row in rows)
    if clean and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
