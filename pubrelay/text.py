"""Text from events and stores, cut and made safe where the CLI and the console show it.

Event ids, codes, error texts, quarantine details and campaign names come from signed
bodies, from exceptions or from Voucherify's API. Printed raw, a control character among
them (an escape sequence, a carriage return, a bell) would act on the operator's terminal
instead of being shown: :func:`for_terminal` writes each as its Python escape (``\\x1b``,
``\\r``) and then cuts, so a column's width counts what is shown. :func:`clip` only cuts
(the console's HTML is escaped by its templates).
"""

from __future__ import annotations

ELLIPSIS = "…"


def clip(text: str, width: int) -> str:
    """``text`` if it fits ``width`` characters, else its start and ``…`` in that width."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on written as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def for_terminal(text: str | None, width: int | None = None) -> str:
    """``text`` (``None`` is empty) escaped for a terminal, then cut to ``width``."""
    shown = printable(text or "")
    return shown if width is None else clip(shown, width)
