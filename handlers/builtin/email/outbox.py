"""The outbox: e-mails written to files instead of sent (``PUBRELAY_EMAIL__SMTP_URL=outbox:``).

For trying pubrelay without an SMTP relay: each message, exactly as it would be sent, is
written to ``<data dir>/outbox/<time>-<digest>.eml`` (mode 0600, in a directory of mode
0700; written whole to a temporary file and renamed, so a reader never sees half a
message). The console shows them (``/console/outbox``). Nothing is ever delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Final

OUTBOX_URL: Final = "outbox:"
OUTBOX_DIR: Final = "outbox"


class OutboxTransport:
    """The e-mail handler's transport when ``SMTP_URL`` is ``outbox:``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"OutboxTransport(directory={str(self.directory)!r})"

    @property
    def where(self) -> str:
        return f"outbox {self.directory}"

    async def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def stop(self) -> None:
        return None

    async def send(self, sender: str, recipient: str, message: bytes) -> str:
        """Write the message; the "reply" names the file."""
        return await asyncio.to_thread(self._write, message)

    def _write(self, message: bytes) -> str:
        digest = hashlib.sha256(message).hexdigest()[:16]
        name = f"{time.time_ns()}-{digest}.eml"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(message)
        tmp.rename(self.directory / name)
        return f"written to the outbox as {name}"
