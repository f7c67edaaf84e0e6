"""The bytes of an e-mail, built directly: what :mod:`email.message` would send, faster.

The ``email`` handler's message is always the same shape: a few headers, then
``multipart/alternative`` with a text and an HTML part. Building it as an
:class:`~email.message.EmailMessage` and flattening it with ``as_bytes(policy=SMTP)``
parses every header value into a token tree and folds it back, and cost about half the
worker's CPU at 200 e-mails/s (``docs/performance.md``, "Signed POST to e-mail
accepted"). Here the same bytes are written directly:

* a header whose value needs nothing done to it (printable ASCII, no encoded-word
  marker ``=?``, single spaces, nothing at either end, ``Name: value`` within 78
  characters) is written as ``Name: value``: that is what the policy's folding gives for
  such a value. Any other value (non-ASCII, too long, anything unusual) is folded by the
  standard library itself (:func:`fold_header`), so it stays RFC 2047 encoded and folded
  exactly as before;
* each part's body is encoded as ``EmailMessage.set_content`` chooses (7bit when every line
  fits and is ASCII, else 8bit, else quoted-printable or base64, whichever the first ten
  lines say is shorter), with the part headers and the boundary the generator writes.

``tests/unit/test_email_mime.py`` checks the output byte for byte against the
:mod:`email.message` construction, on the built-in templates and on generated header
values.
"""

from __future__ import annotations

import binascii
import random
import re
import sys
from collections.abc import Iterable
from email import policy, quoprimime
from email.headerregistry import Address
from typing import Final

__all__ = ["fold_header", "header_line", "multipart_alternative"]

_MAX_LINE: Final = 78  # email.policy.default and SMTP: max_line_length
_CRLF: Final = b"\r\n"
_PLAIN_RE: Final = re.compile(r"[!-~]+(?: [!-~]+)*")
"""Printable ASCII words separated by single spaces, nothing at either end."""
_PLAIN_ADDRESS_RE: Final = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
"""An address whose parse is its text (a dot-atom at a host name)."""
_PLAIN_MSGID_RE: Final = re.compile(r"<[A-Za-z0-9_.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
_ADDRESS_HEADERS: Final = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
_TOKEN_WIDTH: Final = len(repr(sys.maxsize - 1))  # email.generator's boundary width
_PARTS_CHECKED: Final = 10  # the lines email.contentmanager sniffs to choose qp or base64


def fold_header(name: str, value: str | Address) -> bytes:
    """``Name: value`` + CRLF exactly as ``EmailMessage`` + ``as_bytes(policy=SMTP)`` write it."""
    _, header = policy.default.header_store_parse(name, value)
    return policy.SMTP.fold_binary(name, header)


def header_line(name: str, value: str | Address) -> bytes:
    """The header as :func:`fold_header` writes it, without parsing it when it is plain
    (structured values only in the plain forms the handler writes: a display name and a
    dot-atom address, a ``Message-ID`` of id characters at a host name)."""
    text = str(value)
    if (
        len(name) + 2 + len(text) <= _MAX_LINE
        and "=?" not in text
        and _PLAIN_RE.fullmatch(text) is not None
        and (
            _PLAIN_ADDRESS_RE.fullmatch(value.addr_spec)
            if isinstance(value, Address)
            else name.lower() not in _ADDRESS_HEADERS  # an address list as text: parsed
        )
        and (name.lower() != "message-id" or _PLAIN_MSGID_RE.fullmatch(text))
    ):
        return f"{name}: {text}\r\n".encode("ascii")
    return fold_header(name, value)


def _encode_text(text: str) -> tuple[str, bytes]:
    """The transfer encoding and body ``set_content(text)`` gives (``email.policy.default``,
    UTF-8), with CRLF line ends as the SMTP policy writes them."""
    lines = text.encode("utf-8").splitlines()
    if max(map(len, lines), default=0) <= _MAX_LINE:
        body = b"\n".join(lines) + b"\n"
        cte = "7bit" if body.isascii() else "8bit"
        return cte, body.replace(b"\n", _CRLF)
    sniff = b"\n".join(lines[:_PARTS_CHECKED]) + b"\n"
    sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), _MAX_LINE)
    if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
        body = b"\n".join(lines) + b"\n"
        step = _MAX_LINE // 4 * 3
        encoded = b"".join(
            binascii.b2a_base64(body[i : i + step]) for i in range(0, len(body), step)
        )
        return "base64", encoded.replace(b"\n", _CRLF)
    if len(lines) <= _PARTS_CHECKED:
        data = sniff_qp
    else:
        data = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _MAX_LINE)
    return "quoted-printable", data.encode("ascii").replace(b"\n", _CRLF)


def _part(subtype: str, text: str, *, mime_version: bool) -> bytes:
    cte, body = _encode_text(text)
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n"
        # add_alternative() makes the new part an EmailMessage, which adds MIME-Version
        + ("MIME-Version: 1.0\r\n" if mime_version else "")
        + "\r\n"
    )
    return head.encode("ascii") + body


def _boundary(parts: bytes) -> str:
    """email.generator's boundary: random digits, suffixed until no line of the parts is
    ``--<boundary>`` (or ``--<boundary>--``); checked without compiling a regex for each
    message, as the generator does (its ``^--<boundary>(--)?$``, lines ending at ``\n``)."""
    token = random.randrange(sys.maxsize)  # noqa: S311 - a MIME boundary, as email.generator's
    boundary = "=" * 15 + f"{token:0{_TOKEN_WIDTH}d}" + "=="
    candidate, counter = boundary, 0
    while _delimits(parts, b"--" + candidate.encode("ascii")):
        candidate, counter = f"{boundary}.{counter}", counter + 1
    return candidate


def _delimits(parts: bytes, delimiter: bytes) -> bool:
    """Whether a line of ``parts`` is ``delimiter`` or ``delimiter--``."""
    if not parts.startswith(delimiter) and b"\n" + delimiter not in parts:
        return False
    return any(line in (delimiter, delimiter + b"--") for line in parts.split(b"\n"))


def multipart_alternative(headers: Iterable[bytes], text: str, html: str) -> bytes:
    """The whole message: ``headers`` (each a line from :func:`header_line`), then the
    ``multipart/alternative`` of ``text`` and ``html``, as
    ``set_content(text)`` + ``add_alternative(html, subtype="html")`` build it."""
    first = _part("plain", text, mime_version=False)
    second = _part("html", html, mime_version=True)
    boundary = _boundary(first + _CRLF + second)
    delimiter = f"--{boundary}".encode("ascii")
    return b"".join(
        [
            *headers,
            b"MIME-Version: 1.0\r\n",
            b"Content-Type: multipart/alternative;\r\n",
            f' boundary="{boundary}"\r\n\r\n'.encode("ascii"),
            delimiter + _CRLF,
            first,
            _CRLF + delimiter + _CRLF,
            second,
            _CRLF + delimiter + b"--" + _CRLF,
        ]
    )
