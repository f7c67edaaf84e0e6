"""The recorder: an internal handler that remembers every publication id the worker sees.

The worker runs it like any handler (its own consumer group ``<group prefix>reconcile``,
retries, the ledger) whenever a Voucherify key pair is configured. It reads
``customer.publication.succeeded`` and ``publication.succeeded`` and records
``data.publication.id`` in the :mod:`~handlers.reconcile.store`, with its origin: a record
injected by reconciliation (header ``origin``) passes through it too, so a publication
is reconciled once. A store failure is :class:`~schemas.errors.RetryLater` for the
worker; an event naming no publication is skipped.
"""

from __future__ import annotations

from typing import Final

from handlers.reconcile.record import publication_of
from handlers.reconcile.store import Origin, Received, ReceivedStore
from handlers.types import Event
from schemas.errors import RetryLater, SkipEvent
from schemas.events import CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED
from schemas.record import HEADER_ORIGIN, ORIGIN_RECONCILIATION

RECORDER_NAME: Final = "reconcile"


class ReceivedRecorder:
    """The :class:`handlers.types.Handler` that fills the received-publication store."""

    name: str = RECORDER_NAME
    event_types: frozenset[str] = frozenset({CUSTOMER_PUBLICATION_SUCCEEDED, PUBLICATION_SUCCEEDED})

    def __init__(self, store: ReceivedStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, event: Event) -> None:
        found = publication_of(event.raw)
        if found is None:
            raise SkipEvent("the event names no publication")
        origin: Origin = (
            "reconciliation" if event.header(HEADER_ORIGIN) == ORIGIN_RECONCILIATION else "webhook"
        )
        publication_id, created_at = found
        try:
            await self.store.record([Received(publication_id, created_at, origin)])
        except Exception as err:  # SQLite's or Redis's own errors: the store is unavailable
            raise RetryLater(
                f"the received-publication store failed: {type(err).__name__}"
            ) from err
