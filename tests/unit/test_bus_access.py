"""The first line of the inspection commands: the bus and topic they read, no password."""

from __future__ import annotations

from pathlib import Path

from bus.config import BusSettings
from pubrelay.bus_access import bus_url, describe
from pubrelay.settings import Settings


def test_the_kafka_bus_is_shown_by_its_brokers() -> None:
    settings = Settings(bus={"url": "kafka://kafka-1:9093,kafka-2:9093"})
    assert bus_url(settings) == "kafka://kafka-1:9093,kafka-2:9093"
    assert describe(settings, "voucherify.dlq.crm") == (
        "bus kafka://kafka-1:9093,kafka-2:9093, topic voucherify.dlq.crm"
    )


def test_a_password_never_shown_even_in_settings_built_without_their_checks() -> None:
    settings = Settings()
    settings.bus = BusSettings.model_construct(url="kafka://relay:s3cr3t@kafka-1:9093")
    assert bus_url(settings) == "kafka://relay:****@kafka-1:9093"


def test_the_embedded_bus_is_shown_with_the_file_it_reads(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    line = describe(settings, "voucherify.quarantine")
    assert line.startswith(f"bus sqlite:///{tmp_path / 'var' / 'bus.sqlite3'} (")
    assert line.endswith(", topic voucherify.quarantine")
