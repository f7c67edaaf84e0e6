"""Masking customer e-mail addresses wherever text may reach a log or an error message.

``jane.doe@example.com`` becomes ``j***@example.com``: enough to tell customers apart
when debugging, not enough to contact them. Every layer (log configuration, handlers
quoting SMTP or CRM replies) uses this one function.

The text is customer data, so the cost is linear in its length, whatever it holds: each
``@`` is looked at once, the local part is read backwards from it only as far as the
previous ``@``, the domain forwards only as far as the next (a plain regular expression
would rescan a long run of address characters from each of its positions, seconds for
16 kB). And the text is cut to :data:`MAX_MASKED_CHARS` first, with a marker, so a log
line or a dead-letter header stays bounded; a cut never leaves the start of an address.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_MASKED_CHARS", "TRUNCATED_MARKER", "mask_address", "mask_emails"]

MAX_MASKED_CHARS: Final = 65_536
"""Characters of a text kept by :func:`mask_emails`; the rest becomes the marker."""

TRUNCATED_MARKER: Final = "…[truncated {count} chars]"

_NOT_LOCAL: Final = '\\s@<>()\\[\\],;:"=/\\\\|'
_LOCAL_RUN_REVERSED: Final = re.compile(f"[^{_NOT_LOCAL}]*")
"""A local part's characters, matched on the reversed text before an ``@`` (linear in
the run, where a pattern anchored at the ``@`` would be tried from each earlier position):
anything but spaces and the delimiters around addresses in text, so ``jörg.müller``,
``o'neil`` and ``a+tag`` are local parts whole."""
_ADDRESS_RUN_REVERSED: Final = re.compile(f"[^{_NOT_LOCAL.replace('@', '')}]*")
"""An address's characters, ``@`` included (a cut inside an address drops its start)."""
_MAX_ADDRESS_CHARS: Final = 320
_DOMAIN: Final = re.compile(r"[\w.-]+")


def _run_at_end(run_reversed: re.Pattern[str], text: str) -> int:
    """How many characters at the end of ``text`` the pattern's run holds (it matches
    the empty string, so it always matches)."""
    found = run_reversed.match(text[::-1])
    return found.end() if found is not None else 0


def _local_length(before_at: str) -> int:
    """How many characters at the end of ``before_at`` are an address's local part (a
    quoted one, ``"jane doe"``, included)."""
    if before_at.endswith('"'):
        opening = before_at.rfind('"', max(0, len(before_at) - _MAX_ADDRESS_CHARS), -1)
        if opening >= 0:
            return len(before_at) - opening
    run = _run_at_end(_LOCAL_RUN_REVERSED, before_at)
    # o'neil is a local part, but in 'jane@example.com' the quote is the text's.
    return len(before_at[len(before_at) - run :].lstrip("'`")) if run else 0


def mask_emails(text: str, *, max_chars: int | None = MAX_MASKED_CHARS) -> str:
    """Mask every e-mail address inside ``text``, cut first to ``max_chars`` (``None``: whole).

    An address is a local part (a run of anything but spaces and the delimiters around
    addresses in text, or a quoted string), ``@`` and a run of letters, digits, ``.`` and
    ``-``; all of it but the first character of the local part becomes ``***``.
    """
    if max_chars is not None and len(text) > max_chars:
        text = _truncated(text, max_chars)
    if "@" not in text:
        return text
    parts: list[str] = []
    done = 0  # text[:done] is in parts, masked
    after_at = 0  # just after the previous "@": no local part reaches back beyond it
    at = text.find("@")
    while at >= 0:
        start = max(done, after_at)
        local = _local_length(text[start:at])
        domain = _DOMAIN.match(text, at + 1) if local else None
        if domain is not None:
            first = at - local
            parts += (text[done:first], text[first], "***", text[at : domain.end()])
            done = domain.end()
        after_at = at + 1
        at = text.find("@", max(after_at, done))
    parts.append(text[done:])
    return "".join(parts)


def _truncated(text: str, max_chars: int) -> str:
    head = text[:max_chars]
    if _run_at_end(_ADDRESS_RUN_REVERSED, text[max_chars]):
        # The cut may split an address: drop its start (at most an address's length,
        # RFC 5321: 64 + 1 + 255) rather than keep it unmasked.
        kept = max(0, max_chars - _MAX_ADDRESS_CHARS)
        tail = head[kept:]
        head = head[:kept] + tail[: len(tail) - _run_at_end(_ADDRESS_RUN_REVERSED, tail)]
    return head + TRUNCATED_MARKER.format(count=len(text) - len(head))


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
