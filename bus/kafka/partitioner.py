"""The producer's partitioner: the Java client's, at a fraction of the cost per record.

A record with a key goes to ``murmur2(key) & 0x7fffffff`` modulo the partition count, as
every Kafka client computes it, so records of one customer stay on one partition, in
order, whichever client wrote them. aiokafka's own murmur2 is a loop over single bytes in
Python: about 5% of the intake's time per request on Kafka (``docs/performance.md``).
This one reads four bytes at a time with :mod:`struct`, and remembers the partition of
recent keys (a customer's events tend to come together).
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Sequence
from typing import Final

_MASK: Final = 0xFFFFFFFF
_M: Final = 0x5BD1E995
_SEED: Final = 0x9747B28C


@functools.cache
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka's Java client computes it (``Utils.murmur2``), unsigned."""
    length = len(data)
    h = _SEED ^ length
    body = length & ~3
    for word in _words(length >> 2).unpack_from(data) if body else ():
        k = (word * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail == 3:
        h ^= data[body + 2] << 16
    if tail >= 2:
        h ^= data[body + 1] << 8
    if tail:
        h = ((h ^ data[body]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=16_384)
def _hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def partition_for(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """aiokafka's ``partitioner(key, all_partitions, available)``: the key's partition, or
    a random available one for a record without a key (as aiokafka's default does)."""
    if key is None:
        return random.choice(available or all_partitions)  # noqa: S311 - spreading load
    return all_partitions[_hash(key) % len(all_partitions)]
