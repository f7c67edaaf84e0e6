"""Masking customer e-mail addresses wherever text may reach a log or an error message.

``jane.doe@example.com`` becomes ``j***@example.com``: enough to tell customers apart
when debugging, not enough to contact them. Every layer (log configuration, handlers
quoting SMTP or CRM replies) uses this one function.
"""

from __future__ import annotations

import re
from typing import Final

_EMAIL: Final = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*(@[A-Za-z0-9.-]+)")


def mask_emails(text: str) -> str:
    """Mask every e-mail address inside ``text``."""
    return _EMAIL.sub(r"\1***\2", text) if "@" in text else text


def mask_address(address: str) -> str:
    """One address known to be an address field, masked the same way.

    Unlike :func:`mask_emails`, nothing of a malformed value survives but its first
    character and its domain (``jack smith@example.com`` -> ``j***@example.com``), and a
    value without ``@`` is hidden whole (``***``).
    """
    local, at, domain = address.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"
