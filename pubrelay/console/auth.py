"""Who may use the console: the token, as a Bearer header or a login session; CSRF tokens.

* **The token** (``PUBRELAY_CONSOLE__TOKEN``) is compared in constant time
  (``hmac.compare_digest``) whether it comes as ``Authorization: Bearer <token>`` (scripts)
  or from the login form.
* **Sessions** are signed, not stored: the cookie is ``<expiry>.<nonce>.<HMAC(token,
  expiry.nonce)>``, and a new token ends every session. Logging out ends the session: the
  process that served it remembers it until it would have expired, and the event index
  tells every other process (``app.py``); a cookie kept from before is refused from then
  on. The cookie is
  ``HttpOnly``, ``SameSite=Strict``, limited to ``/console/``, and ``Secure`` when the
  request came over HTTPS (directly, or ``X-Forwarded-Proto: https`` from a proxy).
* **Failed logins are slowed down** without remembering anyone: each failure holds one of
  ``MAX_FAILING`` slots for ``FAILURE_DELAY_S`` before it is answered, and a check that
  finds every slot taken is answered 429 at once. Guessing is capped at about
  ``MAX_FAILING / FAILURE_DELAY_S`` tries a second from the whole internet, in constant
  memory (a per-address table would grow with the addresses an attacker has).
* **CSRF**: every state-changing form carries ``HMAC(token, "csrf:" + session)``, checked
  in constant time; a Bearer request carries no cookie and needs none.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from typing import Final

from aiohttp import web

_NONCE_CHARS: Final = 16
"""A session's random part: two logins in the same second are two sessions."""
COOKIE: Final = "pubrelay_console"
COOKIE_PATH: Final = "/console/"
FAILURE_DELAY_S: Final = 1.0
MAX_FAILING: Final = 4


class TooManyFailures(Exception):
    """Every failure slot is taken: answer 429 without checking."""


class Gate:
    """The token check, the sessions and the CSRF tokens of one console."""

    def __init__(
        self, token: str, *, session_ttl_s: float, failure_delay_s: float = FAILURE_DELAY_S
    ) -> None:
        self._token = token.encode()
        self._key = hashlib.sha256(b"pubrelay-console:" + self._token).digest()
        self.session_ttl_s = session_ttl_s
        self.failure_delay_s = failure_delay_s
        self._failing = asyncio.Semaphore(MAX_FAILING)
        self._ended: dict[str, int] = {}  # sessions logged out: their expiry

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    async def check_token(self, given: str) -> bool:
        """Whether ``given`` is the token; a wrong one is answered after the delay, and
        raises :class:`TooManyFailures` when too many wrong ones are being delayed."""
        if hmac.compare_digest(_raw(given), self._token):
            return True
        if self._failing.locked():
            raise TooManyFailures
        async with self._failing:
            await asyncio.sleep(self.failure_delay_s)
        return False

    def new_session(self, now: float | None = None) -> str:
        signed = f"{int((now or time.time()) + self.session_ttl_s)}.{secrets.token_hex(8)}"
        return f"{signed}.{self._mac('session', signed)}"

    def session_valid(self, value: str, now: float | None = None) -> bool:
        signed, _, mac = value.rpartition(".")
        expiry, nonce = _expiry_and_nonce(value)
        if not expiry.isdigit() or len(expiry) > 12 or len(nonce) != _NONCE_CHARS:
            return False
        if not hmac.compare_digest(_raw(mac), self._mac("session", signed).encode()):
            return False
        return int(expiry) > (now or time.time()) and value not in self._ended

    def end_session(self, value: str, now: float | None = None) -> tuple[str, int]:
        """Log ``value`` out: refused from now on by this process, until it would have
        expired anyway; returns its id and expiry, for the other processes (the event
        index remembers them). Only a valid session (with its CSRF token) gets here, so
        the ended ones are a few per operator; the expired ones are let go at each
        logout."""
        current = now or time.time()
        self._ended = {s: e for s, e in self._ended.items() if e > current}
        expiry, nonce = _expiry_and_nonce(value)
        self._ended[value] = int(expiry)
        return nonce, int(expiry)

    def csrf_token(self, session: str) -> str:
        return self._mac("csrf", session)

    def csrf_valid(self, session: str, given: str) -> bool:
        return hmac.compare_digest(_raw(given), self.csrf_token(session).encode())


def _expiry_and_nonce(value: str) -> tuple[str, str]:
    """A cookie's ``<expiry>.<nonce>`` parts, unchecked (``"", ""`` when it has fewer)."""
    signed = value.rpartition(".")[0]
    expiry, _, nonce = signed.partition(".")
    return expiry, nonce


def session_id(value: str) -> str:
    """A session's random part: what names it where logouts are shared (never the MAC)."""
    return _expiry_and_nonce(value)[1]


def _raw(text: str) -> bytes:
    """A header's or form's text as bytes to compare: aiohttp decodes header bytes that
    are not UTF-8 to surrogates, which a plain ``encode()`` refuses (that was a 500)."""
    return text.encode("utf-8", "surrogateescape")


def bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_session(
    response: web.StreamResponse, request: web.Request, value: str, ttl_s: float
) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(ttl_s),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a console path only (never another site), of
    printable ASCII only (a control character cannot go into ``Location``)."""
    if (
        target
        and target.startswith(COOKIE_PATH)
        and "//" not in target
        and "\\" not in target
        and target.isascii()
        and target.isprintable()
        and " " not in target
    ):
        return target
    return COOKIE_PATH
