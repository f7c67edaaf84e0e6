"""From a publication event to the e-mail the customer gets (no I/O; no sending).

:class:`MessageComposer` decides whether an event gets an e-mail at all
(:meth:`~MessageComposer.skip_reason`), builds the template context, renders the
subject, text and HTML parts (:mod:`handlers.builtin.email.rendering`) and assembles one
``multipart/alternative`` message with its headers, as bytes
(:mod:`handlers.builtin.email.mime`). The
handler and the ``pubrelay preview-email`` command share it, so a preview is exactly
what would be sent.

**What templates see** (:meth:`MessageComposer.context`; where templates are looked up
is :mod:`handlers.builtin.email.rendering`):

* ``customer``, ``campaign``, ``publication``: the event's models
  (:mod:`schemas.customer`...), empty when the event lacks them; ``metadata`` is ``{}``
  rather than ``None``, so ``customer.metadata.tier`` works or fails clearly.
* ``voucher``: the (first) code, a :class:`VoucherView`:
  ``code``, ``discount`` (``"10% off"``, ``"$10.00 off"``), ``expires`` (formatted date
  or none), ``starts``, ``details`` (``"10% off, valid until 2024-12-31"``), ``model``.
* ``vouchers`` and ``codes``: every code of the publication, each once
  (:mod:`handlers.builtin.publication_codes`; the handler completes a
  ``customer.publication.succeeded`` of a multi-code publication before composing).
* ``channel``, ``event`` (``event.id``, ``event.created_at``...), ``event_id``,
  ``event_type``, ``sender``, ``list_unsubscribe_urls`` (the URIs of the
  ``List-Unsubscribe`` header, possibly none), ``list_unsubscribe_url`` (the first https
  one of them, else the first, or none: a link for the bodies) and, in the bodies,
  ``subject``.

The message is ``multipart/alternative`` (text, then HTML) with ``From``, ``To``
(customer name and address), ``Reply-To``, ``Subject``, ``Date``, ``Auto-Submitted``,
``List-Unsubscribe`` when configured (:func:`unsubscribe_uris`), and ``Message-ID:
<pubrelay.<publication id>@<sender domain>>``, the same for every resend of a
publication.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Final, Literal, TypeVar
from urllib.parse import quote

from handlers.builtin.email.mime import fold_header, header_line, multipart_alternative
from handlers.builtin.email.rendering import TemplateRenderer, render_template, template_bases
from handlers.builtin.email.settings import EmailSettings, SenderAddress, parse_sender
from handlers.builtin.publication_codes import PublicationData, publication_codes
from schemas.campaign import Campaign
from schemas.customer import Customer
from schemas.errors import HandlerError
from schemas.events import WebhookEnvelope
from schemas.masking import mask_address
from schemas.publication import Publication
from schemas.voucher import Voucher

__all__ = [
    "Composed",
    "MessageComposer",
    "Skip",
    "SkipReason",
    "VoucherView",
    "publication_key",
    "unsubscribe_uris",
]

SkipReason = Literal["unsupported_event", "no_address", "opted_out", "no_code", "already_sent"]
SKIP_REASONS: Final[tuple[SkipReason, ...]] = (
    "unsupported_event",
    "no_address",
    "opted_out",
    "no_code",
    "already_sent",
)
_TRUTHY: Final = frozenset({"true", "yes", "1"})
_MSGID_RE: Final = re.compile(r"[^A-Za-z0-9._-]+")
_SPACE_RE: Final = re.compile(r"\s+")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")
_NAME_SPECIALS_RE: Final = re.compile(r'[,;:<>@"()\[\]\\]+|=\?')
"""What could end a display name and start another address. Python's folding of a long
``To`` drops the quotes around a display name, so ``Doe, x@evil.example,`` became two
more recipients in the customer's mail client (the SMTP envelope never changed); an
encoded word (``=?utf-8?q?Doe=2C_x=40evil.example?=``) is decoded before the folding."""
_URI_ITEM_RE: Final = re.compile(r"<([^<>]*)>|([^,<>]+)")
_AUTO_SUBMITTED: Final = b"Auto-Submitted: auto-generated\r\n"
_ONE_CLICK: Final = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
# RFC 3986's characters of a URI but the comma, which separates the URIs of the header.
_URI_SAFE: Final = ":/?#[]@!$&'()*+;=%"


def publication_key(data: PublicationData) -> str | None:
    """The de-duplication key ``publication:<id>``: one e-mail per publication."""
    pub = data.publication
    return f"publication:{pub.id}" if pub is not None and pub.id else None


@dataclass(frozen=True, slots=True)
class Skip:
    """Why an event gets no e-mail: ``reason`` is a metric label, ``message`` for people."""

    reason: SkipReason
    message: str


@dataclass(frozen=True, slots=True)
class VoucherView:
    """One code as templates see it; amounts and dates already rendered for people.

    ``discount`` is ``"10% off"``, ``"$10.00 off"``, ``"50.00 gift card"``... (``None`` if
    unknown), ``expires`` the expiry date in ``DATE_FORMAT`` (``None``: no expiry),
    ``details`` both joined (``"10% off, valid until 2024-12-31"``), ``model`` the full
    :class:`schemas.voucher.Voucher`.
    """

    code: str
    discount: str | None
    expires: str | None
    starts: str | None
    expiration_date: datetime | None
    start_date: datetime | None
    type: str | None
    model: Voucher

    @property
    def details(self) -> str:
        parts = [self.discount] if self.discount else []
        if self.expires:
            parts.append(f"valid until {self.expires}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Composed:
    """A message ready to send (``raw``, CRLF line ends), its ``Message-ID``, the bare
    recipient address and the templates used."""

    raw: bytes
    message_id: str
    recipient: str
    templates: tuple[str, ...]

    @property
    def message(self) -> EmailMessage:
        """``raw`` parsed, with the line ends of Python's text (the preview)."""
        parsed = message_from_bytes(self.raw.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class MessageComposer:
    """Renders the e-mail of one publication event."""

    def __init__(
        self,
        settings: EmailSettings,
        sender: SenderAddress,
        renderer: TemplateRenderer,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.renderer = renderer
        self._clock = clock or (lambda: datetime.now(UTC))
        # the headers every message shares, folded once (handlers/builtin/email/mime.py)
        self._from = fold_header("From", sender.header)
        self._reply_to = [fold_header("Reply-To", settings.reply_to)] if settings.reply_to else []
        self._unsubscribe = (
            renderer.compile_url(settings.list_unsubscribe, "PUBRELAY_EMAIL__LIST_UNSUBSCRIBE")
            if settings.list_unsubscribe
            else None
        )

    @classmethod
    def from_settings(
        cls,
        settings: EmailSettings,
        env_prefix: str,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> MessageComposer:
        """The composer of the ``email`` handler and the preview: the sender checked and
        every template compiled now, so a mistake stops start-up (:class:`ConfigError`
        naming the variable, ``<env_prefix>SENDER``, or the template)."""
        sender = parse_sender(settings.sender, f"{env_prefix}SENDER")
        renderer = TemplateRenderer(settings.template_dir)
        renderer.check()
        return cls(settings, sender, renderer, clock=clock)

    # --- whether to send ---------------------------------------------------------------------

    def skip_reason(self, envelope: WebhookEnvelope[Any]) -> Skip | None:
        """``None`` when the event gets an e-mail, else why not (never retried)."""
        data = envelope.data
        if not isinstance(data, PublicationData):
            return Skip("unsupported_event", f"event type {envelope.event_type!r} sends no e-mail")
        address = (data.customer_email or "").strip()
        if not address:
            return Skip("no_address", "the customer has no e-mail address")
        if self._opted_out(data):
            key = self.settings.opt_out_metadata_key
            return Skip("opted_out", f"the customer opted out of e-mail (metadata {key!r})")
        if not publication_codes(data).vouchers:
            return Skip("no_code", "the publication carries no code")
        return None

    def _opted_out(self, data: PublicationData) -> bool:
        key = self.settings.opt_out_metadata_key
        sources = [data.customer]
        if data.publication is not None:
            sources.append(data.publication.customer)
        for customer in sources:
            if customer is not None and customer.metadata and key in customer.metadata:
                return _truthy(customer.metadata[key])
        return False

    # --- what to send ------------------------------------------------------------------------

    def compose(
        self, envelope: WebhookEnvelope[Any], vouchers: Sequence[Voucher] | None = None
    ) -> Composed:
        """The message for ``envelope``; call after :meth:`skip_reason` returned ``None``.
        ``vouchers`` replaces the codes the event carries (the publication's codes, completed).

        Raises :class:`HandlerError` for a template bug or an address that cannot be used.
        """
        data = envelope.data
        if not isinstance(data, PublicationData):
            raise HandlerError(f"event type {envelope.event_type!r} sends no e-mail")
        address = _recipient(data)
        recipient = address.addr_spec
        context = self.context(envelope, data, vouchers)
        bases = template_bases(
            context["campaign"].id, context["campaign"].name, data.channel or None
        )
        subject = self.renderer.render("subject", bases, context)
        context["subject"] = _one_line(subject.text)
        text = self.renderer.render("text", bases, context)
        html = self.renderer.render("html", bases, context)

        message_id = self.message_id(envelope, data)
        name = context["customer"].name or ""
        to = Address(
            display_name=_one_line(_NAME_SPECIALS_RE.sub(" ", _CONTROL_RE.sub(" ", name))),
            username=address.username,  # parsed once, in _recipient
            domain=address.domain,
        )
        headers = [
            self._from,
            header_line("To", to),
            *self._reply_to,
            header_line("Subject", context["subject"]),
            header_line("Date", format_datetime(self._clock())),
            header_line("Message-ID", message_id),
            _AUTO_SUBMITTED,
            header_line("X-Pubrelay-Event-Id", _MSGID_RE.sub("-", envelope.event_id)),
        ]
        uris: list[str] = context["list_unsubscribe_urls"]
        if uris:
            headers.append(header_line("List-Unsubscribe", ", ".join(f"<{u}>" for u in uris)))
            if self.settings.list_unsubscribe_one_click and any(map(_is_https, uris)):
                headers.append(_ONE_CLICK)
        return Composed(
            raw=multipart_alternative(headers, text.text, html.text),
            message_id=message_id,
            recipient=recipient,
            templates=(subject.name, text.name, html.name),
        )

    def message_id(self, envelope: WebhookEnvelope[Any], data: PublicationData) -> str:
        """``<pubrelay.<publication id>@<sender domain>>``: a resend carries the same id."""
        pub = data.publication
        ident = pub.id if pub is not None and pub.id else f"event.{envelope.event_id}"
        return f"<pubrelay.{_MSGID_RE.sub('-', ident)}@{self.sender.domain}>"

    def context(
        self,
        envelope: WebhookEnvelope[Any],
        data: PublicationData,
        vouchers: Sequence[Voucher] | None = None,
    ) -> dict[str, Any]:
        """The names templates see; missing objects are empty models, never ``None``."""
        customer = data.customer
        pub = data.publication or Publication()
        if customer is None:
            customer = pub.customer or Customer()
        campaign = data.campaign or Campaign()
        if vouchers is None:
            vouchers = publication_codes(data).vouchers
        views = [self._view(v, campaign) for v in vouchers]
        context: dict[str, Any] = {
            "customer": _with_metadata(customer),
            "campaign": _with_metadata(campaign),
            "publication": _with_metadata(pub),
            "voucher": views[0] if views else None,
            "vouchers": views,
            "codes": [v.code for v in views],
            "channel": data.channel,
            "event": envelope.event,
            "event_id": envelope.event_id,
            "event_type": envelope.event_type,
            "sender": self.sender.address,
            "list_unsubscribe_urls": [],
            "list_unsubscribe_url": None,
        }
        if self._unsubscribe is not None:
            url = render_template(self._unsubscribe, "PUBRELAY_EMAIL__LIST_UNSUBSCRIBE", context)
            uris = unsubscribe_uris(url)
            context["list_unsubscribe_urls"] = uris
            context["list_unsubscribe_url"] = next(
                filter(_is_https, uris), uris[0] if uris else None
            )
        return context

    def _view(self, voucher: Voucher, campaign: Campaign) -> VoucherView:
        symbol = self.settings.currency_symbol or None
        discount = voucher.describe(symbol)
        template = campaign.voucher
        if discount is None and template is not None:
            # publication.succeeded may list bare codes: the campaign says what they are worth
            discount = Voucher.model_construct(
                code=voucher.code,
                type=template.type,
                discount=template.discount,
                gift=template.gift,
                loyalty_card=template.loyalty_card,
            ).describe(symbol)
        expires = voucher.expiration_date or campaign.expiration_date
        starts = voucher.start_date or campaign.start_date
        return VoucherView(
            code=voucher.code,
            discount=discount,
            expires=self._date(expires),
            starts=self._date(starts),
            expiration_date=expires,
            start_date=starts,
            type=voucher.type,
            model=voucher,
        )

    def _date(self, moment: datetime | None) -> str | None:
        return moment.strftime(self.settings.date_format) if moment is not None else None


def _truthy(value: Any) -> bool:
    """Opt-out values: ``true``, ``"true"``, ``"yes"``, ``1`` (any case); anything else no."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    if isinstance(value, str):
        return value.strip().lower() in _TRUTHY
    return False


def _recipient(data: PublicationData) -> Address:
    """The address (its ``addr_spec`` is the bare address), checked: HandlerError when no
    relay could deliver to it."""
    address = (data.customer_email or "").strip()
    masked = mask_address(address)
    if not address.isascii():
        raise HandlerError(f"the customer's address {masked} is not ASCII (SMTPUTF8 unsupported)")
    try:
        parsed = Address(addr_spec=address)
    except (ValueError, IndexError):
        raise HandlerError(f"the customer's address {masked} is not a valid address") from None
    if not parsed.username or not parsed.domain or parsed.addr_spec != address:
        raise HandlerError(f"the customer's address {masked} is not a valid address")
    return parsed


_WithMetadata = TypeVar("_WithMetadata", Customer, Campaign, Publication)


def _with_metadata(model: _WithMetadata) -> _WithMetadata:
    """``{{ customer.metadata.tier }}`` must not fail on a customer without metadata."""
    if model.metadata is None:
        return model.model_copy(update={"metadata": {}})
    return model


def _one_line(text: str) -> str:
    """Header values are one line: collapse the whitespace a template leaves."""
    return _SPACE_RE.sub(" ", text).strip()


def unsubscribe_uris(rendered: str) -> list[str]:
    """The URIs of a rendered ``LIST_UNSUBSCRIBE``: ``a, b``, ``<a>, <b>`` or both mixed.

    The template percent-encoded every value it interpolated, so the separators come from
    the operator's text only. As a second guard each URI is made one header-safe token: a
    character outside RFC 3986 (a space, ``<``, ``>``, ``"``, a control) or a comma left in
    it is percent-encoded, so the header ``<a>, <b>`` (RFC 2369) lists exactly these URIs.
    """
    text = _one_line(rendered)
    items = (wrapped or bare for wrapped, bare in _URI_ITEM_RE.findall(text))
    return [quote(item.strip(), safe=_URI_SAFE) for item in items if item.strip()]


def _is_https(uri: str) -> bool:
    return uri[:8].lower() == "https://"
