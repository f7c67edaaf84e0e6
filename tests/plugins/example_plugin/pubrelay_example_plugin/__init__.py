"""An example pubrelay handler plugin: one JSON line per handled publication.

The entry point (group ``pubrelay.handlers``) names :func:`create`; pubrelay passes a
:class:`handlers.types.HandlerContext` with this plugin's settings section
(``PUBRELAY_EXAMPLE__*``), the metrics registry, the data directory and a logger.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from prometheus_client import Counter
from pydantic import BaseModel, Field

from handlers.types import Event, HandlerContext
from schemas.errors import HandlerError

__all__ = ["ExampleHandler", "ExampleSettings", "create"]


class ExampleSettings(BaseModel):
    """``PUBRELAY_EXAMPLE__FILE_NAME``, ``PUBRELAY_EXAMPLE__EVENT_TYPES`` (JSON list)."""

    file_name: str = Field(default="example-plugin.jsonl", pattern=r"^[\w.-]+$")
    event_types: list[str] = Field(default_factory=lambda: ["customer.publication.succeeded"])


class ExampleHandler:
    """Appends ``{"event_id", "customer_id", "channel"}`` per event, once per event id."""

    def __init__(self, context: HandlerContext, settings: ExampleSettings) -> None:
        self.name = context.name
        self.event_types = frozenset(settings.event_types)
        self.path: Path = context.data_dir / settings.file_name
        self._log = context.logger
        self._seen: set[str] = set()
        self._lock = asyncio.Lock()
        self._started = False
        self._written = Counter(
            "pubrelay_example_lines_total",
            "Lines the example plugin wrote",
            ["handler"],
            registry=context.metrics_registry,
        ).labels(self.name)

    async def start(self) -> None:
        if self._started:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    self._seen.add(json.loads(line)["event_id"])
        self._started = True

    async def stop(self) -> None:
        self._started = False

    async def handle(self, event: Event) -> None:
        if not self._started:
            raise HandlerError("the example handler is not started")
        envelope = event.envelope  # a body the model rejects ends in the dead-letter topic
        publication = getattr(envelope.data, "publication", None)
        channel = getattr(publication, "channel", None)
        async with self._lock:
            if event.id in self._seen:
                return  # natural idempotency: the line exists already
            line = json.dumps(
                {"event_id": event.id, "customer_id": event.customer_id, "channel": channel}
            )
            with self.path.open("a") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
            self._seen.add(event.id)
        self._written.inc()
        self._log.info("example_line_written", event_id=event.id)


def create(context: HandlerContext) -> ExampleHandler:
    """The factory the ``example`` entry point names."""
    return ExampleHandler(context, context.settings(ExampleSettings))
