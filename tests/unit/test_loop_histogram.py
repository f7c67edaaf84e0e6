"""The worker's lock-free histogram is exposed exactly as prometheus_client's Histogram."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from schemas.loop_histogram import LoopHistogram

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text a scrape gets, without ``_created`` lines (pubrelay turns those off)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_the_same_observations_give_the_same_scrape() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "Doc.", ["handler"], buckets=BUCKETS, registry=theirs)
    loop = LoopHistogram("h_seconds", "Doc.", ["handler"], buckets=BUCKETS, registry=ours)
    values = [random.uniform(0, 90) ** 3 / 90**2 for _ in range(2000)]
    values += [*BUCKETS, 0.0, 1e9]  # each bound itself falls in its own bucket
    for handler in ("email", "crm"):
        reference.labels(handler)
        loop.labels(handler)
    for n, value in enumerate(values):
        handler = "email" if n % 3 else "crm"
        reference.labels(handler).observe(value)
        loop.labels(handler).observe(value)
    assert exposition(ours) == exposition(theirs)
    assert 'h_seconds_bucket{handler="email",le="+Inf"}' in "\n".join(exposition(ours))
    assert ours.get_sample_value("h_seconds_count", {"handler": "crm"}) == len(
        [n for n in range(len(values)) if not n % 3]
    )
