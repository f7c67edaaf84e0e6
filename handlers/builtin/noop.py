"""The ``noop`` handler: accepts every event and does nothing.

Useful to check a deployment end to end (the worker reads, records and commits) and as
the smallest example of the :class:`handlers.types.Handler` protocol.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from handlers.types import Event, HandlerContext


class NoopSettings(BaseModel):
    """``PUBRELAY_NOOP__EVENT_TYPES='["customer.publication.succeeded"]'`` narrows it."""

    event_types: list[str] = Field(
        default_factory=list,
        description=(
            "empty: the types pubrelay models (`customer.publication.succeeded`, "
            "`publication.succeeded`)"
        ),
    )


class NoopHandler:
    """Counts what it receives; has no effect outside the process."""

    def __init__(self, name: str, event_types: frozenset[str]) -> None:
        self.name = name
        self.event_types = event_types
        self.handled = 0
        self.running = False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

    async def handle(self, event: Event) -> None:
        del event
        self.handled += 1


def create(context: HandlerContext) -> NoopHandler:
    """Entry point ``noop = "handlers.builtin.noop:create"`` in group ``pubrelay.handlers``."""
    settings = context.settings(NoopSettings)
    return NoopHandler(context.name, frozenset(settings.event_types))
