"""The fast checksum of a copy: xxh3-128 of its bytes, kept in the copy's `user.stor.xxh3`
extended attribute (DESIGN.md §2). The one module that imports `xxhash`.

SHA-256 names a blob and decides what is good; this only makes the check on a read cheap
(xxh3-128 runs at ~17 GB/s per core here, SHA-256 at ~1.3 GB/s, BLAKE3 at ~1.9 GB/s; see
docs/benchmarks.md). It is written from bytes whose SHA-256 was just checked (an upload, a
repair, a copy that a read or a scrub verified), so a match proves the bytes are the ones that
were verified. A mismatch proves nothing about which is damaged, the bytes or the attribute:
SHA-256 then decides, and a good copy with a bad attribute is given a new attribute.

Unseeded on purpose: it guards against decay, not against someone who can write the disk
(who could rewrite the attribute too).
"""

from __future__ import annotations

from typing import NewType

import xxhash

ATTR = "user.stor.xxh3"
"""The attribute's name; its value is the 16-byte digest (ext4 keeps it inside the inode)."""

FastSum = NewType("FastSum", bytes)

SIZE = 16


def fast_sum(data: bytes | bytearray | memoryview) -> FastSum:
    return FastSum(xxhash.xxh3_128_digest(data))


class FastHasher:
    """A running xxh3-128 (not thread-safe: one thread feeds it at a time)."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._state.update(data)

    def digest(self) -> FastSum:
        return FastSum(self._state.digest())


def parse(value: bytes | None) -> FastSum | None:
    """An attribute's value as a digest; None when absent or not one of ours."""
    if value is None or len(value) != SIZE:
        return None
    return FastSum(value)
