"""Which partition a key goes to: Kafka's default mapping, computed once per key.

Keys must land where every other client puts them, or one email's events would be split over
partitions (and lose their order) whenever a producer changes: the Java client's default
partitioner, librdkafka's `murmur2_random` (not its default, `consistent_random`, a CRC32) and
aiokafka's default all take `murmur2(key) & 0x7fffffff` modulo the topic's partition count.
aiokafka's murmur2 is pure Python and runs for every record; many events share a key (an email's
id), so the positive hash of a key is remembered in an LRU, and the partition count is applied
on each use, so a topic created again with another count maps correctly at once.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Sequence

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
CACHED_KEYS = 16384


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), as an unsigned 32 bits."""
    length = len(data)
    h = _SEED ^ length
    # Whole 4-byte little-endian words at once: the per-byte arithmetic is most of the cost.
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        rest = length & ~3
        if tail == 3:
            h ^= data[rest + 2] << 16
        if tail >= 2:
            h ^= data[rest + 1] << 8
        h = ((h ^ data[rest]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=CACHED_KEYS)
def positive_hash(key: bytes) -> int:
    """`murmur2(key)` made positive as the Java client's `Utils.toPositive` does; remembered."""
    return murmur2(key) & 0x7FFFFFFF


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition of `key` among a topic's `partitions` (sorted by number)."""
    return partitions[positive_hash(key) % len(partitions)]


def default_partitioner(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """aiokafka's `partitioner` callable: its default mapping, with the hash of a key cached.
    A record without a key goes to a random available partition, as aiokafka's default does."""
    if key is None:
        return random.choice(available or all_partitions)  # noqa: S311 - spreading, not secrecy
    return partition_for(key, sorted(all_partitions))
