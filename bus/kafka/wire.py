"""A produce request encoded by hand, sent and answered on aiokafka's own connection.

aiokafka encodes a produce request field by field in Python (``Struct.encode``, copying
each batch three times on the way) and runs each through its sender task; at the batch
sizes the webhook makes, that is about a tenth of the loop's time per request
(docs/performance.md, "A produce request of our own"). :class:`ProduceCall` is the same
request, Produce versions 3 to 7 (whose request fields are identical; aiokafka speaks
the same versions), encoded in one
``join``; its answer is read with ``struct`` alone.

It stands in for aiokafka's ``Request`` and ``RequestStruct`` at once, so the connection,
its TLS and SASL, version negotiation, correlation ids and request timeout stay
aiokafka's (``AIOKafkaClient.send``). Brokers answer only ``acks`` of 1 or ``all`` here;
``acks=0`` (no answer at all) stays on aiokafka's producer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import Final, NamedTuple

from aiokafka.errors import IncompatibleBrokerVersion

PRODUCE_API_KEY: Final = 0
LOWEST_VERSION: Final = 3  # the first with record batches (magic 2) and a transactional id
HIGHEST_VERSION: Final = 7  # aiokafka's highest too

_HEADER: Final = struct.Struct(">hhih")  # api key, version, correlation id, client id length
_ACKS_TIMEOUT: Final = struct.Struct(">hi")
_I16: Final = struct.Struct(">h")
_I32: Final = struct.Struct(">i")
_PARTITION: Final = struct.Struct(">ii")  # partition, records' size
_ANSWERED: Final = struct.Struct(">ih")  # partition, error code
_NO_TRANSACTION: Final = b"\xff\xff"  # a null string


class PartitionData(NamedTuple):
    """One partition's record batch in a produce request."""

    topic: str
    partition: int
    records: bytes | bytearray


class PartitionAnswer(NamedTuple):
    """The broker's answer for one partition: ``error_code`` 0 is stored."""

    topic: str
    partition: int
    error_code: int


class ProduceAnswer:
    """A decoded produce response."""

    __slots__ = ("partitions",)

    def __init__(self, partitions: list[PartitionAnswer]) -> None:
        self.partitions = partitions


class _Header:
    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def encode(self) -> bytes:
        return self._data


class _AnswerHeader:
    __slots__ = ("correlation_id",)

    def __init__(self, correlation_id: int) -> None:
        self.correlation_id = correlation_id


def _string(data: memoryview, pos: int) -> tuple[str | None, int]:
    (size,) = _I16.unpack_from(data, pos)
    pos += 2
    if size < 0:
        return None, pos
    return bytes(data[pos : pos + size]).decode("utf-8", "replace"), pos + size


def decode_answer(body: bytes | bytearray | memoryview, version: int) -> ProduceAnswer:
    """A produce response's body (after the correlation id) of ``version`` 3 to 7."""
    data = memoryview(body)
    pos = 0
    answers: list[PartitionAnswer] = []
    (topics,) = _I32.unpack_from(data, pos)
    pos += 4
    for _ in range(topics):
        topic, pos = _string(data, pos)
        (partitions,) = _I32.unpack_from(data, pos)
        pos += 4
        for _ in range(partitions):
            partition, code = _ANSWERED.unpack_from(data, pos)
            pos += 6 + 16  # base offset, log append time
            if version >= 5:
                pos += 8  # log start offset
            answers.append(PartitionAnswer(topic or "", partition, code))
    return ProduceAnswer(answers)


class _Decoder:
    """aiokafka's ``RESPONSE_TYPE`` for one version: ``decode(BytesIO)``."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        self.version = version

    def decode(self, buffer: BytesIO) -> ProduceAnswer:
        view = buffer.getbuffer()
        try:
            return decode_answer(view[buffer.tell() :], self.version)
        finally:
            view.release()


_DECODERS: Final = {
    version: _Decoder(version) for version in range(LOWEST_VERSION, HIGHEST_VERSION + 1)
}


class ProduceCall:
    """One produce request: aiokafka's connection calls ``prepare``, then
    ``build_request_header`` and ``encode``, and reads the answer with
    ``parse_response_header`` and ``RESPONSE_TYPE.decode``."""

    __slots__ = ("API_VERSION", "RESPONSE_TYPE", "_body", "required_acks")
    API_KEY: Final = PRODUCE_API_KEY

    def __init__(self, acks: int, timeout_ms: int, partitions: Sequence[PartitionData]) -> None:
        if acks not in (-1, 1):
            raise ValueError(f"a produce request of our own takes acks -1 or 1, not {acks}")
        self.required_acks = acks
        self.API_VERSION = HIGHEST_VERSION
        self.RESPONSE_TYPE = _DECODERS[HIGHEST_VERSION]
        parts: list[bytes | bytearray] = [_NO_TRANSACTION, _ACKS_TIMEOUT.pack(acks, timeout_ms)]
        by_topic: dict[str, list[PartitionData]] = {}
        for data in partitions:
            by_topic.setdefault(data.topic, []).append(data)
        parts.append(_I32.pack(len(by_topic)))
        for topic, members in by_topic.items():
            name = topic.encode()
            parts += (_I16.pack(len(name)), name, _I32.pack(len(members)))
            for data in members:
                parts += (_PARTITION.pack(data.partition, len(data.records)), data.records)
        self._body = b"".join(parts)

    def prepare(self, versions: dict[int, tuple[int, int]]) -> ProduceCall:
        """Take the highest version both sides speak (aiokafka's ``Request.prepare``)."""
        lowest, highest = versions.get(PRODUCE_API_KEY, (0, HIGHEST_VERSION))
        version = min(highest, HIGHEST_VERSION)
        if version < max(lowest, LOWEST_VERSION):
            raise IncompatibleBrokerVersion(
                f"the broker speaks Produce versions {lowest} to {highest}; "
                f"pubrelay needs one from {LOWEST_VERSION} to {HIGHEST_VERSION}"
            )
        self.API_VERSION = version
        self.RESPONSE_TYPE = _DECODERS[version]
        return self

    def build_request_header(self, correlation_id: int, client_id: str) -> _Header:
        name = client_id.encode()
        return _Header(
            _HEADER.pack(PRODUCE_API_KEY, self.API_VERSION, correlation_id, len(name)) + name
        )

    def encode(self) -> bytes:
        return self._body

    def parse_response_header(self, buffer: BytesIO) -> _AnswerHeader:
        (correlation_id,) = _I32.unpack(buffer.read(4))
        return _AnswerHeader(correlation_id)

    def __repr__(self) -> str:  # aiokafka's debug log line names the request
        return f"ProduceCall(v{self.API_VERSION}, {len(self._body)} bytes)"
