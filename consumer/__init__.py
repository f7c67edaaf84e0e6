"""The webhook consumer: verification, routing, health and metrics over aiohttp."""
