"""How big and how long each scenario is: :data:`FULL` (``make chaos``, about 15 minutes
on 2 cores) and :data:`SHORT` (``--short``, about 5 minutes, run by ``make test``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    broker_events: int
    broker_rate_per_s: float
    broker_down_s: float
    kill_events: int
    kill_rate_per_s: float
    rebalance_events: int
    rebalance_rate_per_s: float
    revoke_timeout_s: float
    smtp_delay_s: float
    smtp_events: int
    smtp_rate_per_s: float
    smtp_down_s: float
    hubspot_events: int
    hubspot_rate_per_s: float
    throttle_s: float
    backlog_events: int
    hostile_events: int
    hostile_rate_per_s: float
    bogus_clients: int
    stalled_clients: int
    settle_s: float
    """Longest wait, after the last event was sent, for every effect or dead letter."""


FULL = Sizes(
    broker_events=3_000,
    broker_rate_per_s=100,
    broker_down_s=15,
    kill_events=3_000,
    kill_rate_per_s=100,
    rebalance_events=900,
    rebalance_rate_per_s=15,
    revoke_timeout_s=2,
    smtp_delay_s=12,
    smtp_events=900,
    smtp_rate_per_s=10,
    smtp_down_s=60,
    hubspot_events=2_000,
    hubspot_rate_per_s=25,
    throttle_s=60,
    backlog_events=200_000,
    hostile_events=3_000,
    hostile_rate_per_s=100,
    bogus_clients=4,
    stalled_clients=300,
    settle_s=180,
)

SHORT = Sizes(
    broker_events=300,
    broker_rate_per_s=50,
    broker_down_s=5,
    kill_events=400,
    kill_rate_per_s=40,
    rebalance_events=200,
    rebalance_rate_per_s=8,
    revoke_timeout_s=2,
    smtp_delay_s=12,
    smtp_events=80,
    smtp_rate_per_s=8,
    smtp_down_s=8,
    hubspot_events=200,
    hubspot_rate_per_s=20,
    throttle_s=8,
    backlog_events=5_000,
    hostile_events=300,
    hostile_rate_per_s=50,
    bogus_clients=2,
    stalled_clients=100,
    settle_s=90,
)
