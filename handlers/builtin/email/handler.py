"""The ``email`` handler: send the customer the code(s) a publication gave them.

Entry point ``email = "handlers.builtin.email:create"`` in group ``pubrelay.handlers``. It
acts on ``customer.publication.succeeded`` (one code for one customer) and the project-level
``publication.succeeded`` (one publication, possibly several codes: one e-mail lists them
all). A customer gets one e-mail per publication even when both events arrive for it:
the handler claims ``publication:<id>`` in the worker's ledger (``context.ledger``) before
sending, atomically across every worker process sharing the ledger, and marks it done
after: the sibling event finds it done (skipped, ``already_sent``) or, while the other
worker is still sending, held (retried a little later). The claim lasts three SMTP
timeouts and the send is cut at 80% of that, so two sends can never overlap; a worker
that dies mid-send delays the publication's e-mail by the claim's life at most. Without
a ledger (unit contexts) it remembers the publications of this process only, and says
so at start.

**Several codes.** An event that lacks some of its publication's codes (a
``customer.publication.succeeded`` carries one ``voucher`` while ``publication.vouchers_id``
lists them all: :mod:`~handlers.builtin.publication_codes`) sends no e-mail at once. If the
publication was already mailed (by its sibling ``publication.succeeded``, which lists every
code) it is skipped (``already_sent``). Otherwise, on its first attempt, it waits
``SIBLING_HOLD_S`` with ``RetryLater(keep_order=False)`` (unless ``EVENT_TYPES`` leaves out
``publication.succeeded``): it steps out of the customer's lane, so the sibling, queued
behind it for the same customer, is mailed meanwhile, and other customers are not held up;
its offset stays uncommitted and counts toward the worker's back-pressure. The hold is one
retry: it spends one of ``PUBRELAY_WORKER__MAX_ATTEMPTS`` (start-up refuses a hold with
``MAX_ATTEMPTS=1``) and is capped by ``PUBRELAY_WORKER__RETRY_MAX_DELAY_S``. A worker
restarted during a hold does not hold again (the attempts are counted durably). On the
next attempt it is skipped if the sibling was mailed; else the missing codes are read from
Voucherify's API when a key pair is configured (:mod:`~handlers.builtin.email.lookup`);
whatever is still missing, the e-mail goes out with the codes known, counted as
``outcome="partial"`` and logged (``email_sent_partial``) with the missing voucher ids.

The parts, one module each: :mod:`~handlers.builtin.email.settings` (``PUBRELAY_EMAIL__*``),
:mod:`~handlers.builtin.email.message` (whether an event gets an e-mail, and the message:
headers, and the names templates see), :mod:`~handlers.builtin.email.rendering` (the
Jinja2 templates and where they are looked up), :mod:`~handlers.builtin.email.smtp`
(delivery through the relay), :mod:`~handlers.builtin.publication_codes` (a publication's codes,
and which an event lacks), :mod:`~handlers.builtin.email.lookup` (missing codes from the
API), :mod:`~handlers.builtin.email.metrics`.

**Outcomes** (see :mod:`handlers.types`): sent -> returns. No address, an opted-out
customer, no code, a publication already mailed -> :class:`SkipEvent` (also counted in
``pubrelay_email_skipped_total{reason}``). 4xx, connection, TLS and AUTH failures ->
:class:`RetryLater`. A 5xx for recipient, sender or message, an unusable address, a
template bug -> :class:`HandlerError` (dead letter, with the reply or the template name).
Logs never carry a full address (``j***@example.com``) nor the password.

``pubrelay preview-email FILE`` renders what an event would send, without sending
(:mod:`handlers.builtin.email.preview`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn

from structlog.typing import FilteringBoundLogger

from handlers.builtin.email.lookup import VoucherLookup
from handlers.builtin.email.message import (
    Composed,
    MessageComposer,
    Skip,
    publication_key,
)
from handlers.builtin.email.metrics import EmailMetrics, email_metrics
from handlers.builtin.email.outbox import OUTBOX_DIR, OUTBOX_URL, OutboxTransport
from handlers.builtin.email.settings import EmailSettings, parse_smtp_url
from handlers.builtin.email.smtp import SmtpTransport
from handlers.builtin.publication_codes import PublicationCodes, publication_codes
from handlers.builtin.voucherify_api import VoucherifySettings
from handlers.types import Event, HandlerContext, KeyLedger
from schemas.errors import ConfigError, HandlerError, RetryLater, SkipEvent
from schemas.events import PUBLICATION_SUCCEEDED, WebhookEnvelope
from schemas.masking import mask_address

__all__ = ["EmailHandler", "create"]

_MEMORY_KEYS_MAX: Final = 10_000
"""Publications mailed by this process remembered in memory, newest first: a sibling event
comes soon after its twin; older ones are found in the ledger. (100,000 kept ~30 MB more
resident under a steady 200/s: docs/performance.md, "Memory".)"""
_CLAIM_TIMEOUTS: Final = 3
"""A publication's claim lasts this many SMTP timeouts (``PUBRELAY_EMAIL__TIMEOUT_S``)."""
_SEND_SHARE_OF_CLAIM: Final = 0.8
"""The send is cut at this share of the claim's life: it can never outlive the claim."""
_HELD_WAIT_S: Final = 10.0
"""How long a send waits for another worker mailing the same publication (polling), before
it is retried once that worker's claim would have expired."""
_HELD_POLL_S: Final = 0.5
_RECORD_RETRY_FIRST_S: Final = 0.05
_RECORD_RETRY_MAX_S: Final = 2.0
"""Recording a sent publication the store refused is retried after the first, doubling up
to the second."""


