"""A broker that goes away does not flood the log: aiokafka's repeated errors are written
once per distinct message per interval, while the worker keeps running and says so itself."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

from tests.fixtures.kafka import TansuBroker
from tests.fixtures.process import Launcher

WATCH_S = 6.0
MAX_WAIT_S = 14.0  # after WATCH_S: 20 s in all, within RepeatLimiter's 30 s interval


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _library_lines(text: str) -> list[dict[str, object]]:
    return [
        line
        for line in json_lines(text)
        if not str(line.get("logger", "pubrelay")).startswith("pubrelay")
    ]


def test_a_broker_that_is_down_gives_a_few_library_lines_not_a_flood(
    run_pubrelay: Launcher, fresh_kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    worker = run_pubrelay(
        ["worker"],
        env={
            "PUBRELAY_BUS__URL": fresh_kafka_broker.url,
            "PUBRELAY_BUS__TOPIC_PREFIX": "flood.",
            "PUBRELAY_BUS__ENABLE_IDEMPOTENCE": "false",
            "PUBRELAY_BUS__REPLICATION_FACTOR": "1",
            "PUBRELAY_BUS__MIN_INSYNC_REPLICAS": "1",
            "PUBRELAY_HANDLERS__ENABLED": '["noop"]',
        },
    )
    worker.wait_ready()
    # Counted from before the kill: aiokafka may write its first lines about it before
    # kill() returns, and the limiter then leaves their repeats out for the interval.
    before = len(worker.output())
    fresh_kafka_broker.kill()
    time.sleep(WATCH_S)  # the broker stays down this long: what the log gets meanwhile
    # aiokafka notices on its next request to the broker, which may come later than that
    # (a group join or a long fetch in flight at the kill): wait for its first line, bounded
    # well inside the limiter's 30 s interval.
    deadline = time.monotonic() + MAX_WAIT_S
    while not _library_lines(worker.output()[before:]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert worker.proc.poll() is None, "the worker must keep running while the broker is down"
    library = _library_lines(worker.output()[before:])
    assert worker.terminate() in (0, 4)

    per_message = collections.Counter((line["logger"], line["event"]) for line in library)
    # Each distinct message once in the interval (30 s): without the limit, hundreds.
    assert library, "aiokafka said nothing about the broker going away"
    assert max(per_message.values()) == 1, per_message.most_common(3)
    assert len(library) <= 40, per_message.most_common(5)
