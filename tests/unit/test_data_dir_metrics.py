"""The data directory's room, as `/metrics` serves it (PubrelayDataDiskAlmostFull)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry

from pubrelay.data_dir_metrics import DataDirSpace


def test_the_file_system_of_the_data_directory_is_read_at_each_scrape(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    DataDirSpace(tmp_path, registry)
    size = registry.get_sample_value("pubrelay_data_dir_size_bytes")
    free = registry.get_sample_value("pubrelay_data_dir_free_bytes")
    assert size == shutil.disk_usage(tmp_path).total
    assert free is not None
    assert 0 < free <= size


def test_a_data_directory_not_made_yet_gives_no_series_rather_than_zero(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    DataDirSpace(tmp_path / "not-yet", registry)
    assert registry.get_sample_value("pubrelay_data_dir_free_bytes") is None
    (tmp_path / "not-yet").mkdir()
    assert registry.get_sample_value("pubrelay_data_dir_free_bytes") is not None
