"""The built-in ``metrics`` handler: Prometheus counts of published codes for ops dashboards.

Enabled as ``metrics`` (entry point ``metrics = "handlers.builtin.metrics:create"``). Its
series count publications; the worker's own series (handled, retried, dead-lettered...)
are :mod:`handlers.worker.metrics`, the webhook consumer's :mod:`consumer.metrics`.

What it exports, on the worker's registry:

* ``pubrelay_publications_total{event_type, channel, campaign, voucher_type}``: one per
  publication *event*. A ``publication.succeeded`` of several codes (the publish API with
  ``count > 1``) is one publication, as Voucherify's dashboard lists it;
* ``pubrelay_publication_codes_total{...same labels}``: the codes those events assigned,
  so "codes handed out" is ``sum(rate(..codes_total))``, not a guess;
* ``pubrelay_publication_discount_amount`` (currency units, from the cents Voucherify sends)
  and ``pubrelay_publication_discount_percent``: histograms of the discount of each
  published code, AMOUNT and PERCENT discounts only (two histograms, because one metric
  must not mix units); dynamic discounts given only by a formula are not observed;
* ``pubrelay_publication_latency_seconds{event_type}``: from ``event.created_at`` at
  Voucherify to the end of handling here, end to end (delivery, bus, worker queue);
* ``pubrelay_publication_labels_capped_total{label}``: values folded into ``other``, the
  sign that an allowlist should be configured.

Label values must stay few (every value is a time series). ``channel`` is free text and
campaigns come and go, so each is capped: to ``PUBRELAY_METRICS__CHANNELS`` /
``PUBRELAY_METRICS__CAMPAIGNS`` (JSON lists) when set, otherwise to the first
``PUBRELAY_METRICS__TOP_N`` (default 20) distinct values this process has seen, but
never one holding an ``@`` (an address is a customer's data). Everything else is
``other``; a missing value is ``unknown``. ``voucher_type`` keeps Voucherify's three
types. The first-seen set is per process and starts over on restart, so allowlists are
what keeps dashboards stable.

If a project sends both ``customer.publication.succeeded`` and ``publication.succeeded``
for the same publications, either filter queries by ``event_type`` or narrow the handler
with ``PUBRELAY_METRICS__EVENT_TYPES='["customer.publication.succeeded"]'``.

The counters are incremented once per event id because the worker's ledger calls a
handler once per event; a crash between ``handle`` and the ledger write may count one
event twice, which a dashboard tolerates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, Field
from structlog.typing import FilteringBoundLogger

from handlers.types import Event, HandlerContext
from schemas.errors import SkipEvent
from schemas.events import (
    CustomerPublicationSucceededData,
    PublicationSucceededData,
)
from schemas.voucher import (
    DISCOUNT_VOUCHER,
    GIFT_VOUCHER,
    LOYALTY_CARD,
    AmountDiscount,
    PercentDiscount,
    Voucher,
)

OTHER: Final = "other"
UNKNOWN: Final = "unknown"
MAX_LABEL_CHARS: Final = 100
"""Longer values are folded into ``other``: they are not names a dashboard can show."""

VOUCHER_TYPES: Final = (DISCOUNT_VOUCHER, GIFT_VOUCHER, LOYALTY_CARD)
LABELS: Final = ("event_type", "channel", "campaign", "voucher_type")
CAPPED_LABELS: Final = ("channel", "campaign", "voucher_type")

_AMOUNT_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 25, 30, 50, 75, 100, 150, 250, 500, 1000, 5000)
_PERCENT_BUCKETS: Final = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 90, 100)
_LATENCY_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400)

_HINTS: Final = {
    "channel": "set PUBRELAY_METRICS__CHANNELS to the channels to show",
    "campaign": "set PUBRELAY_METRICS__CAMPAIGNS to the campaigns to show",
    "voucher_type": "a voucher type this version does not know",
}

PublicationEventType = Literal["customer.publication.succeeded", "publication.succeeded"]
PUBLICATION_EVENT_TYPES: Final[tuple[PublicationEventType, ...]] = (
    "customer.publication.succeeded",
    "publication.succeeded",
)


class PublicationMetricsSettings(BaseModel):
    """``PUBRELAY_METRICS__*``; lists are JSON (``'["API", "Automation"]'``)."""

    channels: list[str] = Field(
        default_factory=list,
        description="publication channels kept as label values; empty: the first TOP_N seen",
    )
    campaigns: list[str] = Field(
        default_factory=list,
        description="campaign names (or ids) kept as label values; empty: the first TOP_N seen",
    )
    top_n: int = Field(
        default=20, ge=0, le=500, description="distinct values per label when its list is empty"
    )
    event_types: list[PublicationEventType] = Field(
        default_factory=lambda: list(PUBLICATION_EVENT_TYPES),
        min_length=1,
        description="the publication events counted",
    )


class LabelCap:
    """Maps the unbounded values of one label onto a bounded set.

    With an allowlist, only its values pass; without, the first ``top_n`` distinct
    values pass, except one holding an ``@``. Everything else becomes ``other`` (counted
    on ``on_capped``), a missing or blank value ``unknown``.
    """

    def __init__(
        self,
        label: str,
        *,
        allowlist: Iterable[str],
        top_n: int,
        on_capped: Callable[[str, str], None] | None = None,
    ) -> None:
        self.label = label
        self.allowlist = frozenset(allowlist)
        self.top_n = top_n
        self.seen: set[str] = set()
        self._on_capped = on_capped

    def __call__(self, value: str | None, *aliases: str | None) -> str:
        """The label value for ``value``; ``aliases`` (an id) may match the allowlist too."""
        text = value.strip() if value else ""
        if not text:
            return UNKNOWN
        if self.allowlist:
            if text in self.allowlist or any(a in self.allowlist for a in aliases if a):
                return text
        elif text in self.seen:
            return text
        elif len(self.seen) < self.top_n and len(text) <= MAX_LABEL_CHARS and "@" not in text:
            # An address-shaped value is a customer's data (channel is whatever the caller
            # of Voucherify's publish API wrote): never a label unless allowlisted.
            self.seen.add(text)
            return text
        if self._on_capped is not None:
            self._on_capped(self.label, text)
        return OTHER


class PublicationMetrics:
    """The handler's Prometheus series, registered on an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.publications = Counter(
            "pubrelay_publications_total",
            "Publication events (one per event, however many codes it assigned).",
            LABELS,
            registry=registry,
        )
        self.codes = Counter(
            "pubrelay_publication_codes_total",
            "Codes assigned by publication events.",
            LABELS,
            registry=registry,
        )
        self.discount_amount = Histogram(
            "pubrelay_publication_discount_amount",
            "Amount off of each published AMOUNT discount code, in currency units.",
            buckets=_AMOUNT_BUCKETS,
            registry=registry,
        )
        self.discount_percent = Histogram(
            "pubrelay_publication_discount_percent",
            "Percent off of each published PERCENT discount code.",
            buckets=_PERCENT_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "pubrelay_publication_latency_seconds",
            "Time from the event's creation at Voucherify to the end of its handling here.",
            ["event_type"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.capped = Counter(
            "pubrelay_publication_labels_capped_total",
            "Label values folded into 'other' (configure PUBRELAY_METRICS__CHANNELS/CAMPAIGNS).",
            ["label"],
            registry=registry,
        )
        for label in CAPPED_LABELS:
            self.capped.labels(label)


class PublicationMetricsHandler:
    """Counts publications; its only effect is on its own Prometheus series."""

    def __init__(
        self,
        name: str,
        settings: PublicationMetricsSettings,
        registry: CollectorRegistry,
        *,
        logger: FilteringBoundLogger | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.name = name
        self.event_types = frozenset(settings.event_types)
        self.metrics = PublicationMetrics(registry)
        self.log: FilteringBoundLogger = logger or structlog.get_logger("pubrelay.metrics")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._warned: set[str] = set()
        self.channel = LabelCap(
            "channel", allowlist=settings.channels, top_n=settings.top_n, on_capped=self._capped
        )
        self.campaign = LabelCap(
            "campaign", allowlist=settings.campaigns, top_n=settings.top_n, on_capped=self._capped
        )
        self.voucher_type = LabelCap(
            "voucher_type", allowlist=VOUCHER_TYPES, top_n=0, on_capped=self._capped
        )

    async def start(self) -> None:
        self.log.info(
            "publication_metrics_started",
            handler=self.name,
            event_types=sorted(self.event_types),
            channels=sorted(self.channel.allowlist),
            campaigns=sorted(self.campaign.allowlist),
            top_n=self.channel.top_n,
        )

    async def stop(self) -> None:
        return None

    async def handle(self, event: Event) -> None:
        envelope = event.envelope
        data = envelope.data
        if isinstance(data, CustomerPublicationSucceededData):
            vouchers = [data.voucher]
            codes = 1
        elif isinstance(data, PublicationSucceededData):
            vouchers = data.all_vouchers
            codes = len(data.codes)
        else:
            raise SkipEvent(f"{envelope.event_type} carries no publication")
        labels = self._labels(envelope.event_type, data, vouchers)
        self.metrics.publications.labels(*labels).inc()
        if codes:
            self.metrics.codes.labels(*labels).inc(codes)
        for voucher in vouchers:
            self._observe_discount(voucher, data)
        created = envelope.event.created_at or envelope.created_at
        if created is None and data.publication is not None:
            created = data.publication.created_at
        if created is not None:
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            latency = (self._clock() - created).total_seconds()
            self.metrics.latency.labels(labels[0]).observe(max(0.0, latency))

    def _labels(
        self,
        event_type: str,
        data: CustomerPublicationSucceededData | PublicationSucceededData,
        vouchers: list[Voucher],
    ) -> tuple[str, str, str, str]:
        first = vouchers[0] if vouchers else None
        campaign = data.campaign
        name = (campaign.name if campaign else None) or (first.campaign if first else None)
        ident = (campaign.id if campaign else None) or (first.campaign_id if first else None)
        kind = first.type if first else None
        if not kind and campaign is not None and campaign.voucher is not None:
            kind = campaign.voucher.type
        return (
            event_type,
            self.channel(data.channel),
            self.campaign(name or ident, ident),
            self.voucher_type(kind),
        )

    def _observe_discount(
        self, voucher: Voucher, data: CustomerPublicationSucceededData | PublicationSucceededData
    ) -> None:
        discount: Any = voucher.discount
        if discount is None and data.campaign is not None and data.campaign.voucher is not None:
            discount = data.campaign.voucher.discount
        if isinstance(discount, AmountDiscount) and discount.amount_off is not None:
            self.metrics.discount_amount.observe(discount.amount_off / 100)
        elif isinstance(discount, PercentDiscount) and discount.percent_off is not None:
            self.metrics.discount_percent.observe(discount.percent_off)

    def _capped(self, label: str, value: str) -> None:
        self.metrics.capped.labels(label).inc()
        if label not in self._warned:
            # Once per label and process: the hint, not a line per event.
            self._warned.add(label)
            self.log.warning(
                "publication_label_capped",
                handler=self.name,
                label=label,
                value=value[:MAX_LABEL_CHARS],
                hint=_HINTS.get(label, "an unknown value"),
            )


def create(context: HandlerContext) -> PublicationMetricsHandler:
    """Entry point ``metrics`` in group ``pubrelay.handlers`` (see ``pyproject.toml``)."""
    settings = context.settings(PublicationMetricsSettings)
    return PublicationMetricsHandler(
        context.name, settings, context.metrics_registry, logger=context.logger
    )


__all__ = [
    "LabelCap",
    "PublicationMetrics",
    "PublicationMetricsHandler",
    "PublicationMetricsSettings",
    "create",
]
