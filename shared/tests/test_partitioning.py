"""Keys keep the partition every Kafka client's murmur2 partitioner gives them."""

import random

import confluent_kafka
import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from herald.partitioning import default_partitioner, murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: the Java client's own expectations.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


@pytest.mark.parametrize(("key", "expected"), JAVA_MURMUR2.items())
def test_murmur2_is_the_java_clients(key: bytes, expected: int):
    assert _signed(murmur2(key)) == expected


def test_murmur2_matches_aiokafkas_for_keys_of_every_length():
    rng = random.Random(7)
    for length in range(70):
        for _ in range(30):
            key = rng.randbytes(length)
            assert murmur2(key) == aiokafka_murmur2(key)


def test_partitions_match_aiokafkas_default_partitioner_for_every_count():
    rng = random.Random(11)
    keys = [str(rng.getrandbits(128)).encode() for _ in range(300)] + ["é-ü".encode(), b""]
    for count in (1, 2, 3, 6, 7, 12, 64):
        partitions = list(range(count))
        for key in keys:
            expected = DefaultPartitioner()(key, partitions, partitions)
            assert partition_for(key, partitions) == expected
            # Twice: the second answer comes from the cache, under another partition count too.
            assert default_partitioner(key, partitions, partitions) == expected


def test_partitions_match_librdkafkas_murmur2_partitioner():
    rng = random.Random(13)
    for _ in range(300):
        key = rng.randbytes(rng.randrange(1, 48))
        for count in (3, 6, 10):
            assert partition_for(key, list(range(count))) == confluent_kafka.murmur2(key, count)


def test_a_record_without_a_key_goes_to_an_available_partition():
    assert {default_partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(50)} <= {1, 3}
    assert default_partitioner(None, [0, 1], []) in (0, 1)
