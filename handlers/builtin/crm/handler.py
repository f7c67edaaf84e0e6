"""The ``crm`` handler: upsert the customer of each publication as a HubSpot CRM contact.

Entry point ``crm = "handlers.builtin.crm:create"`` in group ``pubrelay.handlers``. Each
``customer.publication.succeeded`` event becomes one contact upsert keyed by the
customer's e-mail address, sent in batches to HubSpot's CRM v3 batch upsert endpoint.
The parts, one module each:

* :mod:`~handlers.builtin.crm.settings`: ``PUBRELAY_CRM__*``;
* :mod:`~handlers.builtin.crm.properties`: which contact properties an event writes;
* :mod:`~handlers.builtin.crm.batcher`: contacts collected within a window into one request;
* :mod:`~handlers.builtin.crm.hubspot`: the request, and each contact's outcome from the
  answer (what ``handle`` raises for 207, 4xx, 401/403, 429, 5xx);
* :mod:`~handlers.builtin.crm.metrics`: ``pubrelay_crm_*``.

An event whose customer has no e-mail address is skipped (:class:`SkipEvent`, counted as
``skipped``). While HubSpot rejects the token, ``handle`` fails fast with
:class:`RetryLater` without calling HubSpot.

The token is never logged, and neither are e-mail addresses: logs name event ids.
"""

from __future__ import annotations

from structlog.typing import FilteringBoundLogger

from handlers.builtin.crm.batcher import Batcher
from handlers.builtin.crm.hubspot import HubSpotClient
from handlers.builtin.crm.metrics import CrmMetrics, crm_metrics
from handlers.builtin.crm.properties import PropertyMap
from handlers.builtin.crm.settings import CrmSettings
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, RetryLater, SkipEvent
from schemas.events import CustomerPublicationSucceededData, PublicationSucceededData

__all__ = ["HubSpotHandler", "create"]


class HubSpotHandler:
    """Upserts the customer of each event as a HubSpot contact, in batches."""

    def __init__(
        self,
        *,
        name: str,
        settings: CrmSettings,
        client: HubSpotClient,
        properties: PropertyMap,
        logger: FilteringBoundLogger,
        metrics: CrmMetrics,
    ) -> None:
        self.name = name
        self.event_types = frozenset(settings.event_types)
        self.settings = settings
        self._client = client
        self._properties = properties
        self._m = metrics
        self._batcher = Batcher(
            client.upsert,
            window_s=settings.batch_window_s,
            size=settings.batch_size,
            logger=logger,
            metrics=metrics,
        )

    def __repr__(self) -> str:  # keeps the token out of any repr
        return f"HubSpotHandler(name={self.name!r}, url={self._client.url!r})"

    async def start(self) -> None:
        await self._client.start()

    async def stop(self) -> None:
        """Send the open batch, wait (bounded) for requests in flight, close the session."""
        self._batcher.flush()
        await self._batcher.drain(self.settings.timeout_s + self.settings.rate_window_s)
        await self._client.close()

    async def handle(self, event: Event) -> None:
        email = self._address(event)
        properties = self._properties.values(event)
        if not self._client.running:
            raise RetryLater("the crm handler is not running")
        blocked = self._client.auth_blocked()
        if blocked is not None:
            self._m.contacts.labels("retried").inc()
            raise blocked.error()
        await self._batcher.submit(event.id, email, properties)

    def _address(self, event: Event) -> str:
        """The customer's address, the contact's key; SkipEvent without one."""
        data = event.envelope.data
        if not isinstance(data, CustomerPublicationSucceededData | PublicationSucceededData):
            self._m.contacts.labels("skipped").inc()
            raise SkipEvent(f"event type {event.type!r} names no customer to upsert")
        email = (data.customer_email or "").strip().lower()
        if not email:
            self._m.contacts.labels("skipped").inc()
            raise SkipEvent("the customer has no e-mail address; HubSpot contacts are keyed by it")
        return email


def create(context: HandlerContext) -> HubSpotHandler:
    """Entry point ``crm`` in group ``pubrelay.handlers`` (see ``pyproject.toml``)."""
    settings = context.settings(CrmSettings)
    token = settings.token.get_secret_value().strip() if settings.token is not None else ""
    if not token:
        raise ConfigError(
            f"{context.env_prefix}TOKEN is required when the crm handler is enabled: a HubSpot "
            "private-app access token with the scope crm.objects.contacts.write"
        )
    if not settings.properties:
        raise ConfigError(f"{context.env_prefix}PROPERTIES maps no property: nothing to write")
    properties = PropertyMap(settings.properties)
    metrics = crm_metrics(context)
    return HubSpotHandler(
        name=context.name,
        settings=settings,
        client=HubSpotClient(settings, token, logger=context.logger, metrics=metrics),
        properties=properties,
        logger=context.logger,
        metrics=metrics,
    )
