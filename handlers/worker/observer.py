"""What the worker tells an observer (the console's event index) about each attempt.

:class:`~handlers.worker.attempts.EventProcessor` calls :meth:`AttemptObserver.attempted`
once per outcome of a record: done, skipped (with the reason), duplicate, retrying (with
the error) or dead-lettered (with the error). A plain method call that must neither block
nor raise: the console's recorder appends to a bounded queue and writes in batches.
"""

from __future__ import annotations

from typing import Literal, NotRequired, Protocol, TypedDict, Unpack

from bus.types import Message

Outcome = Literal["done", "skipped", "duplicate", "retrying", "dead_lettered"]


class AttemptFacts(TypedDict):
    """The keyword arguments of :meth:`AttemptObserver.attempted`: the event id (``None``
    when the record has none), the outcome, the attempt (counted from 1) and the reason or
    error when there is one (``detail``)."""

    event_id: str | None
    outcome: Outcome
    attempt: int
    detail: NotRequired[str | None]


class AttemptObserver(Protocol):
    def attempted(self, handler: str, message: Message, **facts: Unpack[AttemptFacts]) -> None:
        """One outcome of ``handler`` for the record ``message``."""
        ...


class NoObserver:
    """Observes nothing (the default)."""

    # The facts spelled out: no keyword dict is built per record on the worker's path.
    def attempted(
        self,
        handler: str,
        message: Message,
        *,
        event_id: str | None,
        outcome: Outcome,
        attempt: int,
        detail: str | None = None,
    ) -> None:
        return None
