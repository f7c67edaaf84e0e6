"""The bus settings refuse what would break "2xx means durable" or could never be stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bus.config import RECORD_HEADROOM_BYTES, BusSettings
from bus.kafka.admin import topic_configs
from pubrelay.settings import load_settings
from schemas.errors import ConfigError
from schemas.topics import dlq_topic, quarantine_topic, retry_topic, topic_for

KAFKA = "kafka://127.0.0.1:9092"


@pytest.mark.parametrize("acks", ["1", "0"])
def test_acks_below_all_stop_start_up_unless_explicitly_allowed(
    monkeypatch: pytest.MonkeyPatch, acks: str
) -> None:
    monkeypatch.setenv("PUBRELAY_BUS__URL", KAFKA)
    monkeypatch.setenv("PUBRELAY_BUS__ACKS", acks)
    with pytest.raises(ConfigError, match="PUBRELAY_BUS__ALLOW_UNSAFE_ACKS=true"):
        load_settings()

    monkeypatch.setenv("PUBRELAY_BUS__ALLOW_UNSAFE_ACKS", "true")
    with pytest.raises(ConfigError, match="PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false"):
        load_settings()  # the producer would refuse it at start: said before, by --check too

    monkeypatch.setenv("PUBRELAY_BUS__ENABLE_IDEMPOTENCE", "false")
    assert load_settings().bus.acks == acks


@pytest.mark.parametrize(
    "url", ["kafka://kuser:Kafka/Pass@127.0.0.1:9092", "kafka://b1:9092,kuser:Kafka/Pass@b2:9092"]
)
def test_credentials_in_the_kafka_url_are_refused_without_being_printed(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # Messages name the bus by its URL (a broker down, a topic refused): a password in it
    # would be printed; the SASL settings keep it out of them.
    monkeypatch.setenv("PUBRELAY_BUS__URL", url)
    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert "PUBRELAY_BUS__SASL_USERNAME" in str(raised.value)
    assert "Kafka/Pass" not in str(raised.value)


def test_defaults_suit_a_three_broker_cluster() -> None:
    settings = BusSettings(url=KAFKA)
    assert (settings.acks, settings.replication_factor, settings.min_insync_replicas) == (
        "all",
        3,
        2,
    )


def test_more_in_sync_replicas_than_replicas_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBRELAY_BUS__REPLICATION_FACTOR", "1")
    with pytest.raises(ConfigError, match="PUBRELAY_BUS__MIN_INSYNC_REPLICAS=2 is more than"):
        load_settings()
    monkeypatch.setenv("PUBRELAY_BUS__MIN_INSYNC_REPLICAS", "1")
    assert load_settings().bus.min_insync_replicas == 1


def test_a_body_limit_the_kafka_record_limit_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBRELAY_HTTP__MAX_BODY_BYTES", str(2 * 1024 * 1024))
    assert load_settings().bus.kind == "sqlite"  # the embedded bus has no record limit

    monkeypatch.setenv("PUBRELAY_BUS__URL", KAFKA)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "PUBRELAY_HTTP__MAX_BODY_BYTES=2097152" in message
    assert "PUBRELAY_BUS__MAX_RECORD_BYTES=1114112" in message
    assert str(2 * 1024 * 1024 + RECORD_HEADROOM_BYTES) in message
    assert "PUBRELAY_:" not in message  # no empty variable name for a check across sections

    monkeypatch.setenv(
        "PUBRELAY_BUS__MAX_RECORD_BYTES", str(2 * 1024 * 1024 + RECORD_HEADROOM_BYTES)
    )
    assert load_settings().http.max_body_bytes == 2 * 1024 * 1024


def test_default_body_limit_fits_the_default_kafka_record_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBRELAY_BUS__URL", KAFKA)
    settings = load_settings()
    assert settings.http.max_body_bytes + RECORD_HEADROOM_BYTES <= settings.bus.max_record_bytes


def test_only_quarantine_and_dead_letter_topics_are_kept_forever() -> None:
    settings = BusSettings(url=KAFKA, topic_prefix="v.")
    kept = [quarantine_topic("v."), dlq_topic("v.", "crm")]
    flowing = [topic_for("v.", "customer.publication.succeeded"), retry_topic("v.", "crm")]
    for topic in kept:
        assert topic_configs(settings, topic)["retention.ms"] == "-1", topic
    for topic in flowing:
        assert "retention.ms" not in topic_configs(settings, topic), topic
    for topic in kept + flowing:
        assert topic_configs(settings, topic)["min.insync.replicas"] == "2", topic


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        if name.startswith("PUBRELAY_"):
            monkeypatch.setenv(name, str(value))
    load_settings()


@pytest.mark.parametrize("service", ["webhook", "worker"])
def test_the_compose_services_settings_load(monkeypatch: pytest.MonkeyPatch, service: str) -> None:
    """deploy/compose.yaml runs one broker: its replication settings must say so."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    _load_with(monkeypatch, compose["services"][service]["environment"])


def test_the_kubernetes_configmap_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    _load_with(monkeypatch, configmap["data"])


def test_an_embedded_retention_shorter_than_four_lag_reports_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Retention passes over a group not seen for as long: a running worker is seen at
    # each lag report, so a shorter retention would delete what it has not handled yet.
    monkeypatch.setenv("PUBRELAY_BUS__RETENTION_S", "59")
    with pytest.raises(ConfigError, match="PUBRELAY_WORKER__LAG_INTERVAL_S=15"):
        load_settings()
    monkeypatch.setenv("PUBRELAY_WORKER__LAG_INTERVAL_S", "10")
    assert load_settings().bus.retention_s == 59
    monkeypatch.setenv("PUBRELAY_BUS__URL", KAFKA)  # Kafka's retention is the cluster's
    monkeypatch.setenv("PUBRELAY_WORKER__LAG_INTERVAL_S", "15")
    assert load_settings().bus.retention_s == 59
