"""The producer's partitioner puts every key where Kafka's other clients put it."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from bus.kafka.partitioner import murmur2, partition_for


def test_murmur2_matches_the_java_clients_port_for_every_length() -> None:
    rnd = random.Random(7)
    for length in range(70):
        for _ in range(40):
            data = rnd.randbytes(length)
            assert murmur2(data) == aiokafka_murmur2(data), data


def test_keys_go_to_the_same_partition_as_with_aiokafkas_default() -> None:
    rnd = random.Random(11)
    default = DefaultPartitioner()
    for n in range(3_000):
        key = f"cust_{rnd.randrange(10**9)}".encode() if n % 3 else rnd.randbytes(n % 50)
        partitions = list(range(rnd.randint(1, 48)))
        assert partition_for(key, partitions, partitions) == default(key, partitions, partitions)


def test_a_record_without_a_key_goes_to_an_available_partition() -> None:
    chosen = {partition_for(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert chosen == {1, 3}
    assert partition_for(None, [0, 1], []) in {0, 1}
