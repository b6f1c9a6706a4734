"""Bitrot on the copy read first: a byte flipped through the filesystem, one flipped below it
(in the ext4 image, page cache dropped), a truncation, a removal. The client gets the right
bytes or an error, never a 200 with wrong bytes, and the copy is healed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Storage, StorProcess
from tests.faults.conftest import Mounts, Servers, fault_config, post
from tests.faults.invariants import Ledger
from tests.helpers import corrupt, layout_path, sha256, shorten, wait_for

MiB = 1024 * 1024
Build = Callable[[list[list[Path]]], Storage]


def flip_in_file(copy: Path, image: Path) -> None:
    corrupt(copy, copy.stat().st_size // 2)


def flip_below_the_filesystem(copy: Path, image: Path) -> None:
    """Flip a byte of the copy in the disk image itself, then drop the page cache so the next
    read comes from the "disk"."""
    data = copy.read_bytes()
    needle = data[len(data) // 2 : len(data) // 2 + 64]
    offset = image.read_bytes().find(needle)
    assert offset > 0, "copy not found in the image"
    fd = os.open(image, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([needle[0] ^ 0x01]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert copy.read_bytes() != data, "the flip did not reach the filesystem"


def truncate(copy: Path, image: Path) -> None:
    shorten(copy, copy.stat().st_size // 2)


def remove(copy: Path, image: Path) -> None:
    copy.unlink()


def outcome(server: StorProcess, sha: str, data: bytes) -> str:
    try:
        got = httpx.get(f"{server.url}/{sha}", timeout=20)
    except httpx.TransportError:
        return "aborted"
    if got.status_code == 200:
        assert got.content == data, "a 200 with wrong bytes"
        return "right"
    assert got.status_code >= 500, got.status_code
    return "error"


@pytest.mark.parametrize("damage", [flip_in_file, flip_below_the_filesystem, truncate, remove])
def test_a_damaged_first_copy_is_never_served_and_is_healed(
    damage: Callable[[Path, Path], None], mounts: Mounts, servers: Servers, build: Build, ledger: Ledger
) -> None:
    members = [mounts.ext4("a1"), mounts.ext4("a2")]
    storage = build([members])
    server = servers.start(fault_config(storage))
    for size in (4096, 6 * MiB):
        data = os.urandom(size)
        sha = sha256(data)
        assert post(server, data, ledger).status_code == 201
        assert outcome(server, sha, data) == "right"  # and the server now reads a1's copy first
        first = layout_path(members[0], sha)
        damage(first, mounts.image_of(members[0]))

        outcomes = [outcome(server, sha, data) for _ in range(3)]
        assert outcomes[-1] == "right", outcomes
        healed = lambda: first.is_file() and first.read_bytes() == data  # noqa: B023, E731
        assert wait_for(healed), f"{first} was not healed"
        if damage is not remove:  # the damaged copy was read, caught and kept aside
            assert list((members[0] / ".stor-quarantine").glob(f"{sha.upper()}.*.dat"))
