"""An exception as the worker writes it (log lines, headers, the console's index): bounded.

A handler's error message may quote customer data decoded from JSON, where a lone
surrogate (``"\\ud83d"``) is valid, while headers and JSON log lines must be UTF-8; and a
plugin's exception may fail in its own ``__str__``. Nothing here raises.
"""

from __future__ import annotations

from typing import Final

from schemas.masking import mask_emails

SHORT_ERROR_CHARS: Final = 300


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) as ``\\udxxx`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_message(err: BaseException) -> str:
    """``str(err)``, printable; a plugin's exception whose ``__str__`` fails still has a name."""
    try:
        return printable(str(err))
    except Exception:  # any failure of foreign code: describe it instead
        return f"<unprintable {type(err).__name__}>"


def short_error(err: BaseException) -> str:
    """The error message as the worker writes it (log lines, the console's index):
    printable, customer e-mail addresses masked, cut to 300 characters without leaving
    the start of an address (the log's own masking comes after a cut, too late for that)."""
    return mask_emails(error_message(err), max_chars=SHORT_ERROR_CHARS)
