"""The room left on the data directory's file system, read at each scrape.

The embedded bus, the SQLite ledger, the console's index and reconciliation's store all
live there: once it is full the webhook answers 503 and a restarted process cannot open
its files (README, "A full disk"). ``PubrelayDataDiskAlmostFull`` warns before that.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


class DataDirSpace(Collector):
    """``pubrelay_data_dir_free_bytes`` and ``pubrelay_data_dir_size_bytes``; nothing while
    the directory does not exist (or cannot be read)."""

    def __init__(self, path: Path, registry: CollectorRegistry) -> None:
        self.path = path
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            return
        yield GaugeMetricFamily(
            "pubrelay_data_dir_free_bytes",
            "Bytes free for pubrelay on the data directory's file system (as df shows them).",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            "pubrelay_data_dir_size_bytes",
            "Size of the data directory's file system in bytes.",
            value=usage.total,
        )
