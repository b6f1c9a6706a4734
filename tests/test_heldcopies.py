"""Small copies pushed out of the open-file cache keep their verified bytes in memory: answered on
the event loop without an open or a read, within a budget, and never once their file is gone,
their blob taken down or their bytes no longer match."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from stor.backends import nowait
from stor.backends.heldcopies import ENTRY_BYTES, HELD_MAX_BYTES, HeldCopies, HeldCopy
from stor.backends.openfiles import OpenFiles
from stor.checksum import fast_sum
from stor.digest import Sha
from stor.model import BlobStat
from tests.conftest import Storage, app_client
from tests.helpers import AUTH, corrupt, sha256
from tests.test_openfiles import count_thread_hops, kept, service_of
from tests.test_takedown import ADMIN

DATA = os.urandom(4096)
SHA = sha256(DATA)
OTHER = os.urandom(300)


def held_copy(directory: Path, name: str, data: bytes, recheck_at: float = float("inf")) -> HeldCopy:
    copy, fd = kept(directory, name, data)  # the file written, and opened
    os.close(fd)
    return HeldCopy(copy.disk, BlobStat(str(directory / name), len(data), 0), data, fast_sum(data), recheck_at)


# -- on their own ---------------------------------------------------------------------------


def test_the_budget_bounds_the_bytes_held_least_recently_used_out_first(nowait_dir: Path) -> None:
    held = HeldCopies(3 * (4096 + ENTRY_BYTES))
    for name in "abc":
        held.put(Sha(name * 64), held_copy(nowait_dir, name, os.urandom(4096)))
    assert held.get(Sha("a" * 64)) is not None  # a is now more recent than b
    held.put(Sha("d" * 64), held_copy(nowait_dir, "d", os.urandom(4096)))
    assert held.held == (3, 3 * (4096 + ENTRY_BYTES))
    assert held.get(Sha("b" * 64)) is None
    assert all(held.get(Sha(name * 64)) is not None for name in "acd")
    held.put(Sha("e" * 64), held_copy(nowait_dir, "e", os.urandom(HELD_MAX_BYTES + 1)))
    assert held.get(Sha("e" * 64)) is None and held.held[0] == 3  # too big: not held, nothing pushed out
    assert not HeldCopies(0).takes(1)


def test_a_held_copy_whose_file_is_gone_is_dropped(nowait_dir: Path) -> None:
    held = HeldCopies(1 << 20)
    a, b = held_copy(nowait_dir, "a", DATA), held_copy(nowait_dir, "b", OTHER, recheck_at=0.0)
    held.put(Sha("a" * 64), a)
    held.put(Sha("b" * 64), b)
    assert held.get(Sha("a" * 64)) is a
    assert held.get(Sha("b" * 64)) is b and held.held[0] == 2  # its partners due: still held
    Path(a.stat.path).unlink()
    assert nowait.file_cached(a.stat.path) is False  # the dentry cache knows: the check is real
    assert held.get(Sha("a" * 64)) is None and held.held[0] == 1
    assert held.get(Sha("b" * 64)) is b


def test_a_verified_copy_pushed_out_of_the_open_files_leaves_its_bytes(nowait_dir: Path) -> None:
    files = OpenFiles(1, recheck=60, held_bytes=1 << 20)
    first, _ = kept(nowait_dir, "a", DATA)
    first.fast = fast_sum(DATA)  # its bytes were verified
    files.put(Sha("a" * 64), first)
    unverified, _ = kept(nowait_dir, "b", OTHER)
    files.put(Sha("b" * 64), unverified)  # pushes a out
    entry = files.get(Sha("a" * 64))
    assert isinstance(entry, HeldCopy) and files.read(entry) == DATA
    files.put(Sha("c" * 64), kept(nowait_dir, "c", DATA)[0])  # pushes b out: never verified, not held
    assert files.get(Sha("b" * 64)) is None
    files.forget(Sha("a" * 64))  # a copy of it found corrupt
    assert files.get(Sha("a" * 64)) is None
    files.close()


def test_no_bytes_are_held_without_an_open_file_cache(nowait_dir: Path) -> None:
    files = OpenFiles(0, recheck=60, held_bytes=1 << 20)
    assert files.held_copies.budget == 0  # open_file_cache_size 0 keeps nothing at all


# -- through the service ------------------------------------------------------------------------


async def pushed_out(http: httpx.AsyncClient) -> None:
    """DATA and OTHER stored, DATA read (kept open), then pushed out by OTHER's read."""
    for data in (DATA, OTHER):
        assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
    assert (await http.get(f"/{SHA}")).content == DATA
    assert (await http.get(f"/{sha256(OTHER)}")).content == OTHER


@pytest.mark.anyio
async def test_a_held_blob_is_answered_without_an_open_a_read_or_a_thread(
    nowait_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app_client(nowait_storage.config(open_file_cache_size=1))
    async with client as http:
        await pushed_out(http)
        service = service_of(client)
        assert isinstance(service.open_files.get(Sha(SHA)), HeldCopy)
        opened: list[str] = []
        real_open = nowait.open_cached

        def open_cached(path: str, *, path_only: bool = False) -> int | None:
            opened.append(path)
            return real_open(path, path_only=path_only)

        monkeypatch.setattr(nowait, "open_cached", open_cached)
        hops = count_thread_hops(service)
        for _ in range(3):
            response = await http.get(f"/{SHA}")
            assert response.status_code == 200 and response.content == DATA
        head = await http.head(f"/{SHA}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA))
        assert hops == [] and opened == []


@pytest.mark.anyio
async def test_a_held_blob_removed_by_hand_or_taken_down_is_not_served(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config(open_file_cache_size=1, admin_auth=f"{ADMIN[0]}:{ADMIN[1]}"))
    async with client as http:
        await pushed_out(http)
        assert isinstance(service_of(client).open_files.get(Sha(SHA)), HeldCopy)
        for copy in nowait_storage.copies(SHA):
            copy.unlink()
        assert (await http.get(f"/{SHA}")).status_code == 404
        assert (await http.head(f"/{SHA}")).status_code == 404

        third = os.urandom(700)
        for data in (DATA, third):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA
        assert (await http.get(f"/{sha256(third)}")).content == third  # DATA held again
        assert isinstance(service_of(client).open_files.get(Sha(SHA)), HeldCopy)
        taken = await http.delete(f"/{SHA}", auth=ADMIN, headers={"X-Stor-Reason": "legal"})
        assert taken.status_code == 200
        assert (await http.get(f"/{SHA}")).status_code == 410


@pytest.mark.anyio
async def test_held_bytes_that_no_longer_match_are_never_served(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config(open_file_cache_size=1))
    async with client as http:
        await pushed_out(http)
        service = service_of(client)
        held = service.open_files.get(Sha(SHA))
        assert isinstance(held, HeldCopy)
        held.data = bytes([held.data[0] ^ 1]) + held.data[1:]  # a bit flipped in memory
        assert held.data != DATA
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA  # read from a disk again
        assert not isinstance(service.open_files.get(Sha(SHA)), HeldCopy)


@pytest.mark.anyio
async def test_a_copy_damaged_on_disk_after_its_bytes_were_held_changes_nothing_served(
    nowait_storage: Storage,
) -> None:
    """The held bytes are the blob's, verified: a copy damaged since is scrub's to find."""
    client = app_client(nowait_storage.config(open_file_cache_size=1))
    async with client as http:
        await pushed_out(http)
        for copy in nowait_storage.copies(SHA):
            assert corrupt(copy) != DATA
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
