"""The ``pubrelay`` command.

Settings are loaded once here and passed down; nothing below reads the environment
(handler plugins read their own ``PUBRELAY_<NAME>__*`` section through their context).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sqlite3
import sys
from collections.abc import Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from consumer.signature import sign
from pubrelay import bus_access, dead_letter_commands, quarantine_command, send_command
from pubrelay.exit_codes import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
)
from pubrelay.logging import configure_logging, flush_log_lines
from pubrelay.secrets import resolve_secrets
from pubrelay.settings import Settings, load_settings
from schemas.errors import PubrelayError

T = TypeVar("T")


def positive_int(value: str) -> int:
    """``--limit``: a whole number of at least 1 (0 showed nothing, -1 everything)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return number


def iso_time(value: str) -> datetime:
    """``--since``: an ISO 8601 time, refused with an example before anything runs."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 time; e.g. 2026-12-01T08:00:00+00:00 or 2026-12-01"
        ) from None


def event_loop_runner() -> asyncio.Runner:
    """The runner every command runs in: uvloop's event loop where it is installed (a
    dependency on Linux and macOS), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:  # pragma: no cover
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        with event_loop_runner() as runner:
            return runner.run(coro)
    finally:
        flush_log_lines()  # the loop's last lines, before any error printed after them


def _serve(
    settings: Settings, *, webhook: bool, worker: bool, console: bool = False, outbox: bool = False
) -> int:
    # The long-running processes load the web app and the consume loop; the other
    # commands (dlq list, replay, send, ...) never import them.
    from pubrelay.runtime import run  # noqa: PLC0415

    env = None
    if outbox:
        from pubrelay.outbox_run import with_outbox_defaults  # noqa: PLC0415

        settings, env = with_outbox_defaults(settings)
    return _run_async(run(settings, webhook=webhook, worker=worker, console=console, env=env))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return _serve(settings, webhook=True, worker=True, console=args.console, outbox=args.outbox)


def cmd_webhook(settings: Settings, args: argparse.Namespace) -> int:
    return _serve(settings, webhook=True, worker=False, console=args.console)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    return _serve(settings, webhook=False, worker=True, console=args.console, outbox=args.outbox)


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    # The event index loads only for this command.
    from pubrelay.events_command import events  # noqa: PLC0415

    return _run_async(events(settings, args))


def cmd_sign(settings: Settings, args: argparse.Namespace) -> int:
    body = Path(args.file).read_bytes()
    print(sign(resolve_secrets(settings, generate=False)[0], body))
    return 0


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(send_command.send(settings, args))


def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    return _run_async(dead_letter_commands.dlq_list(settings, args))


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    return _run_async(dead_letter_commands.replay_command(settings, args))


def cmd_quarantine_list(settings: Settings, args: argparse.Namespace) -> int:
    return _run_async(quarantine_command.quarantine_list(settings, args))


def cmd_quarantine_release(settings: Settings, args: argparse.Namespace) -> int:
    return _run_async(quarantine_command.quarantine_release(settings, args))


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    # The reconciler (and its API client) load only for this command.
    from pubrelay.reconcile_command import reconcile  # noqa: PLC0415

    since: datetime | None = args.since
    return _run_async(
        bus_access.with_bus(
            settings, lambda bus: reconcile(settings, bus, since=since, dry_run=args.dry_run)
        )
    )


def cmd_preview_email(_: Settings, args: argparse.Namespace) -> int:
    # The e-mail composer (templates, Jinja) loads only for this command.
    from pubrelay.preview_command import preview_email  # noqa: PLC0415

    return preview_email(args)


