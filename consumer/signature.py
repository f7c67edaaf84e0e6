"""Voucherify webhook signatures (``x-voucherify-signature``).

The signature is the lowercase hex HMAC-SHA256, keyed with the project's webhook secret
(UTF-8), over the JSON body with the whitespace outside string literals removed. We check
the raw body first, then the raw text with that whitespace removed (never a
re-serialisation, which could reorder keys or re-escape strings). Comparison is constant
time; several secrets may be valid at once (rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

# Possessive, and an unclosed string runs to the end: no backtracking, so a hostile body
# (an opened string full of escaped quotes) costs linear time, not quadratic.
_STRING_OR_SPACE: Final = re.compile(rb'("(?:[^"\\]|\\.)*+"?)|[ \t\n\r]+', re.DOTALL)


def strip_json_whitespace(body: bytes) -> bytes:
    """Remove JSON whitespace outside string literals, leaving strings byte-for-byte."""
    return _STRING_OR_SPACE.sub(rb"\1", body)


def sign(secret: str, body: bytes) -> str:
    """The signature Voucherify would send for ``body`` (as given, no normalisation)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Verifier:
    """Checks a body against one or more secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if any(not s.strip() for s in secrets):
            raise ValueError("a webhook secret must not be empty")
        self._keys = tuple(s.encode() for s in secrets)

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def verify(self, body: bytes, signature: str | None) -> bool:
        if not signature or not self._keys:
            return False
        try:
            given = bytes.fromhex(signature.strip())
        except ValueError:
            return False
        if len(given) != hashlib.sha256().digest_size:
            return False
        if self._matches(body, given):
            return True
        compact = strip_json_whitespace(body)
        return compact != body and self._matches(compact, given)

    def _matches(self, message: bytes, given: bytes) -> bool:
        ok = False
        for key in self._keys:
            # No early exit: every secret is checked, in constant time each.
            ok |= hmac.compare_digest(hmac.digest(key, message, "sha256"), given)
        return ok
