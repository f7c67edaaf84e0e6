"""The ``pubrelay`` command: serve, webhook, sign, send.

Settings are loaded once here and passed down; nothing below reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bus import create_bus
from consumer.app import create_app
from consumer.signature import sign
from pubrelay.logging import configure_logging
from pubrelay.settings import Settings, load_settings
from schemas.errors import BusUnavailable, ConfigError, PubrelayError
from schemas.record import HEADER_SIGNATURE, QUARANTINE_TOPIC

log = structlog.get_logger("pubrelay")

SECRET_FILE = "webhook-secret"  # noqa: S105 - a file name, not a secret
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


class SecretMissing(ConfigError):
    """No webhook secret is configured and none may be generated."""


def resolve_secrets(settings: Settings, *, generate: bool) -> list[str]:
    """The configured secrets, else the one in the data directory (created if allowed)."""
    configured = [s.get_secret_value() for s in settings.webhook.secrets]
    if configured:
        return configured
    path = settings.data_dir / SECRET_FILE
    if path.exists():
        return [path.read_text().strip()]
    if not generate:
        raise SecretMissing(
            f"no webhook secret: set PUBRELAY_WEBHOOK__SECRETS or create {path} "
            "(`pubrelay serve` generates one on first start)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    print(
        f"pubrelay: generated a webhook secret in {path.resolve()} (mode 0600).\n"
        "  Voucherify signs every webhook with your project's webhook secret "
        "(Project Settings > Webhooks).\n"
        "  Put that secret in PUBRELAY_WEBHOOK__SECRETS='[\"<secret>\"]' (several during "
        "rotation), or, to try pubrelay locally,\n"
        f"  sign test requests with the generated one: pubrelay send FILE --url URL",
        file=sys.stderr,
    )
    return [value]


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors; injected everywhere."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _tune_gc() -> None:
    # perf-notes: fewer gen-0 collections and a frozen start-up heap remove the
    # 35-45 ms full collections that dominated p99 under load.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _serve(settings: Settings, *, with_worker: bool) -> int:
    if settings.webhook.allow_unsigned:
        log.warning(
            "signature_checks_disabled",
            message="PUBRELAY_WEBHOOK__ALLOW_UNSIGNED is set: ANYONE can post events",
        )
        secret_list: list[str] = []
    else:
        secret_list = resolve_secrets(settings, generate=True)
    registry = new_registry()
    bus = create_bus(settings.bus, settings.sqlite_bus_path)
    try:
        await bus.start()
        prefix = settings.bus.topic_prefix
        await bus.ensure_topics(
            [prefix + "customer.publication.succeeded", prefix + QUARANTINE_TOPIC]
        )
    except BusUnavailable as err:
        log.error("bus_unavailable_at_start", error=str(err))
        await bus.close()
        return EXIT_UNAVAILABLE
    app = create_app(
        bus=bus,
        http=settings.http,
        webhook=settings.webhook,
        secrets=secret_list,
        topic_prefix=settings.bus.topic_prefix,
        publish_timeout_s=settings.bus.publish_timeout_s,
        registry=registry,
        manage_bus=False,
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.http.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.http.host, settings.http.port, reuse_port=True)
    try:
        await site.start()
    except OSError as err:
        log.error("listen_failed", host=settings.http.host, port=settings.http.port, error=str(err))
        await runner.cleanup()
        await bus.close()
        return EXIT_CONFIG

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "listening",
        url=f"http://{settings.http.host}:{settings.http.port}{settings.webhook.path}",
        bus=settings.bus.kind,
        worker=with_worker,
        handlers=settings.handlers.enabled if with_worker else [],
    )
    _tune_gc()
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()
    await bus.close()
    log.info("stopped")
    return 0


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:  # pragma: no cover
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def cmd_serve(settings: Settings, _: argparse.Namespace) -> int:
    with _event_loop_runner() as runner:
        return runner.run(_serve(settings, with_worker=True))


def cmd_webhook(settings: Settings, _: argparse.Namespace) -> int:
    with _event_loop_runner() as runner:
        return runner.run(_serve(settings, with_worker=False))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pubrelay",
        description="Verified, durable intake of Voucherify webhooks. "
        "Configuration comes from PUBRELAY_* environment variables (see README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="webhook consumer and worker in one process")
    serve.set_defaults(func=cmd_serve)
    webhook = commands.add_parser("webhook", help="webhook consumer only")
    webhook.set_defaults(func=cmd_webhook)

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
    except FileNotFoundError as err:
        print(f"pubrelay: {err.strerror}: {err.filename}", file=sys.stderr)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
