"""The reconciler's Prometheus series (deploy/prometheus/rules.yaml alerts on them)."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

RunOutcome = Literal["success", "incomplete", "failed", "busy"]
RUN_OUTCOMES: Final[tuple[RunOutcome, ...]] = ("success", "incomplete", "failed", "busy")


class ReconcileMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter(
            "pubrelay_reconcile_runs_total",
            "Reconciliation runs by outcome (success; incomplete: request budget or the API's "
            "last page reached; failed: API, bus or store error; busy: another runner held "
            "the lease).",
            ["outcome"],
            registry=registry,
        )
        for outcome in RUN_OUTCOMES:
            self.runs.labels(outcome)
        self.missing = Counter(
            "pubrelay_reconcile_missing_total",
            "Successful publications the API listed whose webhook never arrived.",
            registry=registry,
        )
        self.last_success = Gauge(
            "pubrelay_reconcile_last_success_timestamp_seconds",
            "When the last reconciliation finished successfully (Unix time).",
            registry=registry,
        )
        self.api_newest = Gauge(
            "pubrelay_reconcile_api_newest_publication_timestamp_seconds",
            "Creation time of the newest successful publication the API listed (Unix time).",
            registry=registry,
        )
        self.webhook_newest = Gauge(
            "pubrelay_reconcile_webhook_newest_publication_timestamp_seconds",
            "Creation time of the newest publication that arrived by webhook (Unix time);"
            " before the first, when reconciliation first looked.",
            registry=registry,
        )
