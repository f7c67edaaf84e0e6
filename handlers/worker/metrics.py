"""Worker metrics, registered on an injected ``CollectorRegistry`` (never the global one).

Labels come from bounded sets only: the enabled handler names, the outcomes in
:data:`handlers.types.OUTCOMES`, and the fixed broker operations below.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from handlers.types import OUTCOMES

BUS_OPERATIONS: Final = ("fetch", "commit", "publish_dlq", "ledger", "lag")

_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_AGE_BUCKETS: Final = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 3 * 86400)


class LoopHistogram(Collector):
    """A Prometheus histogram observed from the event loop's thread only.

    Exposed exactly as ``prometheus_client.Histogram`` exposes one (``_bucket`` with
    cumulative ``le`` counts, ``_count``, ``_sum``; no ``_created``, which pubrelay turns
    off), but an observation is a bucket search and two additions: no lock. Its
    ``Histogram`` took two locked updates and 1.6 µs per observation, twice per event
    (docs/performance.md, "The ledger's writer process"). A scrape from another thread
    reads counts that are at most a few observations apart.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        bounds = [float(b) for b in buckets]
        self._bounds = (*bounds, math.inf) if bounds[-1] != math.inf else tuple(bounds)
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative = itertools.accumulate(counts)
            family.add_metric(
                list(values),
                buckets=[(_le(b), c) for b, c in zip(self._bounds, cumulative, strict=True)],
                sum_value=total,
            )
        return [family]


def _le(bound: float) -> str:
    """A bucket's ``le`` label as ``prometheus_client.Histogram`` writes it."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # no annotations there
    return text


class LoopHistogramChild:
    """One label set's buckets (not cumulative) and sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


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
            "Records not yet committed by the handler's consumer group.",
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
