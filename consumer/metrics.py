"""Prometheus metrics of the webhook intake, registered on an injected registry."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.loop_histogram import LoopHistogram, LoopHistogramChild

OUTCOMES: Final = (
    "accepted",
    "quarantined",
    "unauthorized",
    "forbidden",
    "too_large",
    "record_too_large",
    "bad_request",
    "body_timeout",
    "busy",
    "unavailable",
    "error",
)
QUARANTINE_REASONS: Final = (
    "not_utf8",
    "not_json",
    "too_deep",
    "no_envelope",
    "invalid_event_type",
    "stale",
    "no_topic",
)
GUARDS: Final = (
    # 401: an x-voucherify-signature header that matches none of the secrets (an absent
    # one is not counted here): Voucherify signing with a secret pubrelay does not have.
    "signature_mismatch",
    # 401 without the whitespace-stripped signature check: the body was over
    # consumer/signature.py's MAX_NORMALISED_BYTES or held more quotes and backslashes
    # than its MAX_NORMALISED_TOKENS.
    "signature_fallback_skipped",
    # 403: X-Forwarded-For holds fewer entries than TRUSTED_PROXY_HOPS, or no address there.
    "forwarded_for",
    # 408: the body did not arrive within BODY_READ_TIMEOUT_S (consumer/body.py).
    "body_read_timeout",
    # 503 busy: MAX_CONCURRENT_BODIES, or MAX_CONCURRENT_LARGE_BODIES, were being received.
    "max_concurrent_bodies",
    "max_concurrent_large_bodies",
)

_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WebhookMetrics:
    """Counters and histograms of the intake; label values come from fixed sets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pubrelay_webhook_requests_total",
            "Webhook requests by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.quarantined = Counter(
            "pubrelay_webhook_quarantined_total",
            "Signed bodies kept on the quarantine topic, by reason.",
            ["reason"],
            registry=registry,
        )
        # Observed on the loop only: no lock per observation (schemas/loop_histogram.py).
        self.request_seconds = LoopHistogram(
            "pubrelay_webhook_request_duration_seconds",
            "Time from request start to response, by outcome.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_seconds = LoopHistogram(
            "pubrelay_bus_publish_duration_seconds",
            "Time for the bus to answer one publish: acknowledged, refused or timed out.",
            [],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ).labels()
        self.bodies_receiving = Gauge(
            "pubrelay_webhook_bodies_receiving",
            "Request bodies being received now (size=large: those over 64 KiB).",
            ["size"],
            registry=registry,
        )
        self.refused = Counter(
            "pubrelay_webhook_refused_total",
            "Webhook requests a guard refused (also counted by their outcome), by guard.",
            ["guard"],
            registry=registry,
        )
        self.bus_errors = Counter(
            "pubrelay_bus_errors_total",
            "Bus operations that failed, by operation.",
            ["operation"],
            registry=registry,
        )
        # Pre-create every series so dashboards and alerts see zeros, not gaps; the
        # request's two are kept by outcome (labels() takes a lock and builds a key).
        self._by_outcome: dict[str, tuple[Counter, LoopHistogramChild]] = {}
        for outcome in OUTCOMES:
            self._outcome_series(outcome)
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason)
        for guard in GUARDS:
            self.refused.labels(guard)
        for operation in ("publish", "ping"):
            self.bus_errors.labels(operation)

    def count_request(self, outcome: str, elapsed_s: float) -> None:
        """One request answered with ``outcome`` after ``elapsed_s``."""
        requests, seconds = self._by_outcome.get(outcome) or self._outcome_series(outcome)
        requests.inc()
        seconds.observe(elapsed_s)

    def _outcome_series(self, outcome: str) -> tuple[Counter, LoopHistogramChild]:
        series = self._by_outcome[outcome] = (
            self.requests.labels(outcome),
            self.request_seconds.labels(outcome),
        )
        return series
