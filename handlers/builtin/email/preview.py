"""``pubrelay preview-email FILE``: the e-mail the ``email`` handler would send for a webhook
body, rendered without sending.

The preview reads the same settings (``PUBRELAY_EMAIL__*``) and uses the same
:class:`~handlers.builtin.email.message.MessageComposer` as the handler, so what it shows is
exactly what would be sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import cast

import structlog
from prometheus_client import CollectorRegistry
from structlog.typing import FilteringBoundLogger

from handlers.builtin.email.message import MessageComposer
from handlers.builtin.email.settings import EmailSettings
from handlers.types import HandlerContext
from schemas.errors import SkipEvent
from schemas.events import parse_event

__all__ = ["format_preview", "load_settings", "render_preview"]


def load_settings(env: Mapping[str, str] | None = None) -> EmailSettings:
    """``PUBRELAY_EMAIL__*`` from ``env`` (default: the process environment), as the
    worker reads them; :class:`ConfigError` naming the variable at fault."""
    context = HandlerContext(
        name="email",
        data_dir=Path(),
        metrics_registry=CollectorRegistry(auto_describe=False),
        logger=cast(FilteringBoundLogger, structlog.get_logger("pubrelay.handlers.email")),
        topic_prefix="",
        env=env,
    )
    return context.settings(EmailSettings)


def render_preview(
    raw: bytes, settings: EmailSettings, *, now: datetime | None = None
) -> EmailMessage:
    """The e-mail the handler would send for the webhook body ``raw``, without sending.

    Raises :class:`SkipEvent` (the reason no e-mail would be sent), :class:`HandlerError`
    (a template bug, an unusable address), :class:`ConfigError` (settings, template
    syntax) or pydantic's ``ValidationError`` (not a webhook body). The ledger is not
    consulted: a publication already mailed previews the same message again.
    """
    composer = MessageComposer.from_settings(
        settings, "PUBRELAY_EMAIL__", clock=(lambda: now) if now else None
    )
    envelope = parse_event(raw)
    skip = composer.skip_reason(envelope)
    if skip is not None:
        raise SkipEvent(f"{skip.reason}: {skip.message}")
    return composer.compose(envelope).message


def format_preview(message: EmailMessage) -> str:
    """Headers, then each part decoded under a ``--- text/plain ---`` style rule."""
    lines = [f"{name}: {value}" for name, value in message.items()]
    for part in message.walk():
        if part.is_multipart():
            continue
        content = part.get_content()
        lines += ["", f"--- {part.get_content_type()} ---", str(content).rstrip("\n")]
    return "\n".join(lines) + "\n"
