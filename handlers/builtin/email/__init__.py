"""The ``email`` handler: one e-mail per publication with the customer's code(s)."""

from handlers.builtin.email.handler import EmailHandler, create

__all__ = ["EmailHandler", "create"]
