"""The console's part of a long-running process: its token, its index and its app.

:func:`open_console` yields None when the console is off (no token). Otherwise it opens
the event index, runs its recorder (the intake's and the worker's observer) until the
block ends, and builds the console app that ``consumer/app.py`` mounts at ``/console/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.types import Bus
from handlers.builtin.email.outbox import OUTBOX_DIR
from pubrelay.console.app import create_console_app
from pubrelay.console.index import EventIndex, create_index
from pubrelay.console.recorder import IndexRecorder
from pubrelay.console_token import resolve_console_token
from pubrelay.settings import Settings


@dataclass(frozen=True, slots=True)
class ConsoleParts:
    recorder: IndexRecorder
    app: web.Application


def open_index(settings: Settings) -> EventIndex:
    """The index beside the ledger (not opened yet)."""
    return create_index(settings.console, settings.ledger, settings.data_dir)


@asynccontextmanager
async def open_console(
    settings: Settings, bus: Bus, registry: CollectorRegistry, *, generate_token: bool
) -> AsyncIterator[ConsoleParts | None]:
    token = resolve_console_token(settings, generate=generate_token)
    if token is None:
        yield None
        return
    index = open_index(settings)
    await index.open()
    try:
        recorder = IndexRecorder(index, queue_max=settings.console.index_queue_max)
        async with recorder.running():
            app = create_console_app(
                token=token,
                session_ttl_s=settings.console.session_ttl_s,
                bus=bus,
                index=index,
                recorder=recorder,
                handlers=settings.handlers.enabled,
                topic_prefix=settings.bus.topic_prefix,
                group_prefix=settings.worker.group_prefix,
                outbox=settings.data_dir / OUTBOX_DIR,
                registry=registry,
                # A Kafka group join takes seconds (the CLI's `dlq list` allows 10).
                read_timeout_s=10.0 if settings.bus.kind == "kafka" else 3.0,
            )
            yield ConsoleParts(recorder, app)
    finally:
        await index.close()
