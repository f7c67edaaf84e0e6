"""The ``crm`` handler: upserts customers as HubSpot contacts, in batches."""

from handlers.builtin.crm.handler import HubSpotHandler, create

__all__ = ["HubSpotHandler", "create"]
