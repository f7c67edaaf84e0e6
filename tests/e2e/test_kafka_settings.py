"""Kafka settings that would break "2xx means durable" stop `pubrelay webhook` at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.kafka import TansuBroker
from tests.fixtures.process import Launcher

pytestmark = pytest.mark.kafka


def test_default_replication_on_a_single_broker_exits_2_naming_the_settings(
    run_pubrelay: Launcher, kafka_broker: TansuBroker
) -> None:
    process = run_pubrelay(
        ["webhook"],
        env={
            "PUBRELAY_BUS__URL": kafka_broker.url,
            "PUBRELAY_BUS__TOPIC_PREFIX": "single-broker.",
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
            "PUBRELAY_WEBHOOK__SECRETS": '["s"]',
        },
    )

    assert process.proc.wait(30) == 2
    output = process.output()
    assert "PUBRELAY_BUS__REPLICATION_FACTOR=3" in output
    assert "PUBRELAY_BUS__REPLICATION_FACTOR=1 and PUBRELAY_BUS__MIN_INSYNC_REPLICAS=1" in output


def test_acks_1_without_the_opt_in_exits_2_before_connecting(run_pubrelay: Launcher) -> None:
    process = run_pubrelay(
        ["webhook"],
        env={
            "PUBRELAY_BUS__URL": "kafka://127.0.0.1:9",
            "PUBRELAY_BUS__ACKS": "1",
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
        },
    )

    assert process.proc.wait(30) == 2
    assert "PUBRELAY_BUS__ALLOW_UNSAFE_ACKS=true" in process.output()


def test_a_webhook_on_kafka_without_a_secret_stops_instead_of_generating_one(
    run_pubrelay: Launcher, tmp_path: Path
) -> None:
    # A generated secret, different in each pod, would answer 401 to every delivery.
    process = run_pubrelay(
        ["webhook"],
        env={
            "PUBRELAY_BUS__URL": "kafka://127.0.0.1:9",
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
        },
    )

    assert process.proc.wait(30) == 2
    assert "on Kafka none is generated" in process.output()
    assert not (tmp_path / "var" / "webhook-secret").exists()


def test_a_webhook_on_kafka_using_a_secret_file_says_so(
    run_pubrelay: Launcher, tmp_path: Path
) -> None:
    (tmp_path / "var").mkdir(mode=0o700)
    (tmp_path / "var" / "webhook-secret").write_text("generated-by-an-older-version\n")
    (tmp_path / "var" / "webhook-secret").chmod(0o600)
    process = run_pubrelay(
        ["webhook"],
        env={
            "PUBRELAY_BUS__URL": "kafka://127.0.0.1:9",  # nothing there: it stops after
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
            "PUBRELAY_BUS__REQUEST_TIMEOUT_S": "1",
        },
    )

    process.proc.wait(60)
    assert '"event":"webhook_secret_from_file"' in process.output()
    assert "same in every webhook process" in process.output()
