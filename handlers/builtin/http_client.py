"""What the built-in handlers that call HTTP services (``crm``, ``http``) share: the checked
URL setting and the client session each opens at ``start``.

Reading a ``Retry-After`` answer is :mod:`handlers.builtin.retry_after`.
"""

from __future__ import annotations

from typing import Annotated

import aiohttp
from pydantic import AfterValidator

__all__ = ["HttpUrlStr", "client_session"]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


HttpUrlStr = Annotated[str, AfterValidator(_http_url)]
"""A setting holding an ``http://`` or ``https://`` URL, kept as the text given."""


def client_session(*, timeout_s: float, user_agent: str) -> aiohttp.ClientSession:
    """One session per handler between ``start`` and ``stop``; ``timeout_s`` bounds a request."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"User-Agent": user_agent},
    )
