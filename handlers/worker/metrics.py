"""Worker metrics, registered on an injected ``CollectorRegistry`` (never the global one).

Labels come from bounded sets only: the enabled handler names, the outcomes in
:data:`handlers.types.OUTCOMES`, and the fixed broker operations below.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from handlers.types import OUTCOMES
from schemas.loop_histogram import LoopHistogram

BUS_OPERATIONS: Final = ("fetch", "commit", "publish_dlq", "ledger", "lag")

_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_AGE_BUCKETS: Final = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 3 * 86400)


class WorkerMetrics:
    """The worker's Prometheus series, one set per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "pubrelay_handler_events_total",
            "Events per handler by outcome (handled, retried, dead_lettered, skipped, "
            "duplicate, ignored); retried counts attempts that were retried.",
            ["handler", "outcome"],
            registry=registry,
        )
        self.duration = LoopHistogram(
            "pubrelay_handler_duration_seconds",
            "Time of one handler call.",
            ["handler"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.event_age = LoopHistogram(
            "pubrelay_handler_event_age_seconds",
            "Time from the event's creation at Voucherify to its handling.",
            ["handler"],
            buckets=_AGE_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "pubrelay_handler_in_flight",
            "Handler calls running now.",
            ["handler"],
            registry=registry,
        )
        self.lag = Gauge(
            "pubrelay_consumer_lag",
            "Records not yet committed by the handler's group on the partitions this worker "
            "holds (sum it over workers).",
            ["handler"],
            registry=registry,
        )
        self.oldest_uncommitted = Gauge(
            "pubrelay_handler_oldest_uncommitted_age_seconds",
            "Seconds since the oldest record not yet committable was fetched (0: none); "
            "grows while an event is stuck in a retry; refreshed with the lag.",
            ["handler"],
            registry=registry,
        )
        self.claim_waits = Counter(
            "pubrelay_handler_claim_waits_total",
            "Deliveries that found their event claimed by another worker (a call still "
            "running past a rebalance, or a worker that died mid-call) and waited.",
            ["handler"],
            registry=registry,
        )
        self.bus_errors = Counter(
            "pubrelay_handler_bus_errors_total",
            "Broker or ledger failures the worker backed off from, by operation.",
            ["handler", "operation"],
            registry=registry,
        )

    def declare(self, handlers: Iterable[str]) -> None:
        """Create every series at zero so rates and alerts work before the first event."""
        for name in handlers:
            for outcome in OUTCOMES:
                self.events.labels(name, outcome)
            for operation in BUS_OPERATIONS:
                self.bus_errors.labels(name, operation)
            self.duration.labels(name)
            self.event_age.labels(name)
            self.in_flight.labels(name)
            self.lag.labels(name)
            self.oldest_uncommitted.labels(name)
            self.claim_waits.labels(name)
