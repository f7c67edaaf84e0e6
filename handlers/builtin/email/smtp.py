"""SMTP delivery for the ``email`` handler: kept-open connections, a rate limit, and the
mapping of SMTP replies onto the worker's retry policy.

One :class:`SmtpTransport` keeps up to ``CONNECTIONS`` aiosmtplib connections open and
sends each message as one ``MAIL``/``RCPT``/``DATA`` transaction on one of them, so a
burst of events does not pay a TCP and TLS handshake (and AUTH) per message. A
connection the relay dropped while idle is re-opened before the next message; if the
drop is only noticed at ``MAIL FROM`` (nothing was accepted yet) the message is sent
again at once on a fresh connection.

What :meth:`SmtpTransport.send` raises:

* :class:`RetryLater`: a 4xx reply, a dropped connection, a timeout, the relay
  unreachable, TLS or AUTH failing (a fault of the relay or its configuration, not of
  the event: the worker retries, then dead-letters, and ``pubrelay replay`` resends).
* :class:`HandlerError` carrying the relay's reply (code and text, addresses masked): a
  5xx for the recipient, the sender or the message. Permanent for this event.

A connection drop after ``DATA`` was sent but before the relay answered leaves it
unknown whether the message was accepted; the retry may deliver it twice, with the same
``Message-ID`` so the copy is recognisable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Final

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPNotSupported,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol
from structlog.typing import FilteringBoundLogger

from handlers.builtin.email.settings import EmailSettings, SmtpEndpoint
from handlers.builtin.ratelimit import RateLimiter
from schemas.errors import HandlerError, RetryLater
from schemas.masking import mask_emails

__all__ = ["SmtpTransport"]

_SERVICE_CLOSING: Final = 421
_REPLY_MAX: Final = 300
_STARTTLS: Final = {"auto": None, "always": True, "never": False}
_CLOSE_WAIT_S: Final = 2.0


class _RelayUnavailable(Exception):
    """Opening a usable connection failed; the message says why (no secrets)."""


def _reply(err: SMTPResponseException) -> str:
    """``550 5.1.1 <j***@example.com>: Recipient address rejected``, bounded."""
    text = " ".join(str(err.message).split())
    return f"{err.code} {mask_emails(text)[:_REPLY_MAX]}".strip()


class SmtpTransport:
    """Sends raw messages through the configured relay; one instance per handler."""

    def __init__(
        self,
        settings: EmailSettings,
        endpoint: SmtpEndpoint,
        *,
        logger: FilteringBoundLogger,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self._log = logger
        self._on_connect = on_connect or (lambda: None)
        self._limiter = RateLimiter(1, 1.0 / settings.max_per_s) if settings.max_per_s > 0 else None
        self._clients: list[aiosmtplib.SMTP | None] = [None] * settings.connections
        self._free: asyncio.Queue[int] | None = None
        self._tls: ssl.SSLContext | None = None
        self._running = False
        self._closing: set[SMTPProtocol] = set()

    def __repr__(self) -> str:  # keeps the password out of any repr
        return f"SmtpTransport(host={self.endpoint.host!r}, port={self.endpoint.port})"

    @property
    def where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    async def start(self) -> None:
        """Prepare; connections open on the first message (the relay may be down now)."""
        if self._running:
            return
        if self._tls is None and (self.endpoint.implicit_tls or self.settings.starttls != "never"):
            self._tls = await asyncio.to_thread(self._tls_context)
        self._free = asyncio.Queue()
        for slot in range(len(self._clients)):
            self._free.put_nowait(slot)
        self._running = True

    async def stop(self) -> None:
        """QUIT every open connection, then wait (bounded) until their sockets are closed."""
        self._running = False
        for slot, client in enumerate(self._clients):
            self._clients[slot] = None
            if client is not None:
                await self._shut(client)
        await asyncio.sleep(0)  # closes scheduled by failed sends (see _shut)
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while self._closing and time.monotonic() < deadline:
            self._closing = {p for p in self._closing if p.transport is not None}
            if self._closing:
                await asyncio.sleep(0.01)
        self._closing.clear()

    async def _shut(self, client: aiosmtplib.SMTP) -> None:
        """QUIT politely (the relay then closes its side at once), else just close."""
        protocol = client.protocol  # QUIT closes the client, and forgets the protocol
        if client.is_connected:
            with contextlib.suppress(SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(client.quit(), min(self.settings.timeout_s, _CLOSE_WAIT_S))
        client.close()
        self._track(protocol)
        # A failed connect or TLS handshake has already scheduled its socket's close on
        # the loop: let it run now, not after the loop may have ended.
        await asyncio.sleep(0)

    def _close(self, client: aiosmtplib.SMTP) -> None:
        protocol = client.protocol
        client.close()
        self._track(protocol)

    def _track(self, protocol: SMTPProtocol | None) -> None:
        """Remember a closed connection until its socket is really gone (a TLS shutdown
        takes a round trip), so :meth:`stop` does not leave sockets behind."""
        self._closing = {p for p in self._closing if p.transport is not None}
        if protocol is not None and protocol.transport is not None:
            self._closing.add(protocol)

    def _tls_context(self) -> ssl.SSLContext:
        ca = str(self.settings.ca_file) if self.settings.ca_file is not None else None
        context = ssl.create_default_context(cafile=ca)
        if not self.settings.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # --- sending ---------------------------------------------------------------------------

    async def send(self, sender: str, recipient: str, message: bytes) -> str:
        """One transaction; returns the relay's reply to ``DATA`` (its queue id, usually)."""
        free = self._free
        if not self._running or free is None:
            raise RetryLater("the email handler is not running")
        if self._limiter is not None:
            await self._limiter.acquire()
        slot = await free.get()
        try:
            return await self._transaction(slot, sender, recipient, message)
        finally:
            free.put_nowait(slot)

    async def _transaction(self, slot: int, sender: str, recipient: str, message: bytes) -> str:
        client = self._clients[slot]
        reused = client is not None and client.is_connected
        try:
            if client is None or not reused:
                client = await self._connect(slot)
            try:
                await client.mail(sender)
            except (SMTPServerDisconnected, SMTPSenderRefused) as err:
                closing = isinstance(err, SMTPServerDisconnected) or err.code == _SERVICE_CLOSING
                if not (reused and closing):
                    raise
                # The relay closed the idle connection; nothing was accepted: go again.
                self._log.info("email_smtp_reconnect", relay=self.where)
                self._discard(slot)
                client = await self._connect(slot)
                await client.mail(sender)
            await client.rcpt(recipient)
            response = await client.data(message)
        except _RelayUnavailable as err:
            raise RetryLater(str(err)) from err
        except SMTPResponseException as err:
            await self._after_refusal(slot, err)
            raise self._refusal(err) from err
        except (SMTPException, OSError, TimeoutError) as err:
            self._discard(slot)
            raise RetryLater(
                f"SMTP relay {self.where} failed: {type(err).__name__}: {mask_emails(str(err))}"
            ) from err
        return " ".join(str(response.message).split())

    def _refusal(self, err: SMTPResponseException) -> HandlerError | RetryLater:
        reply = _reply(err)
        if isinstance(err, SMTPRecipientRefused):
            what = "the recipient"
        elif isinstance(err, SMTPSenderRefused):
            what = "the sender"
        else:
            what = "the message"
        if 400 <= err.code < 500:
            return RetryLater(f"SMTP relay deferred {what}: {reply}")
        return HandlerError(f"SMTP relay refused {what}: {reply}")

    async def _after_refusal(self, slot: int, err: SMTPResponseException) -> None:
        """Keep the connection for the next message: end the failed transaction (RSET)."""
        client = self._clients[slot]
        if client is None or not client.is_connected or err.code == _SERVICE_CLOSING:
            self._discard(slot)
            return
        try:
            await client.rset()
        except (SMTPException, OSError, TimeoutError):
            self._discard(slot)

    def _discard(self, slot: int) -> None:
        client, self._clients[slot] = self._clients[slot], None
        if client is not None:
            self._close(client)

    async def _open(self, slot: int) -> aiosmtplib.SMTP:
        """Connect, upgrade (STARTTLS), log in; a half-open connection is shut on failure."""
        self._discard(slot)
        settings, endpoint = self.settings, self.endpoint
        client = aiosmtplib.SMTP(
            hostname=endpoint.host,
            port=endpoint.port,
            use_tls=endpoint.implicit_tls,
            start_tls=False if endpoint.implicit_tls else _STARTTLS[settings.starttls],
            tls_context=self._tls,
            local_hostname=settings.helo_hostname,
            timeout=settings.timeout_s,
        )
        try:
            await client.connect()
            if settings.username:
                await self._login(client)
        except asyncio.CancelledError:
            self._close(client)
            raise
        except Exception:
            await self._shut(client)
            raise
        return self._connected(slot, client)

    async def _connect(self, slot: int) -> aiosmtplib.SMTP:
        """A connected (and, with a USERNAME, logged-in) client in ``slot``."""
        try:
            return await self._open(slot)
        except _RelayUnavailable:
            raise
        except SMTPAuthenticationError as err:
            self._log.error("email_smtp_auth_rejected", relay=self.where, reply=_reply(err))
            raise _RelayUnavailable(
                f"SMTP relay {self.where} rejected the credentials ({_reply(err)}): check "
                "PUBRELAY_EMAIL__USERNAME and PUBRELAY_EMAIL__PASSWORD"
            ) from err
        except SMTPNotSupported as err:
            self._log.error("email_smtp_not_supported", relay=self.where, error=str(err))
            raise _RelayUnavailable(f"SMTP relay {self.where}: {err}") from err
        except SMTPResponseException as err:
            raise _RelayUnavailable(
                f"SMTP relay {self.where} refused the connection: {_reply(err)}"
            ) from err
        except (SMTPException, OSError, TimeoutError) as err:
            self._log.warning(
                "email_smtp_unreachable", relay=self.where, error_type=type(err).__name__
            )
            raise _RelayUnavailable(
                f"cannot reach SMTP relay {self.where}: {type(err).__name__}: {err}"
            ) from err

    def _connected(self, slot: int, client: aiosmtplib.SMTP) -> aiosmtplib.SMTP:
        self._clients[slot] = client
        self._on_connect()
        self._log.debug("email_smtp_connected", relay=self.where, slot=slot)
        return client

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        settings = self.settings
        encrypted = self.endpoint.implicit_tls or client.get_transport_info("sslcontext")
        if not encrypted and not settings.allow_plaintext_auth:
            self._log.error("email_smtp_plaintext_auth_refused", relay=self.where)
            raise _RelayUnavailable(
                f"SMTP relay {self.where} offers no TLS: the password is not sent in clear "
                "text (use smtps://, PUBRELAY_EMAIL__STARTTLS=always, or set "
                "PUBRELAY_EMAIL__ALLOW_PLAINTEXT_AUTH=true for a trusted network)"
            )
        password = settings.password.get_secret_value() if settings.password else ""
        await client.login(str(settings.username), password)
