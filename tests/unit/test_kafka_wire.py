"""Produce requests of our own (bus.kafka.wire), read back by aiokafka's own protocol
classes: what we send is what aiokafka would send, and we read what a broker answers."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.api import RequestHeader_v1
from aiokafka.protocol.produce import (
    ProduceRequest_v3,
    ProduceRequest_v5,
    ProduceRequest_v7,
    ProduceResponse_v3,
    ProduceResponse_v5,
    ProduceResponse_v7,
)

from bus.config import BusSettings
from bus.kafka import KafkaBus
from bus.kafka.wire import PartitionAnswer, PartitionData, ProduceCall, decode_answer

_REQUESTS: dict[int, Any] = {3: ProduceRequest_v3, 5: ProduceRequest_v5, 7: ProduceRequest_v7}
_RESPONSES: dict[int, Any] = {3: ProduceResponse_v3, 5: ProduceResponse_v5, 7: ProduceResponse_v7}


def _parts() -> list[PartitionData]:
    return [
        PartitionData("voucherify.a", 0, b"batch-a0"),
        PartitionData("voucherify.b", 2, bytearray(b"batch-b2" * 100)),
        PartitionData("voucherify.a", 3, b"batch-a3"),
    ]


@pytest.mark.parametrize("version", [3, 5, 7])
def test_a_request_reads_back_as_aiokafkas_request_of_its_version(version: int) -> None:
    call = ProduceCall(-1, 8000, _parts()).prepare({0: (0, version)})
    assert version == call.API_VERSION

    request = _REQUESTS[version].decode(BytesIO(call.encode()))

    header = RequestHeader_v1(request, correlation_id=41, client_id="pubrelay").encode()
    assert call.build_request_header(41, "pubrelay").encode() == header
    assert request.transactional_id is None
    assert (request.required_acks, request.timeout) == (-1, 8000)
    assert [(topic, list(parts)) for topic, parts in request.topics] == [
        ("voucherify.a", [(0, b"batch-a0"), (3, b"batch-a3")]),
        ("voucherify.b", [(2, b"batch-b2" * 100)]),
    ]


@pytest.mark.parametrize("version", [3, 5, 7])
def test_an_answer_of_each_version_is_read_partition_by_partition(version: int) -> None:
    def answered(partition: int, code: int) -> tuple[int, ...]:
        fields = (partition, code, 1234, -1)
        return (*fields, 17) if version >= 5 else fields

    body = _RESPONSES[version](
        topics=[
            ("voucherify.a", [answered(0, 0), answered(3, 10)]),
            ("voucherify.b", [answered(2, 6)]),
        ],
        throttle_time_ms=0,
    ).encode()

    answer = decode_answer(body, version)

    assert answer.partitions == [
        PartitionAnswer("voucherify.a", 0, 0),
        PartitionAnswer("voucherify.a", 3, 10),
        PartitionAnswer("voucherify.b", 2, 6),
    ]


def test_the_highest_version_both_sides_speak_is_taken() -> None:
    assert ProduceCall(1, 100, _parts()).prepare({0: (0, 11)}).API_VERSION == 7
    assert ProduceCall(1, 100, _parts()).prepare({0: (3, 4)}).API_VERSION == 4
    assert ProduceCall(1, 100, _parts()).prepare({}).API_VERSION == 7  # versions not asked


def test_a_broker_without_record_batches_is_refused_by_name() -> None:
    with pytest.raises(IncompatibleBrokerVersion, match="Produce versions 0 to 2"):
        ProduceCall(-1, 100, _parts()).prepare({0: (0, 2)})


def test_acks_zero_is_not_a_request_of_our_own() -> None:
    with pytest.raises(ValueError, match="acks -1 or 1"):
        ProduceCall(0, 100, _parts())


@pytest.mark.parametrize(
    "overrides",
    [
        {"enable_idempotence": True},
        {"acks": "0", "allow_unsafe_acks": True, "enable_idempotence": False},
    ],
)
def test_own_requests_cannot_be_forced_where_aiokafka_must_send(overrides: dict[str, Any]) -> None:
    settings = BusSettings(url="kafka://127.0.0.1:9092", **overrides)
    assert KafkaBus(settings)._direct is False
    with pytest.raises(ValueError, match="no idempotence"):
        KafkaBus(settings, own_requests=True)