def _add_quarantine_parser(commands: Any) -> None:
    quarantine = commands.add_parser("quarantine", help="inspect and release quarantined events")
    q_commands = quarantine.add_subparsers(dest="q_command", required=True, metavar="COMMAND")
    q_list = q_commands.add_parser("list", help="quarantined records waiting (not released)")
    q_release = q_commands.add_parser(
        "release", help="route chosen quarantined records again and send on those that pass"
    )
    for sub in (q_list, q_release):
        sub.add_argument("--event-id", action="append", help="only this event (repeatable)")
        sub.add_argument(
            "--reason", action="append", help="only this reason, e.g. stale (repeatable)"
        )
    q_list.add_argument(
        "--limit", type=positive_int, default=1000, help="show at most this many (default 1000)"
    )
    q_list.add_argument("--full", action="store_true", help="the whole detail text")
    q_list.add_argument("--json", action="store_true", help="one JSON document on stdout")
    q_list.set_defaults(func=cmd_quarantine_list)
    q_release.add_argument("--all", action="store_true", help="every record waiting")
    q_release.add_argument(
        "--dry-run", action="store_true", help="list what it would release, change nothing"
    )
    q_release.set_defaults(func=cmd_quarantine_release)


def _add_process_parsers(commands: Any) -> None:
    """``serve``, ``webhook``, ``worker`` (with ``--console``), and ``events``."""
    serve = commands.add_parser("serve", help="webhook consumer and worker in one process")
    serve.set_defaults(func=cmd_serve)
    webhook = commands.add_parser("webhook", help="webhook consumer only")
    webhook.set_defaults(func=cmd_webhook)
    worker = commands.add_parser(
        "worker", help="handlers only (serves /healthz, /readyz, /metrics)"
    )
    worker.set_defaults(func=cmd_worker)
    for process in (serve, webhook, worker):
        process.add_argument(
            "--console",
            action="store_true",
            help="serve the console at /console/; without PUBRELAY_CONSOLE__TOKEN, with a "
            "token generated into <data dir>/console-token (make run)",
        )
    for process in (serve, worker):
        process.add_argument(
            "--outbox",
            action="store_true",
            help="where not configured: run the email handler, write its e-mails to "
            "<data dir>/outbox/ instead of sending them, placeholder sender (make run)",
        )

    events_cmd = commands.add_parser(
        "events",
        help="search the console's event index: event, delivery or publication id, "
        "customer id or e-mail, voucher code",
    )
    events_cmd.add_argument("query", help="the whole value searched for (case-insensitive)")
    events_cmd.add_argument(
        "--limit", type=positive_int, default=50, help="at most this many (default 50)"
    )
    events_cmd.add_argument("--json", action="store_true", help="one JSON document on stdout")
    events_cmd.set_defaults(func=cmd_events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubrelay",
        description="Verified, durable intake of Voucherify webhooks. "
        "Configuration comes from PUBRELAY_* environment variables (see README).",
    )
    parser.add_argument(
        "--version", action="version", version=f"pubrelay {_version()}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = commands.add_parser(
        "config",
        help="print the effective configuration: each value (secrets masked), where it came "
        "from, the enabled handlers' settings",
    )
    config.add_argument(
        "--check",
        action="store_true",
        help="print only the problems; exit 2 if there is any (for CI and deploy scripts)",
    )

    _add_process_parsers(commands)

    sign_cmd = commands.add_parser("sign", help="print the signature of a body file")
    sign_cmd.add_argument("file", help="the JSON body, signed byte for byte")
    sign_cmd.set_defaults(func=cmd_sign)

    send = commands.add_parser(
        "send", help="sign a body file (or a fresh built-in example) and POST it"
    )
    send.add_argument("file", nargs="?", help="the JSON body to send")
    send.add_argument(
        "--example",
        nargs="?",
        const=send_command.DEFAULT_EXAMPLE,
        metavar="NAME",
        help="send a fresh copy of a built-in sample, with new ids "
        f"(one of: {', '.join(send_command.example_names())}; "
        f"default {send_command.DEFAULT_EXAMPLE})",
    )
    send.add_argument(
        "--url",
        help="webhook URL (default: this configuration's http://HOST:PORT/PATH "
        "from PUBRELAY_HTTP__HOST, PUBRELAY_HTTP__PORT, PUBRELAY_WEBHOOK__PATH)",
    )
    send.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")
    send.add_argument(
        "--allow-quarantined",
        action="store_true",
        help="exit 0 for any 2xx answer (default: only for 'accepted')",
    )
    send.set_defaults(func=cmd_send)

    replay_cmd = commands.add_parser("replay", help="send dead letters back to their handler")
    replay_cmd.add_argument("--handler", required=True, help="the handler whose DLQ to replay")
    replay_cmd.add_argument("--event-id", help="only this event")
    replay_cmd.add_argument(
        "--since", type=iso_time, help="only letters that failed at or after (ISO 8601)"
    )
    replay_cmd.add_argument(
        "--dry-run", action="store_true", help="list the event ids it would send, change nothing"
    )
    replay_cmd.set_defaults(func=cmd_replay)

    reconcile_cmd = commands.add_parser(
        "reconcile",
        help="find publications Voucherify lists but whose webhook never arrived, and deliver them",
    )
    reconcile_cmd.add_argument(
        "--since",
        type=iso_time,
        help="look back to this time (ISO 8601) instead of the last run's watermark",
    )
    reconcile_cmd.add_argument(
        "--dry-run", action="store_true", help="list the missing publications, inject nothing"
    )
    reconcile_cmd.set_defaults(func=cmd_reconcile)

    preview = commands.add_parser(
        "preview-email", help="print the e-mail the email handler would send for an event"
    )
    preview.add_argument("file", help="a webhook body (JSON envelope)")
    preview.add_argument("--raw", action="store_true", help="the message as sent (RFC 5322)")
    preview.set_defaults(func=cmd_preview_email)

    dlq = commands.add_parser("dlq", help="inspect dead-letter topics")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    dlq_list = dlq_commands.add_parser("list", help="dead letters waiting for replay")
    dlq_list.add_argument("--handler", required=True, help="the handler whose dead letters")
    dlq_list.add_argument("--event-id", help="only this event")
    dlq_list.add_argument(
        "--limit", type=positive_int, default=1000, help="show at most this many (default 1000)"
    )
    dlq_list.add_argument("--full", action="store_true", help="the whole error text")
    dlq_list.add_argument("--json", action="store_true", help="one JSON document on stdout")
    dlq_list.set_defaults(func=cmd_dlq_list)

    _add_quarantine_parser(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("pubrelay")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly. Python would flush stdout again at
        # exit and fail on the same pipe, so stdout goes to /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        # Ctrl-C: what a replay or a release sent is committed (they commit as they go).
        print("pubrelay: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that a full disk, a quota or a file-size limit cause: not the settings'
fault, so exit 3, not 2."""


def _data_dir_setting(settings: Settings | None, err: OSError) -> str:
    """For an error on the data directory (or a file in it) that is not a full disk, the
    setting that chose it: the directory may be a file, read-only, or another user's."""
    if settings is None or err.errno in _NO_ROOM or not err.filename:
        return ""
    failed, data_dir = Path(os.fsdecode(err.filename)).absolute(), settings.data_dir.absolute()
    if failed != data_dir and data_dir not in failed.parents:
        return ""
    return (
        f" (the data directory, PUBRELAY_DATA_DIR={settings.data_dir}: it must be a "
        "directory this process can create and write, e.g. PUBRELAY_DATA_DIR=/var/lib/pubrelay)"
    )


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        # It loads the settings itself, to report every problem rather than the first.
        from pubrelay.config_command import run_config  # noqa: PLC0415

        return run_config(check=args.check)
    settings: Settings | None = None
    try:
        settings = load_settings()
        configure_logging(settings.log.level, settings.log.format)
        code: int = args.func(settings, args)
    except PubrelayError as err:
        for line in str(err).splitlines():  # a configuration error: one line per variable
            print(f"pubrelay: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        raise  # the output's reader left: main ends quietly
    except OSError as err:  # a missing file, an unwritable data directory, a full disk...
        where = f": {err.filename}" if err.filename else ""
        setting = _data_dir_setting(settings, err)
        print(f"pubrelay: {err.strerror or err}{where}{setting}", file=sys.stderr)
        return EXIT_UNAVAILABLE if err.errno in _NO_ROOM else EXIT_CONFIG
    except sqlite3.Error as err:  # a data file that cannot be opened or written (a full disk)
        print(f"pubrelay: a data file failed: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as err:  # e.g. a malformed --since
        print(f"pubrelay: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # main answers Ctrl-C itself (exit 130)
