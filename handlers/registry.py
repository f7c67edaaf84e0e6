"""Handler discovery: entry points in group ``pubrelay.handlers``, loaded by name.

Only the enabled names are imported, so a broken plugin that is not enabled cannot stop
start-up; an enabled one that is unknown or broken does, with a message naming it and
listing what is installed.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from handlers.types import (
    ENTRY_POINT_GROUP,
    Handler,
    HandlerContext,
    HandlerFactory,
    KeyLedger,
    check_handler_name,
)
from schemas.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("pubrelay.handlers.registry")


def available() -> dict[str, EntryPoint]:
    """Installed handler plugins by name (the entry-point name is the handler name)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _listing(found: Mapping[str, EntryPoint]) -> str:
    return ", ".join(sorted(found)) or "none installed"


def load_factory(name: str, found: Mapping[str, EntryPoint] | None = None) -> HandlerFactory:
    """Import the factory of plugin ``name``; raise :class:`PluginError` when impossible."""
    found = available() if found is None else found
    ep = found.get(name)
    if ep is None:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PluginError(
            f"PUBRELAY_HANDLERS__ENABLED: unknown handler plugin {name!r}; {hint}"
            f"available: {_listing(found)} "
            f"(a plugin registers an entry point in group {ENTRY_POINT_GROUP!r})"
        )
    try:
        factory = ep.load()
    except Exception as err:  # any import-time failure of third-party code
        raise PluginError(
            f"handler plugin {name!r} ({ep.value}) cannot be loaded: "
            f"{type(err).__name__}: {err}; available: {_listing(found)}"
        ) from err
    if not callable(factory):
        raise PluginError(f"handler plugin {name!r} ({ep.value}) is not a callable factory")
    return factory  # type: ignore[no-any-return]  # entry points are untyped by nature


def create_handler(name: str, context: HandlerContext, factory: HandlerFactory) -> Handler:
    """Call ``factory`` and check that what it built honours the :class:`Handler` protocol."""
    try:
        handler = factory(context)
    except (ConfigError, PluginError):
        raise
    except Exception as err:
        raise PluginError(
            f"handler plugin {name!r} failed to build: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(handler, Handler):
        raise PluginError(
            f"handler plugin {name!r} built {type(handler).__name__}, which lacks the Handler "
            "protocol (name, event_types, start, stop, handle)"
        )
    if handler.name != name:
        raise PluginError(
            f"handler plugin {name!r} built a handler named {handler.name!r}; the names must match"
        )
    if not isinstance(handler.event_types, frozenset):
        raise PluginError(f"handler plugin {name!r}: event_types must be a frozenset")
    plain = [m for m in ("start", "stop", "handle") if not _is_async(getattr(handler, m))]
    if plain:
        raise PluginError(
            f"handler plugin {name!r}: {', '.join(plain)} must be `async def` (the worker "
            "awaits them; a plain def would fail every event)"
        )
    return handler


def _is_async(method: object) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(method) or inspect.iscoroutinefunction(
        getattr(method, "__call__", None)  # noqa: B004 - a callable object's own __call__
    )


def build_handlers(
    enabled: Sequence[str],
    *,
    data_dir: Path,
    metrics_registry: CollectorRegistry,
    topic_prefix: str,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ledger: KeyLedger | None = None,
    max_attempts: int | None = None,
) -> list[Handler]:
    """Load and build the enabled handlers, in the configured order.

    ``env`` defaults to the process environment (each plugin reads its own
    ``PUBRELAY_<NAME>__*``); ``overrides`` maps a handler name to settings taking
    precedence over the environment (tests, embedding).
    """
    seen: set[str] = set()
    for name in enabled:
        check_handler_name(name)
        if name in seen:
            raise ConfigError(f"PUBRELAY_HANDLERS__ENABLED: handler {name!r} is listed twice")
        seen.add(name)
    found = available()
    factories = {name: load_factory(name, found) for name in enabled}
    handlers: list[Handler] = []
    for name, factory in factories.items():
        context = HandlerContext(
            name=name,
            data_dir=data_dir,
            metrics_registry=metrics_registry,
            logger=structlog.get_logger("pubrelay.handlers").bind(handler=name),
            topic_prefix=topic_prefix,
            env=env,
            overrides=(overrides or {}).get(name, {}),
            ledger=ledger,
            max_attempts=max_attempts,
        )
        handlers.append(create_handler(name, context, factory))
        log.info("handler_loaded", handler=name, plugin=found[name].value)
    return handlers
