"""Which partition a key belongs to: Kafka's own rule, so every client agrees.

A user's session state is only correct when all of that user's events reach one partition (the
worker keeps per-partition offsets and per-user state). Java's default partitioner hashes keys with
murmur2; librdkafka's default (`consistent_random`, also kcat's) uses CRC32 and puts the same key
elsewhere. Every producer here sets `partitioner=murmur2_random` (Java-compatible), and the worker
checks where each keyed event arrived: one produced under another rule is dead-lettered with the
reason instead of being applied to the wrong partition's state (or skipped as a replay there).
"""

from __future__ import annotations

from functools import lru_cache

#: librdkafka's name for the Java-compatible partitioner (murmur2 of the key; random for no key).
PARTITIONER = "murmur2_random"
_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (32-bit, seed 0x9747b28c) as an unsigned 32-bit value."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    tail = data[4 * n4 :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@lru_cache(maxsize=1 << 16)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition Java's default partitioner (and librdkafka's murmur2_random) picks for `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
