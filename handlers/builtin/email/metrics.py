"""The ``email`` handler's Prometheus series, declared at zero for every label value.

``pubrelay_email_messages_total{outcome}`` (sent, partial, deferred, rejected,
template_error), ``pubrelay_email_skipped_total{reason}``, the SMTP transaction time and
connections, and for multi-code publications the holds for a sibling event and the codes
read from Voucherify's API (see :mod:`handlers.builtin.email.handler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from handlers.builtin.email.message import SKIP_REASONS

__all__ = ["EmailMetrics", "email_metrics"]

_OUTCOMES: Final = ("sent", "partial", "deferred", "rejected", "template_error")


@dataclass(frozen=True, slots=True)
class EmailMetrics:
    messages: Counter
    skipped: Counter
    duration: Histogram
    connections: Counter
    held: Counter
    lookups: Counter


def email_metrics(registry: CollectorRegistry) -> EmailMetrics:
    metrics = EmailMetrics(
        messages=Counter(
            "pubrelay_email_messages_total",
            "E-mails by outcome (sent, partial: sent without codes that could not be found, "
            "deferred: 4xx or relay unreachable, rejected: 5xx or unusable address, "
            "template_error).",
            ["outcome"],
            registry=registry,
        ),
        skipped=Counter(
            "pubrelay_email_skipped_total",
            "Events that sent no e-mail, by reason (no_address, opted_out, no_code, "
            "already_sent, unsupported_event).",
            ["reason"],
            registry=registry,
        ),
        duration=Histogram(
            "pubrelay_email_send_duration_seconds",
            "Time of one SMTP transaction, connecting included.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
        connections=Counter(
            "pubrelay_email_smtp_connections_total",
            "SMTP connections opened (a steady rise means the relay keeps dropping them).",
            registry=registry,
        ),
        held=Counter(
            "pubrelay_email_sibling_holds_total",
            "Events lacking some of their publication's codes, held for the sibling event.",
            registry=registry,
        ),
        lookups=Counter(
            "pubrelay_email_voucher_lookups_total",
            "Missing codes read from Voucherify's API, by outcome (found, failed).",
            ["outcome"],
            registry=registry,
        ),
    )
    for outcome in ("found", "failed"):
        metrics.lookups.labels(outcome)
    for outcome in _OUTCOMES:
        metrics.messages.labels(outcome)
    for reason in SKIP_REASONS:
        metrics.skipped.labels(reason)
    return metrics
