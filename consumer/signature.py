"""Voucherify webhook signatures (``x-voucherify-signature``).

The signature is the lowercase hex HMAC-SHA256, keyed with the project's webhook secret
(UTF-8), over the JSON body with the whitespace outside string literals removed. We check
the raw body first, then the raw text with that whitespace removed (never a
re-serialisation, which could reorder keys or re-escape strings). Comparison is constant
time; several secrets may be valid at once (rotation).

Whoever can reach the endpoint can make us run this check, so it costs about the HMAC of
the raw body, whatever the body holds (where a regex took up to a second for 1 MiB:
``docs/performance.md``):

* the whitespace is removed with bytes operations that run at C speed (split at the
  quotes, delete whitespace from the pieces outside strings, join), never a Python loop
  or a regex callback per token;
* the second check is skipped when it cannot change the answer: the body holds no
  whitespace byte, or removing it leaves the body as it was (compact Voucherify bodies);
* it is skipped, too, for a body over :data:`MAX_NORMALISED_BYTES`, or with more than
  :data:`MAX_NORMALISED_TOKENS` quotes and backslashes (the one input whose cost grows with
  its content: one piece per string), so its cost has a bound of its own, independent of
  the body's size. Such a body is refused unless it is signed as received: its check is
  :attr:`Verdict.NOT_NORMALISED`, which the intake counts. A Voucherify event, a few KB,
  compact, with about a hundred quotes per KB, stays far below both.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from enum import Enum
from typing import Final

MAX_NORMALISED_BYTES: Final = 256 * 1024
"""The largest body the whitespace-stripped check is tried on: a pretty-printed event of
that size would be dozens of times Voucherify's own (compact, a few KB). A larger body
with a bad signature costs one HMAC and a few byte scans."""
MAX_NORMALISED_TOKENS: Final = 16_384
"""Quotes and backslashes a body may hold for the whitespace-stripped check to be tried:
about 8,000 strings, a pretty-printed event of 100 KB or more. With both bounds the second
check costs at most ~1 ms here, whatever the body (``docs/performance.md``)."""

_WHITESPACE: Final = b" \t\n\r"
_WHITESPACE_BYTES: Final = tuple(bytes([c]) for c in _WHITESPACE)
# JSON text never holds these bytes raw (control characters must be escaped, in strings
# and out), so they can stand in for escaped backslashes and escaped quotes.
_ESCAPED_BACKSLASH: Final = b"\x00"
_ESCAPED_QUOTE: Final = b"\x01"


class Verdict(Enum):
    """The outcome of checking a signature."""

    VALID = "valid"
    INVALID = "invalid"
    NOT_NORMALISED = "not_normalised"
    """Invalid as received, and the body was too large, or held too many quotes and
    backslashes, for the whitespace-stripped check to be tried (:data:`MAX_NORMALISED_BYTES`,
    :data:`MAX_NORMALISED_TOKENS`)."""


def strip_json_whitespace(body: bytes) -> bytes:
    """Remove JSON whitespace outside string literals, leaving strings byte-for-byte.

    Escaped backslashes, then escaped quotes, are masked (pairing backslashes from the
    left, as a JSON reader does), so the quotes left are exactly the string delimiters:
    splitting at them gives the text outside strings at even positions. An unclosed
    string runs to the end. That is exact for JSON text, where a backslash only appears in
    a string; a body holding a backslash and a raw NUL or SOH byte is not JSON and is
    returned unchanged.
    """
    escaped = b"\\" in body
    if escaped:
        if _ESCAPED_BACKSLASH in body or _ESCAPED_QUOTE in body:
            return body
        body = body.replace(b"\\\\", _ESCAPED_BACKSLASH).replace(b'\\"', _ESCAPED_QUOTE)
    pieces = body.split(b'"')
    # The pieces outside strings hold no quote: join them with one, delete the whitespace
    # in a single pass, and split them back into place.
    pieces[0::2] = b'"'.join(pieces[0::2]).translate(None, _WHITESPACE).split(b'"')
    stripped = b'"'.join(pieces)
    if escaped:
        stripped = stripped.replace(_ESCAPED_QUOTE, b'\\"').replace(_ESCAPED_BACKSLASH, b"\\\\")
    return stripped


def sign(secret: str, body: bytes) -> str:
    """The signature Voucherify would send for ``body`` (as given, no normalisation)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Verifier:
    """Checks a body against one or more secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if any(not s.strip() for s in secrets):
            raise ValueError("a webhook secret must not be empty")
        self._keys = tuple(s.encode() for s in secrets)
        # HMAC's inner and outer hashes after the key (RFC 2104), computed once: each check
        # copies them rather than hmac.digest setting the key up again (0.7 µs of 4 µs).
        self._pads = tuple(_key_pads(key) for key in self._keys)

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def verify(self, body: bytes, signature: str | None) -> bool:
        return self.check(body, signature) is Verdict.VALID

    def check(self, body: bytes, signature: str | None) -> Verdict:
        """The raw body, then (when it can matter and is cheap) the whitespace-stripped one."""
        if not signature or not self._keys:
            return Verdict.INVALID
        try:
            given = bytes.fromhex(signature.strip())
        except ValueError:
            return Verdict.INVALID
        if len(given) != hashlib.sha256().digest_size:
            return Verdict.INVALID
        if self._matches(body, given):
            return Verdict.VALID
        if not any(space in body for space in _WHITESPACE_BYTES):
            return Verdict.INVALID  # nothing to strip
        if len(body) > MAX_NORMALISED_BYTES or _tokens(body) > MAX_NORMALISED_TOKENS:
            return Verdict.NOT_NORMALISED
        compact = strip_json_whitespace(body)
        if compact != body and self._matches(compact, given):
            return Verdict.VALID
        return Verdict.INVALID

    def _matches(self, message: bytes, given: bytes) -> bool:
        ok = False
        for inner_pad, outer_pad in self._pads:
            inner = inner_pad.copy()
            inner.update(message)
            outer = outer_pad.copy()
            outer.update(inner.digest())
            # No early exit: every secret is checked, in constant time each.
            ok |= hmac.compare_digest(outer.digest(), given)
        return ok


def _key_pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC-SHA256's hashes after ``key`` xor ipad and opad (RFC 2104, section 2)."""
    block = hashlib.sha256().block_size
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    return (
        hashlib.sha256(bytes(k ^ 0x36 for k in key)),
        hashlib.sha256(bytes(k ^ 0x5C for k in key)),
    )


def _tokens(body: bytes) -> int:
    """The quotes and backslashes of ``body``: what the whitespace stripping's cost grows with."""
    tokens = body.count(b'"')
    if b"\\" in body:
        tokens += body.count(b"\\")
    return tokens
