"""The bus as the inspection commands (``dlq list``, ``replay``, ``quarantine``) open it.

They say what they read before anything else (:func:`describe`: the bus URL with any
password masked, and the topic), refuse a handler name nothing knows (listing the known
ones), and never create an embedded bus that does not exist: an empty new file would
answer "0 dead letters" for a data directory that was simply not the right one.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

from bus import create_bus
from bus.types import Bus
from handlers.config_errors import mask_url
from handlers.registry import available
from pubrelay.exit_codes import EXIT_UNAVAILABLE
from pubrelay.settings import Settings
from schemas.errors import BusUnavailable, ConfigError


def bus_url(settings: Settings) -> str:
    """The bus URL as configured, or the embedded default's. The settings refuse
    credentials in it (``SASL_*`` hold them); masked all the same."""
    return mask_url(settings.bus.url or f"sqlite:///{settings.sqlite_bus_path}")


def describe(settings: Settings, topic: str) -> str:
    """The first line of an inspection command: where it reads."""
    where = bus_url(settings)
    if settings.bus.kind == "sqlite":
        where += f" ({settings.sqlite_bus_path.resolve()})"
    return f"bus {where}, topic {topic}"


def known_handlers(settings: Settings) -> list[str]:
    """Every handler name that may have dead letters: installed, enabled or internal."""
    from handlers.reconcile.recorder import RECORDER_NAME  # noqa: PLC0415 - loads aiohttp

    return sorted({*available(), *settings.handlers.enabled, RECORDER_NAME})


def check_known_handler(settings: Settings, name: str) -> str:
    """``name``, or :class:`ConfigError` listing the known handler names."""
    known = known_handlers(settings)
    if name not in known:
        raise ConfigError(f"unknown handler {name!r}; known handlers: {', '.join(known)}")
    return name


def check_bus_exists(settings: Settings) -> None:
    """:class:`ConfigError` when the embedded bus file is not there (never create it)."""
    if settings.bus.kind != "sqlite":
        return
    path = settings.sqlite_bus_path
    if not path.is_file():
        raise ConfigError(
            f"no embedded bus at {path.resolve()}: nothing was received with this data "
            "directory; run the command where `pubrelay serve` runs, or set "
            "PUBRELAY_DATA_DIR (or PUBRELAY_BUS__URL) as it has them"
        )


async def with_bus(settings: Settings, work: Callable[[Bus], Awaitable[int]]) -> int:
    """Run ``work`` on the started bus; exit code 3 when it cannot be reached."""
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


async def with_existing_bus(settings: Settings, work: Callable[[Bus], Awaitable[int]]) -> int:
    """:func:`with_bus`, for a bus that must already exist (the commands that read it)."""
    check_bus_exists(settings)
    return await with_bus(settings, work)
