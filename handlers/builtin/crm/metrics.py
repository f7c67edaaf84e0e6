"""The ``crm`` handler's Prometheus series (``pubrelay_crm_*``), on the worker's registry.

The HubSpot client counts requests and times them; the batcher and the handler count
contacts by outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from handlers.types import HandlerContext

__all__ = ["CrmMetrics", "crm_metrics"]


@dataclass(frozen=True, slots=True)
class CrmMetrics:
    requests: Counter
    contacts: Counter
    batch_size: Histogram
    duration: Histogram
    auth_failed: Gauge


def crm_metrics(context: HandlerContext) -> CrmMetrics:
    """Register the series on ``context.metrics_registry``."""
    registry = context.metrics_registry
    return CrmMetrics(
        requests=Counter(
            "pubrelay_crm_requests_total",
            "HubSpot batch upsert requests by result (ok, partial, rate_limited, auth_failed, "
            "client_error, server_error, network_error).",
            ["result"],
            registry=registry,
        ),
        contacts=Counter(
            "pubrelay_crm_contacts_total",
            "Contacts by outcome (upserted, rejected, retried, skipped).",
            ["outcome"],
            registry=registry,
        ),
        batch_size=Histogram(
            "pubrelay_crm_batch_size",
            "Contacts per HubSpot batch upsert request.",
            buckets=(1, 2, 5, 10, 25, 50, 100),
            registry=registry,
        ),
        duration=Histogram(
            "pubrelay_crm_request_duration_seconds",
            "Time of one HubSpot batch upsert request.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        ),
        auth_failed=Gauge(
            "pubrelay_crm_auth_failed",
            "Whether HubSpot rejects the configured token now (401/403): 1 yes, 0 no.",
            registry=registry,
        ),
    )
