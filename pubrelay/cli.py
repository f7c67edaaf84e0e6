"""The ``pubrelay`` command.

Settings are loaded once here and passed down; nothing below reads the environment
(handler plugins read their own ``PUBRELAY_<NAME>__*`` section through their context).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientError, ClientSession, ClientTimeout
from pydantic import ValidationError

from bus import create_bus
from bus.types import Bus
from consumer.signature import sign
from handlers.worker.dead_letters import DeadLetter
from handlers.worker.replay import list_dead_letters, replay
from pubrelay.exit_codes import EXIT_CONFIG, EXIT_UNAVAILABLE
from pubrelay.logging import configure_logging
from pubrelay.secrets import resolve_secrets
from pubrelay.settings import Settings, load_settings
from schemas.errors import BusUnavailable, HandlerError, PubrelayError, SkipEvent
from schemas.record import HEADER_SIGNATURE

T = TypeVar("T")


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:  # pragma: no cover
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    with _event_loop_runner() as runner:
        return runner.run(coro)


def _serve(settings: Settings, *, webhook: bool, worker: bool) -> int:
    # The long-running processes load the web app and the consume loop; the other
    # commands (dlq list, replay, send, ...) never import them.
    from pubrelay.runtime import run  # noqa: PLC0415

    return _run_async(run(settings, webhook=webhook, worker=worker))


def cmd_serve(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, webhook=True, worker=True)


def cmd_webhook(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, webhook=True, worker=False)


def cmd_worker(settings: Settings, _: argparse.Namespace) -> int:
    return _serve(settings, webhook=False, worker=True)


def cmd_sign(settings: Settings, args: argparse.Namespace) -> int:
    body = Path(args.file).read_bytes()
    print(sign(resolve_secrets(settings, generate=False)[0], body))
    return 0


async def _send(url: str, body: bytes, signature: str, timeout_s: float) -> int:
    async with ClientSession(timeout=ClientTimeout(total=timeout_s)) as session:
        try:
            async with session.post(
                url,
                data=body,
                headers={"Content-Type": "application/json", HEADER_SIGNATURE: signature},
            ) as response:
                text = await response.text()
        except (ClientError, TimeoutError) as err:
            print(f"pubrelay send: {url}: {err or type(err).__name__}", file=sys.stderr)
            return 1
    print(f"{response.status} {response.reason}")
    if text:
        print(text)
    return 0 if 200 <= response.status < 300 else 1


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    body = Path(args.file).read_bytes()
    signature = sign(resolve_secrets(settings, generate=False)[0], body)
    return asyncio.run(_send(args.url, body, signature, args.timeout))


async def _with_bus(settings: Settings, work: Callable[[Bus], Awaitable[int]]) -> int:
    bus = create_bus(settings.bus, settings.sqlite_bus_path)
    try:
        await bus.start()
    except BusUnavailable as err:
        print(f"pubrelay: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        return await work(bus)
    finally:
        await bus.close()


def _short(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(bus: Bus) -> int:
        letters = await list_dead_letters(
            bus,
            args.handler,
            topic_prefix=settings.bus.topic_prefix,
            group_prefix=settings.worker.group_prefix,
            event_id=args.event_id,
            limit=args.limit,
        )
        print(f"{'EVENT ID':<32} {'TYPE':<32} {'TRIES':>5} {'LAST FAILED (UTC)':<19}  ERROR")
        for letter in letters:
            print(
                f"{_short(letter.event_id, 32):<32} {_short(letter.event_type, 32):<32} "
                f"{letter.attempts or 0:>5} {_when(letter.last_failed_at):<19}  "
                f"{_short(letter.error, 80)}"
            )
        print(f"{len(letters)} dead letter(s) waiting for handler {args.handler!r}")
        return 0

    return _run_async(_with_bus(settings, work))


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    since = datetime.fromisoformat(args.since) if args.since else None
    interactive = sys.stderr.isatty()
    done = 0

    def progress(letter: DeadLetter) -> None:
        nonlocal done
        done += 1
        if interactive:
            bar = "#" * min(done, 30)
            print(f"\r[{bar:<30}] {done} {_short(letter.event_id, 40)}", end="", file=sys.stderr)

    async def work(bus: Bus) -> int:
        summary = await replay(
            bus,
            args.handler,
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
        print(
            f"{verb} {summary.replayed if not summary.dry_run else summary.matched} of "
            f"{summary.read} dead letter(s) for handler {args.handler!r} "
            f"({summary.matched} matched the filters)"
        )
        return 0

    return _run_async(_with_bus(settings, work))


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    # The reconciler (and its API client) load only for this command.
    from pubrelay.reconcile_command import reconcile  # noqa: PLC0415

    since = datetime.fromisoformat(args.since) if args.since else None
    return _run_async(
        _with_bus(settings, lambda bus: reconcile(settings, bus, since=since, dry_run=args.dry_run))
    )


def cmd_preview_email(_: Settings, args: argparse.Namespace) -> int:
    from handlers.builtin.email.preview import format_preview, load_settings, render_preview  # noqa: PLC0415

    raw = Path(args.file).read_bytes()
    try:
        message = render_preview(raw, load_settings())
    except SkipEvent as err:
        print(f"no e-mail would be sent: {err}")
        return 0
    except (HandlerError, ValidationError) as err:
        print(f"pubrelay preview-email: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.raw:
        sys.stdout.buffer.write(message.as_bytes(policy=email.policy.SMTP))
    else:
        print(format_preview(message), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubrelay",
        description="Verified, durable intake of Voucherify webhooks. "
        "Configuration comes from PUBRELAY_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="webhook consumer and worker in one process").set_defaults(
        func=cmd_serve
    )
    commands.add_parser("webhook", help="webhook consumer only").set_defaults(func=cmd_webhook)
    commands.add_parser(
        "worker", help="handlers only (serves /healthz, /readyz, /metrics)"
    ).set_defaults(func=cmd_worker)

    sign_cmd = commands.add_parser("sign", help="print the signature of a body file")
    sign_cmd.add_argument("file", help="the JSON body, signed byte for byte")
    sign_cmd.set_defaults(func=cmd_sign)

    send = commands.add_parser("send", help="sign a body file and POST it")
    send.add_argument("file", help="the JSON body to send")
    send.add_argument(
        "--url", default="http://127.0.0.1:8080/webhooks/voucherify", help="webhook URL"
    )
    send.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")
    send.set_defaults(func=cmd_send)

    replay_cmd = commands.add_parser("replay", help="send dead letters back to their handler")
    replay_cmd.add_argument("--handler", required=True, help="the handler whose DLQ to replay")
    replay_cmd.add_argument("--event-id", help="only this event")
    replay_cmd.add_argument("--since", help="only letters that failed at or after (ISO 8601)")
    replay_cmd.add_argument("--dry-run", action="store_true", help="show, change nothing")
    replay_cmd.set_defaults(func=cmd_replay)

    reconcile_cmd = commands.add_parser(
        "reconcile",
        help="find publications Voucherify lists but whose webhook never arrived, and deliver them",
    )
    reconcile_cmd.add_argument(
        "--since", help="look back to this time (ISO 8601) instead of the last run's watermark"
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
    dlq_list.add_argument("--handler", required=True)
    dlq_list.add_argument("--event-id")
    dlq_list.add_argument("--limit", type=int, default=1000)
    dlq_list.set_defaults(func=cmd_dlq_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log.level, settings.log.format)
        code: int = args.func(settings, args)
    except PubrelayError as err:
        print(f"pubrelay: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as err:  # a missing file, an unwritable data directory...
        where = f": {err.filename}" if err.filename else ""
        print(f"pubrelay: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as err:  # e.g. a malformed --since
        print(f"pubrelay: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