class _KeyLocks:
    """One lock per publication in flight: its two events never send concurrently."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class EmailHandler:
    """Renders and sends one e-mail per publication; one SMTP transport between start/stop."""

    def __init__(
        self,
        *,
        name: str,
        settings: EmailSettings,
        composer: MessageComposer,
        transport: SmtpTransport | OutboxTransport,
        ledger: KeyLedger | None,
        logger: FilteringBoundLogger,
        metrics: EmailMetrics,
        lookup: VoucherLookup | None = None,
    ) -> None:
        self.name = name
        self.event_types = frozenset(settings.event_types)
        self.settings = settings
        self.sender = composer.sender
        self.composer = composer
        self._transport = transport
        self._ledger = ledger
        self._log = logger
        self._m = metrics
        self._lookup = lookup
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._locks = _KeyLocks()
        self._claim_ttl_s = settings.timeout_s * _CLAIM_TIMEOUTS

    def __repr__(self) -> str:  # keeps settings (the password) out of any repr
        return f"EmailHandler(name={self.name!r}, relay={self._transport.where!r})"

    async def start(self) -> None:
        if self._ledger is None:
            self._log.warning(
                "email_dedupe_in_memory",
                reason="no ledger: one e-mail per publication holds within this process only",
            )
        await self._transport.start()
        if self._lookup is not None:
            await self._lookup.start()

    async def stop(self) -> None:
        if self._lookup is not None:
            await self._lookup.stop()
        await self._transport.stop()

    async def handle(self, event: Event) -> None:
        envelope = event.envelope
        skip = self.composer.skip_reason(envelope)
        if skip is not None:
            self._skip(skip)
        key = publication_key(envelope.data)
        if key is None:  # the worker's own (handler, event id) record still applies
            await self._compose_and_send(envelope)
            return
        async with self._locks.hold(key):
            if key in self._sent:
                self._skip(Skip("already_sent", f"an e-mail for {key} was already sent"))
            codes = publication_codes(envelope.data)
            if not codes.complete:
                codes = await self._complete(event, key, codes)
            token = secrets.token_hex(12)
            await self._claim(key, token)
            try:
                async with asyncio.timeout(self._claim_ttl_s * _SEND_SHARE_OF_CLAIM):
                    await self._compose_and_send(envelope, codes)
            except BaseException:
                await self._release(key, token)
                raise
            await self._remember(key)

    async def _complete(self, event: Event, key: str, codes: PublicationCodes) -> PublicationCodes:
        """The publication's codes for an event lacking some (see the module's text): skipped
        when the sibling was mailed, held once, then completed from the API if it can be."""
        if await self._mailed(key):
            self._skip(Skip("already_sent", f"an e-mail for {key} was already sent"))
        hold_s = self.settings.sibling_hold_s
        if event.attempt <= 1 and hold_s > 0 and PUBLICATION_SUCCEEDED in self.event_types:
            self._m.held.inc()
            self._log.info(
                "email_held_for_sibling",
                event_id=event.id,
                publication=key,
                codes=len(codes.vouchers),
                missing=len(codes.missing_ids),
                hold_s=hold_s,
            )
            raise RetryLater(
                f"{key}: {len(codes.missing_ids)} code(s) missing; waiting for the event "
                "that lists them all",
                delay_s=hold_s,
                keep_order=False,
            )
        if self._lookup is not None:
            codes = await self._lookup.complete(codes, event_id=event.id)
        return codes

    async def _mailed(self, key: str) -> bool:
        if key in self._sent:
            return True
        if self._ledger is None:
            return False
        try:
            return await self._ledger.is_done(self.name, key)
        except Exception as err:  # the store's own errors; the claim before sending asks again
            self._log.warning("email_dedupe_check_failed", key=key, error=repr(err))
            return False

    def _skip(self, skip: Skip) -> NoReturn:
        self._m.skipped.labels(skip.reason).inc()
        raise SkipEvent(skip.message)

    async def _claim(self, key: str, token: str) -> None:
        """Take the publication for this send, or raise: skipped when it was mailed, retried
        when another worker is mailing it now."""
        if self._ledger is None:
            return
        deadline = time.monotonic() + _HELD_WAIT_S
        while True:
            try:
                claim = await self._ledger.claim(self.name, key, token, ttl_s=self._claim_ttl_s)
            except Exception as err:  # the store's own error types; the worker would dead-letter
                raise RetryLater(
                    f"the ledger cannot tell whether {key} was mailed: {err!r}"
                ) from err
            if claim.state != "held" or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(claim.wait_s, _HELD_POLL_S))  # the sibling is being sent
        if claim.state == "done":
            self._sent[key] = None
            self._skip(Skip("already_sent", f"an e-mail for {key} was already sent"))
        if claim.state == "held":
            raise RetryLater(
                f"another worker is sending the e-mail for {key}",
                delay_s=max(claim.wait_s, 1.0),
            )

    async def _release(self, key: str, token: str) -> None:
        if self._ledger is None:
            return
        try:
            await self._ledger.release(self.name, key, token)
        except Exception as err:  # the claim expires by itself
            self._log.warning("email_release_failed", key=key, error=repr(err))

    async def _remember(self, key: str) -> None:
        self._sent[key] = None
        if len(self._sent) > _MEMORY_KEYS_MAX:
            self._sent.popitem(last=False)
        if self._ledger is None:
            return
        # The mail is out: failing now would only send it again, and giving up would let a
        # sibling event, on another worker or after a restart, send it again once the
        # claim expires. So the record is retried until the store takes it (a full disk,
        # a Redis away), bounded only by the worker's handler timeout and shutdown.
        delay_s = _RECORD_RETRY_FIRST_S
        failures = 0
        while True:
            try:
                await self._ledger.mark_done(self.name, key)
            except Exception as err:  # the store's own error types
                failures += 1
                if failures == 1:
                    self._log.warning("email_dedupe_record_retrying", key=key, error=repr(err))
                try:
                    await asyncio.sleep(delay_s)
                except asyncio.CancelledError:
                    self._log.error(
                        "email_dedupe_record_failed", key=key, failures=failures, error=repr(err)
                    )
                    raise
                delay_s = min(delay_s * 2, _RECORD_RETRY_MAX_S)
            else:
                if failures:
                    self._log.info("email_dedupe_recorded", key=key, failures=failures)
                return

    async def _compose_and_send(
        self, envelope: WebhookEnvelope[Any], codes: PublicationCodes | None = None
    ) -> None:
        try:
            composed = self.composer.compose(envelope, codes.vouchers if codes else None)
        except HandlerError as err:
            self._m.messages.labels("template_error").inc()
            self._log.error("email_not_composed", event_id=envelope.event_id, error=str(err))
            raise
        await self._send(composed, envelope.event_id, codes.missing_ids if codes else ())

    async def _send(self, composed: Composed, event_id: str, missing: tuple[str, ...]) -> None:
        raw = composed.raw
        masked = mask_address(composed.recipient)
        started = time.perf_counter()
        try:
            reply = await self._transport.send(self.sender.address, composed.recipient, raw)
        except RetryLater as err:
            self._m.messages.labels("deferred").inc()
            self._log.warning("email_deferred", event_id=event_id, to=masked, error=str(err))
            raise
        except HandlerError as err:
            self._m.messages.labels("rejected").inc()
            self._log.warning("email_rejected", event_id=event_id, to=masked, error=str(err))
            raise
        elapsed = time.perf_counter() - started
        self._m.duration.observe(elapsed)
        self._m.messages.labels("partial" if missing else "sent").inc()
        (self._log.warning if missing else self._log.info)(
            "email_sent_partial" if missing else "email_sent",
            event_id=event_id,
            to=masked,
            message_id=composed.message_id,
            templates=list(composed.templates),
            duration_ms=round(elapsed * 1000, 1),
            reply=reply,
            **({"missing_voucher_ids": list(missing)} if missing else {}),
        )


def create(context: HandlerContext) -> EmailHandler:
    """Entry point ``email`` in group ``pubrelay.handlers`` (see ``pyproject.toml``)."""
    settings = context.settings(EmailSettings)
    if (
        settings.sibling_hold_s > 0
        and context.max_attempts is not None
        and context.max_attempts < 2
    ):
        raise ConfigError(
            f"{context.env_prefix}SIBLING_HOLD_S={settings.sibling_hold_s:g} spends one of "
            f"PUBRELAY_WORKER__MAX_ATTEMPTS={context.max_attempts}, leaving none to send the "
            f"e-mail: set MAX_ATTEMPTS to 2 or more, or {context.env_prefix}SIBLING_HOLD_S=0"
        )
    composer = MessageComposer.from_settings(settings, context.env_prefix)
    metrics = email_metrics(context.metrics_registry)
    transport: SmtpTransport | OutboxTransport
    if settings.smtp_url == OUTBOX_URL:
        transport = OutboxTransport(context.data_dir / OUTBOX_DIR)
    else:
        transport = SmtpTransport(
            settings,
            parse_smtp_url(settings.smtp_url),
            logger=context.logger,
            on_connect=metrics.connections.inc,
        )
    api = context.shared_settings(VoucherifySettings, "voucherify")
    lookup = (
        VoucherLookup(api, logger=context.logger, lookups=metrics.lookups)
        if api.configured
        else None
    )
    return EmailHandler(
        name=context.name,
        settings=settings,
        composer=composer,
        transport=transport,
        ledger=context.ledger,
        logger=context.logger,
        metrics=metrics,
        lookup=lookup,
    )
