"""Lone UTF-16 surrogate escapes in JSON text (``"\\ud83d"`` without its pair).

JSON allows any ``\\uXXXX`` escape, so a free-text field (a customer's name cut in the
middle of an emoji by the system that stored it) can carry half of a surrogate pair. That
is valid JSON, but it names no character: msgspec and pydantic refuse the whole document,
and a Python string holding it cannot be encoded to UTF-8 (an e-mail header, a CRM
request). :func:`without_lone_surrogates` gives the text with each such escape replaced by
``\\ufffd`` (the replacement character), for the decoders to try again; the body itself is
kept byte for byte everywhere it is stored or forwarded. Well-formed pairs stay as they are.
"""

from __future__ import annotations

import re
from typing import Final

# A quick test: any escape of the surrogate range at all (paired or not).
_SURROGATE: Final = re.compile(r"\\u[dD][89a-fA-F]")
# One escape at a time, left to right, so an escaped backslash (``\\``) is never read as
# the start of a ``\u``: a high surrogate with an optional low one after it, a low one on
# its own, or any other escape (kept as is).
_ESCAPE: Final = re.compile(
    r"\\u(?P<high>[dD][89abAB][0-9a-fA-F]{2})(?P<low>\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
    r"|\\u(?P<lone_low>[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|\\.",
    re.DOTALL,
)
_REPLACEMENT: Final = "\\ufffd"


def without_lone_surrogates(raw: bytes | bytearray | str) -> str | None:
    """The JSON text of ``raw`` with every lone surrogate escape replaced by ``\\ufffd``.

    ``None`` when there is none to replace (or ``raw`` is not UTF-8): then retrying a
    decoder cannot help. Linear in the length of ``raw``.
    """
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if _SURROGATE.search(text) is None:
        return None
    fixed = _ESCAPE.sub(_replace, text)
    return fixed if fixed != text else None


def _replace(match: re.Match[str]) -> str:
    if match["lone_low"] is not None or (match["high"] is not None and match["low"] is None):
        return _REPLACEMENT
    return match[0]
