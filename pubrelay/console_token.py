"""The console's token: configured, or generated once into the data directory.

``PUBRELAY_CONSOLE__TOKEN`` when set. Otherwise, with ``--console`` (``make run``), the
file ``<data dir>/console-token``, created on first start like the webhook secret
(``pubrelay/secrets.py``: mode 0600, written whole to a private temporary file, then
linked into place). Without either the console is off.
"""

from __future__ import annotations

import sys

from bus.sqlite.db import warn_if_not_private
from pubrelay.secrets import write_new_private_token
from pubrelay.settings import Settings

TOKEN_FILE = "console-token"  # noqa: S105 - a file name, not a secret


def resolve_console_token(settings: Settings, *, generate: bool) -> str | None:
    """The configured token, else (when ``generate``) the data directory's, created if
    missing; None when the console is off."""
    if settings.console.token is not None and settings.console.token.get_secret_value():
        return settings.console.token.get_secret_value()
    if not generate:
        return None
    path = settings.data_dir / TOKEN_FILE
    if path.exists():
        warn_if_not_private(path)
        stored = path.read_text().strip()
        if stored:
            return stored
        path.unlink()  # an empty file (never written by us): make a new token
    value = write_new_private_token(path)
    if value is None:  # another process won: use its token
        return path.read_text().strip() or None
    print(
        f"pubrelay: generated a console token in {path.resolve()} (mode 0600).",
        file=sys.stderr,
    )
    return value


def console_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - compared
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/console/"
