"""The fast checksum of each copy (DESIGN.md §2): written with every copy, trusted when it
matches, and never the judge: when it is absent or disagrees, SHA-256 decides."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import httpx
import pytest
import xxhash

from stor.backends import xattrs
from stor.checksum import ATTR, FastSum
from stor.errors import TransferAborted
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, corrupt, sha256
from tests.test_integrity import eventually, quarantined, store
from tests.test_scrub import import_blobs, scrub

pytestmark = pytest.mark.anyio

SMALL = os.urandom(40_000)
LARGE = os.urandom(1536 * 1024)  # over the 1 MiB read in one hop (with the config below): it streams
STREAMING = {"verify_on_read_max": 64 * 1024}


def recorded(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, ATTR)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def expected(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def has_sum(path: Path, data: bytes) -> bool:
    return path.exists() and recorded(path) == expected(data)


async def test_every_copy_gets_it_with_its_bytes(storage: Storage) -> None:
    async with app_client(storage.config()) as http:
        copies = await store(http, SMALL)
        assert len(copies) == 2 and all(recorded(copy) == expected(SMALL) for copy in copies)
        response = await http.put("/file", params={"path": "a/b.txt"}, content=b"named bytes", auth=AUTH)
        assert response.status_code == 201
        named = storage.copies(sha256(b"named bytes"))
        assert len(named) == 2 and all(recorded(copy) == expected(b"named bytes") for copy in named)


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["read-whole", "streamed"])
async def test_a_copy_without_one_is_verified_by_sha256_and_given_one(storage: Storage, data: bytes) -> None:
    """By a thread's read (the event loop's own reads of kept-open copies check SHA-256 once and
    keep the fast checksum in memory, but leave the disk alone: that might wait)."""
    async with app_client(storage.config(**STREAMING, open_file_cache_size=0)) as http:
        copies = await store(http, data)
        for copy in copies:
            os.removexattr(copy, ATTR)  # as on Stor's disks
        response = await http.get(f"/{sha256(data)}")
        assert response.status_code == 200 and response.content == data
        await eventually(lambda: any(has_sum(copy, data) for copy in copies))  # the copy that was read
        assert all(quarantined(copy.parents[3]) == [] for copy in copies)


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["read-whole", "streamed"])
async def test_a_damaged_attribute_is_rewritten_and_the_copy_kept(storage: Storage, data: bytes) -> None:
    async with app_client(storage.config(**STREAMING, open_file_cache_size=0)) as http:
        copies = await store(http, data)
        for copy in copies:
            os.setxattr(copy, ATTR, bytes(16))
        for _ in range(2):
            response = await http.get(f"/{sha256(data)}")
            assert response.status_code == 200 and response.content == data
        await eventually(lambda: any(has_sum(copy, data) for copy in copies))
        assert all(copy.read_bytes() == data for copy in copies)
        assert all(quarantined(copy.parents[3]) == [] for copy in copies)


async def test_bitrot_under_a_matching_attribute_is_caught_and_healed(storage: Storage) -> None:
    async with app_client(storage.config(**STREAMING)) as http:
        first, partner = await store(http, LARGE)
        corrupt(first, len(LARGE) - 10)  # the bytes rot; the attribute still names the good ones
        assert recorded(first) == expected(LARGE)
        with pytest.raises(TransferAborted, match="corrupt"):
            await http.get(f"/{sha256(LARGE)}")
        assert len(quarantined(first.parents[3])) == 1
        good = await http.get(f"/{sha256(LARGE)}")
        assert good.status_code == 200 and good.content == LARGE
        await eventually(lambda: first.exists() and first.read_bytes() == LARGE)
        assert has_sum(first, LARGE) and has_sum(partner, LARGE)  # the healed copy has one too


async def test_a_hot_copy_is_checked_on_every_read(storage: Storage) -> None:
    """A copy kept open is checked against the checksum of the bytes that were verified: rot
    that reaches the page cache is not served from the kept fd."""
    async with app_client(storage.config()) as http:
        first, _ = await store(http, SMALL)
        for _ in range(3):
            assert (await http.get(f"/{sha256(SMALL)}")).content == SMALL
        corrupt(first, 100)  # in place: the kept fd reads the rotten bytes from the page cache
        for _ in range(3):
            response = await http.get(f"/{sha256(SMALL)}")
            assert response.status_code == 200 and response.content == SMALL
        assert len(quarantined(first.parents[3])) == 1


def test_scrub_counts_absent_and_wrong_ones_and_repair_writes_them(storage: Storage) -> None:
    config = storage.write_config()
    blobs = import_blobs(storage, config, 4)
    copies = [copy for blob in blobs for copy in storage.copies(sha256(blob))]
    assert all(recorded(copy) is not None for copy in copies)  # import writes them
    os.removexattr(copies[0], ATTR)
    os.setxattr(copies[3], ATTR, bytes(16))
    code, report = scrub(config)
    assert code == 0  # a checksum is not damage: the bytes are good
    assert (report["checksums_missing"], report["checksums_wrong"], report["checksums_written"]) == (1, 1, 0)
    assert [f["problem"] for f in report["findings"]] == ["checksum-wrong"]
    assert recorded(copies[0]) is None  # a plain scrub changes nothing
    code, report = scrub(config, "--repair")
    assert code == 0 and report["checksums_written"] == 2
    assert all(recorded(copy) == expected(copy.read_bytes()) for copy in copies)
    assert scrub(config)[1]["checksums_missing"] == 0


def test_scrub_repair_gives_a_rewritten_copy_its_checksum(storage: Storage) -> None:
    config = storage.write_config()
    [blob] = import_blobs(storage, config, 1)
    first, second = storage.copies(sha256(blob))
    first.unlink()
    code, report = scrub(config, "--repair")
    assert code == 0 and report["repaired"] == 1
    assert first.read_bytes() == blob and recorded(first) == expected(blob) == recorded(second)


def test_a_filesystem_that_cannot_keep_one() -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)  # no user xattrs here
    try:
        assert xattrs.write_sum(fd, FastSum(bytes(16))) is False
        assert xattrs.read_sum(fd) is None
    finally:
        os.close(fd)


async def test_range_answers_are_verified_too(storage: Storage) -> None:
    async with app_client(storage.config(**STREAMING)) as http:
        first, _ = await store(http, LARGE)
        corrupt(first, 10)  # outside the range asked for: the whole copy is still checked
        with pytest.raises((TransferAborted, httpx.HTTPError)):
            response = await http.get(f"/{sha256(LARGE)}", headers={"Range": "bytes=100000-100099"})
            assert response.status_code != 206 or response.content != LARGE[100000:100100]
        assert len(quarantined(first.parents[3])) == 1
