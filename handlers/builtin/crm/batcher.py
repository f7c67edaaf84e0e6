"""Batching of the ``crm`` handler: contacts collected within a window, sent as one request,
and each event's caller given its contact's outcome.

:meth:`Batcher.submit` adds the contact to the open batch and waits for that contact's
own result. A batch is sent when it holds ``BATCH_SIZE`` contacts or ``BATCH_WINDOW_S``
after its first one. HubSpot rejects a batch naming the same id twice, so two events for
one e-mail address in one batch are merged (property by property, the later event wins)
and both calls get the merged request's result. The worker already serialises events of
one customer, so a merge only joins different customers sharing an address.

A contact whose failure asks for isolation (a refusal that named nobody, see
:mod:`handlers.builtin.crm.hubspot`) is sent alone on its event's next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from structlog.typing import FilteringBoundLogger

from handlers.builtin.crm.answers import Contacts, Failure, Outcomes
from handlers.builtin.crm.metrics import CrmMetrics

__all__ = ["Batcher"]

_ISOLATE_MAX: Final = 10_000


@dataclass(slots=True)
class _Contact:
    """One upsert input: the merged properties of every event for this address."""

    email: str
    properties: dict[str, str]
    event_ids: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    contacts: dict[str, _Contact] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Collects contacts into batches and hands each batch to ``send`` in a task of its own."""

    def __init__(
        self,
        send: Callable[[Contacts], Awaitable[Outcomes]],
        *,
        window_s: float,
        size: int,
        logger: FilteringBoundLogger,
        metrics: CrmMetrics,
    ) -> None:
        self._send_batch = send
        self._window_s = window_s
        self._size = size
        self._log = logger
        self._m = metrics
        self._batch: _Batch | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._isolate: set[str] = set()

    async def submit(self, event_id: str, email: str, properties: dict[str, str]) -> None:
        """Upsert the contact of ``event_id``; raises what its outcome says (see ``Failure``)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if event_id in self._isolate:
            self._isolate.discard(event_id)
            solo = _Batch({email: _Contact(email, properties, [event_id], [waiter])})
            self._launch(solo)
        else:
            self._add(email, properties, event_id, waiter)
        await waiter

    def flush(self) -> None:
        """Send the open batch now."""
        batch, self._batch = self._batch, None
        if batch is not None:
            self._launch(batch)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the batches in flight; cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # --- collecting --------------------------------------------------------------------------

    def _add(
        self, email: str, properties: dict[str, str], event_id: str, waiter: asyncio.Future[None]
    ) -> None:
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(self._window_s, self._flush_if, batch)
        contact = batch.contacts.get(email)
        if contact is None:
            batch.contacts[email] = _Contact(email, properties, [event_id], [waiter])
        else:  # one id per batch for HubSpot: merge, the later event wins per property
            contact.properties.update(properties)
            contact.event_ids.append(event_id)
            contact.waiters.append(waiter)
        if len(batch.contacts) >= self._size:
            self.flush()

    def _flush_if(self, batch: _Batch) -> None:
        if self._batch is batch:
            self.flush()

    # --- sending -----------------------------------------------------------------------------

    def _launch(self, batch: _Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch) -> None:
        contacts = list(batch.contacts.values())
        try:
            outcomes = await self._send_batch({c.email: c.properties for c in contacts})
        except asyncio.CancelledError:
            self._settle(contacts, {}, Failure("retry", "the crm handler is stopping"))
            raise
        except Exception as err:  # a bug here must not leave callers waiting forever
            self._log.exception("crm_batch_failed", error_type=type(err).__name__)
            failure = Failure("retry", f"unexpected error: {type(err).__name__}")
            self._settle(contacts, {}, failure)
            return
        self._settle(contacts, outcomes, None)

    def _settle(
        self,
        contacts: list[_Contact],
        outcomes: Mapping[str, Failure | None],
        default: Failure | None,
    ) -> None:
        """Count each contact's outcome and hand it to every event waiting for it."""
        for contact in contacts:
            failure = outcomes.get(contact.email, default)
            self._record(contact, failure)
            for waiter in contact.waiters:
                if waiter.done():
                    continue
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure.error())

    def _record(self, contact: _Contact, failure: Failure | None) -> None:
        """Count the outcome; remember the events of a contact to send alone next time."""
        if failure is None:
            self._m.contacts.labels("upserted").inc(len(contact.waiters))
        elif failure.kind == "reject":
            self._m.contacts.labels("rejected").inc(len(contact.waiters))
            self._log.warning(
                "crm_contact_rejected", event_ids=contact.event_ids, error=failure.message
            )
        else:
            self._m.contacts.labels("retried").inc(len(contact.waiters))
            if failure.isolate and len(self._isolate) < _ISOLATE_MAX:
                self._isolate.update(contact.event_ids)
