"""The outbox pages: the e-mails the ``email`` handler wrote instead of sending them.

``/console/outbox`` lists ``<data dir>/outbox/*.eml`` newest first; ``/console/outbox/NAME``
shows one: its headers and text part as escaped text, and its HTML part in a sandboxed
frame (no script, its own opaque origin). The frame's document, ``.../NAME/html``, is
served with its own policy: ``sandbox``, inline styles and ``data:`` images only, framed
by the console alone. Names are checked against the outbox's own pattern (no paths).
Files are read and parsed in a thread, never on the loop the webhook shares: the list
reads only the headers of the newest ``MAX_LISTED`` (``_MAX_HEADER_BYTES`` each) and shows
each value cut to ``MAX_SHOWN_CHARS``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Final

from aiohttp import web

from pubrelay.console.app import CONSOLE, render
from pubrelay.text import clip

MAX_LISTED: Final = 200
MAX_MESSAGE_BYTES: Final = 2 * 1024 * 1024
_MAX_HEADER_BYTES: Final = 64 * 1024
MAX_SHOWN_CHARS: Final = 500
"""A header value as listed (subject, recipient, …): longer ones end with "…"."""
_NAME: Final = re.compile(r"[0-9]{1,20}-[0-9a-f]{16}\.eml")
FRAME_CSP: Final = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
)


@dataclass(frozen=True, slots=True)
class Mail:
    name: str
    subject: str
    recipient: str
    date: str
    message_id: str


def _outbox(request: web.Request) -> Path:
    outbox = request.app[CONSOLE].outbox
    if outbox is None:
        raise web.HTTPNotFound(text="no outbox")
    return outbox


def _parse(path: Path) -> EmailMessage:
    with path.open("rb") as handle:
        data = handle.read(MAX_MESSAGE_BYTES)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _names(folder: Path) -> list[str]:
    """The outbox's e-mails, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.glob("*.eml") if _NAME.fullmatch(p.name)), reverse=True)


def _headers(path: Path, parser: BytesHeaderParser[EmailMessage]) -> EmailMessage:
    with path.open("rb") as handle:
        return parser.parsebytes(handle.read(_MAX_HEADER_BYTES))


def _listing(folder: Path) -> tuple[list[Mail], int]:
    """The newest ``MAX_LISTED`` e-mails' headers, and how many there are."""
    names = _names(folder)
    parser = BytesHeaderParser(policy=email.policy.default)
    return [_mail(name, _headers(folder / name, parser)) for name in names[:MAX_LISTED]], len(names)


def mails_for(folder: Path | None, event_id: str) -> list[Mail]:
    """The outbox's e-mails for ``event_id`` (its ``X-Pubrelay-Event-Id``), among the
    newest ``MAX_LISTED``; only their headers are read."""
    if folder is None:
        return []
    parser = BytesHeaderParser(policy=email.policy.default)
    found = []
    for name in _names(folder)[:MAX_LISTED]:
        headers = _headers(folder / name, parser)
        if headers["X-Pubrelay-Event-Id"] == event_id:
            found.append(_mail(name, headers))
    return found


def _mail(name: str, message: Message) -> Mail:
    return Mail(
        name,
        _shown(message["Subject"]),
        _shown(message["To"]),
        _shown(message["Date"]),
        _shown(message["Message-ID"]),
    )


def _shown(value: object) -> str:
    return clip(str(value or ""), MAX_SHOWN_CHARS)


async def _message(request: web.Request) -> tuple[str, EmailMessage]:
    name = request.match_info["name"]
    path = _outbox(request) / name
    if not _NAME.fullmatch(name) or not path.is_file():
        raise web.HTTPNotFound(text="no such e-mail")
    return name, await asyncio.to_thread(_parse, path)


def _part(message: EmailMessage, kind: str) -> str:
    part = message.get_body(preferencelist=(kind,))
    if not isinstance(part, EmailMessage):
        return ""
    content = part.get_content()
    return content if isinstance(content, str) else ""


async def outbox(request: web.Request) -> web.Response:
    folder = _outbox(request)
    mails, total = await asyncio.to_thread(_listing, folder)
    return render(request, "outbox.html", mails=mails, total=total, folder=str(folder))


async def mail_page(request: web.Request) -> web.Response:
    name, message = await _message(request)
    return render(
        request,
        "mail.html",
        name=name,
        headers=[(k, str(v)) for k, v in message.items()],
        text=_part(message, "plain"),
        has_html=bool(_part(message, "html")),
    )


async def mail_html(request: web.Request) -> web.Response:
    """The HTML part alone, for the sandboxed frame of :func:`mail_page`."""
    _, message = await _message(request)
    return web.Response(
        text=_part(message, "html"),
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": FRAME_CSP, "X-Frame-Options": "SAMEORIGIN"},
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/outbox", outbox, name="outbox")
    router.add_get("/outbox/{name}", mail_page, name="mail")
    router.add_get("/outbox/{name}/html", mail_html, name="mail_html")
