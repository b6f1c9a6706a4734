"""Kept-open copies: hot small blobs are read on the event loop, never stale, never corrupt."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stor.backends import nowait
from stor.backends.disk import Disk
from stor.backends.opencopy import OpenCopy
from stor.backends.openfiles import OpenFiles, fd_budget
from stor.digest import Sha
from stor.model import BlobStat
from stor.service import BlobService
from tests.conftest import Storage, app_client, takes_nowait
from tests.helpers import AUTH, corrupt, sha256, shorten

DATA = os.urandom(5000)
SHA = sha256(DATA)


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def service_of(client: app_client) -> BlobService:
    service: BlobService = client.app.service  # type: ignore[attr-defined]
    return service


def count_thread_hops(service: BlobService) -> list[str]:
    """Record the name of every call handed to a worker thread."""
    calls: list[str] = []
    run = service.offload.run

    async def counted(func: Callable[..., Any], *args: Any) -> Any:
        calls.append(getattr(func, "__name__", repr(func)))
        return await run(func, *args)

    service.offload.run = counted  # type: ignore[method-assign,assignment]
    return calls


# -- OpenFiles on its own ---------------------------------------------------------------------


def kept(tmp_path: Path, name: str, data: bytes = DATA) -> tuple[OpenCopy[Disk], int]:
    """A copy of `data` opened on a disk at `tmp_path`, and its fd (to see whether it is open)."""
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    disk = Disk(str(tmp_path), require_mount=False)
    disk.prepare()
    disk.probe_health()  # learns whether the filesystem takes RWF_NOWAIT
    return OpenCopy(disk, fd, BlobStat(str(path), st.st_size, st.st_mtime_ns)), fd


def test_a_kept_copy_is_read_whole_from_the_page_cache(nowait_dir: Path) -> None:
    files = OpenFiles(4, recheck=60)
    copy, fd = kept(nowait_dir, "a")
    files.put(Sha("a" * 64), copy)
    entry = files.get(Sha("a" * 64))
    assert isinstance(entry, OpenCopy) and entry.fileno() == fd
    assert files.read(entry) == DATA
    files.close()
    assert not fd_is_open(fd)


def test_the_least_recently_used_copy_is_closed_past_capacity(nowait_dir: Path) -> None:
    files = OpenFiles(2, recheck=60)
    fds = []
    for name in "abc":
        copy, fd = kept(nowait_dir, name)
        files.put(Sha(name * 64), copy)
        fds.append(fd)
        if name == "b":
            assert files.get(Sha("a" * 64)) is not None  # a is now more recent than b
    assert files.held == 2
    assert files.get(Sha("b" * 64)) is None and not fd_is_open(fds[1])
    assert fd_is_open(fds[0]) and fd_is_open(fds[2])
    files.close()


def test_time_renews_the_check_of_the_partners_not_the_copy(nowait_dir: Path) -> None:
    """Past `recheck`, a kept copy is still served from its fd: `due` says once that its
    partners are to be checked again, then not until `recheck` has passed again."""
    files = OpenFiles(4, recheck=0.2)
    copy, fd = kept(nowait_dir, "a")
    files.put(Sha("a" * 64), copy)
    assert files.get(Sha("a" * 64)) is copy and not files.due(copy)  # checked when it was opened
    time.sleep(0.25)
    assert files.get(Sha("a" * 64)) is copy and fd_is_open(fd)  # not reopened
    assert files.due(copy) and not files.due(copy)
    time.sleep(0.25)
    assert files.due(copy)
    files.close()


def test_a_removed_or_truncated_copy_is_not_used(nowait_dir: Path) -> None:
    files = OpenFiles(4, recheck=60)
    removed, removed_fd = kept(nowait_dir, "b")
    files.put(Sha("b" * 64), removed)
    truncated, truncated_fd = kept(nowait_dir, "c")
    files.put(Sha("c" * 64), truncated)
    (nowait_dir / "b").unlink()
    shorten(nowait_dir / "c", 10)
    assert files.get(Sha("b" * 64)) is None and files.get(Sha("c" * 64)) is None
    files.close_dropped()
    assert not fd_is_open(removed_fd) and not fd_is_open(truncated_fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
def test_a_filesystem_without_nowait_keeps_nothing_open(tmp_path: Path) -> None:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        if takes_nowait(mount):
            pytest.skip("this kernel's tmpfs takes RWF_NOWAIT")
        files = OpenFiles(4, recheck=60)
        copy, fd = kept(mount, "a")
        files.put(Sha("a" * 64), copy)
        assert files.held == 0 and not files.usable(copy.disk) and not fd_is_open(fd)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_cached_path_is_opened_without_a_thread(nowait_dir: Path) -> None:
    files = OpenFiles(4, recheck=60)
    copy, _fd = kept(nowait_dir, "a")
    files.put(Sha("a" * 64), copy)
    other = os.urandom(100)
    sha = Sha(sha256(other))
    disk = copy.disk
    path = Path(disk.blob_path(sha))
    path.parent.mkdir(parents=True)
    path.write_bytes(other)  # its path is now in the dentry cache
    entry = files.open(sha, disk)
    assert entry is not None and entry.stat.size == 100 and files.read(entry) == other
    assert files.open(Sha("c" * 64), disk) is None
    files.close()


def test_the_fd_budget_leaves_room_for_sockets_and_uploads() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = soft - fd_budget(10**9)
    assert min(soft // 2, 4096) <= room <= max(soft // 4, 4096) and room >= soft // 4
    assert fd_budget(0) == 0
    assert fd_budget(10) == min(10, soft - room)


# -- through the service ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_hot_blob_is_read_and_stated_without_a_thread_hop(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config())
    async with client as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA  # opened in a worker thread, kept open
        hops = count_thread_hops(service_of(client))
        for _ in range(3):
            response = await http.get(f"/{SHA}")
            assert response.status_code == 200 and response.content == DATA
        ranged = await http.get(f"/{SHA}", headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == DATA[10:20]
        head = await http.head(f"/{SHA}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA))
        assert hops == []


@pytest.mark.anyio
async def test_a_blob_never_read_is_opened_on_the_event_loop(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config())
    other = os.urandom(300)
    async with client as http:
        for data in (DATA, other):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        hops = count_thread_hops(service_of(client))
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        assert hops == []


@pytest.mark.anyio
async def test_a_missing_partner_is_noticed_on_the_event_loop(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config(location_cache_size=0))
    other = os.urandom(300)
    async with client as http:
        for data in (DATA, other):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        first, partner = nowait_storage.copies(SHA)
        partner.unlink()
        hops = count_thread_hops(service_of(client))
        response = await http.get(f"/{SHA}")  # whichever copy is asked first, the gap is seen
        assert response.status_code == 200 and response.content == DATA
        await eventually(lambda: len(nowait_storage.copies(SHA)) == 2)
        assert "check_partners" not in hops  # the dentry cache knew the partner was gone
        assert partner.read_bytes() == DATA and first.read_bytes() == DATA


@pytest.mark.anyio
@pytest.mark.parametrize("recheck", [0.0, 3600.0])
async def test_a_hot_blob_has_its_partner_checked_again_not_its_bytes(
    nowait_storage: Storage, monkeypatch: pytest.MonkeyPatch, recheck: float
) -> None:
    """A kept copy's partners are asked again every `PARTNER_RECHECK` seconds, from the dentry
    cache: a partner removed by hand since is healed, and the copy is neither reopened nor hashed
    again (once a minute SHA-256 over the whole hot set cost a tenth of its GETs)."""
    from stor import digest  # noqa: PLC0415 - patched below
    from stor.service import hotpath  # noqa: PLC0415
    from stor.wiring import build  # noqa: PLC0415

    monkeypatch.setattr(build, "PARTNER_RECHECK", recheck)
    client = app_client(nowait_storage.config(location_cache_size=0))
    async with client as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA
        kept_copy = service_of(client).open_files.get(Sha(SHA))
        assert isinstance(kept_copy, OpenCopy)
        [partner] = [path for path in nowait_storage.copies(SHA) if str(path) != kept_copy.stat.path]
        partner.unlink()
        hashed: list[bytes] = []

        def sha_of(data: bytes) -> Sha:
            hashed.append(data)
            return digest.sha_of(data)

        monkeypatch.setattr(hotpath, "sha_of", sha_of)
        hops = count_thread_hops(service_of(client))
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        assert service_of(client).open_files.get(Sha(SHA)) is kept_copy and hashed == []  # same fd, no SHA-256
        assert "check_partners" not in hops  # the dentry cache answered for the partner
        if recheck:
            assert not partner.exists()  # not due yet: the gap waits for the next check (or scrub)
        else:
            await eventually(partner.exists)
            assert partner.read_bytes() == DATA


@pytest.mark.anyio
async def test_a_copy_removed_by_hand_is_not_served_from_its_open_fd(nowait_storage: Storage) -> None:
    async with app_client(nowait_storage.config()) as http:
        assert (await http.post(f"/{SHA}", content=DATA, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).status_code == 200
        for copy in nowait_storage.copies(SHA):
            copy.unlink()
        assert (await http.head(f"/{SHA}")).status_code == 404
        assert (await http.get(f"/{SHA}")).status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["in place", "replaced"])
async def test_a_kept_copy_damaged_later_is_never_served(nowait_storage: Storage, how: str) -> None:
    client = app_client(nowait_storage.config())
    async with client as http:
        response = await http.post(f"/{SHA}", content=DATA, auth=AUTH)
        first = Path(response.json()[0])
        assert (await http.get(f"/{SHA}")).content == DATA
        [entry] = [service_of(client).open_files.get(Sha(SHA))]
        assert entry is not None and entry.stat.path == str(first)
        if how == "in place":  # the same inode: the open fd now reads bad bytes
            damaged = corrupt(first)
        else:  # a new file in its place: the open fd still reads the good one
            replacement = first.with_suffix(".new")
            replacement.write_bytes(first.read_bytes())
            damaged = corrupt(replacement)
            replacement.replace(first)
        assert first.read_bytes() == damaged != DATA
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA  # from the partner
        quarantine = first.parents[3] / ".stor-quarantine"
        assert len(list(quarantine.glob("*.dat"))) == 1


def test_a_read_on_the_event_loop_leaves_the_access_time_alone(nowait_dir: Path) -> None:
    """No inode update (a journal write, which can wait) may come from the event loop."""
    path = nowait_dir / "blob"
    path.write_bytes(DATA)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # atime before mtime: relatime would update it
    fd = nowait.open_cached(str(path))
    assert fd is not None
    try:
        assert nowait.read_cached(fd, len(DATA)) == DATA
    finally:
        os.close(fd)
    assert path.stat().st_atime_ns == 1_000_000_000


@pytest.mark.anyio
async def test_a_copy_pushed_out_and_opened_again_needs_no_second_verification(
    nowait_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A working set larger than the cache: a copy pushed out is remembered without its fd, and
    opened again it is checked with its fast checksum, not SHA-256, and its partner is not
    asked again."""
    from stor import digest  # noqa: PLC0415 - patched below
    from stor.service import hotpath  # noqa: PLC0415

    client = app_client(nowait_storage.config(open_file_cache_size=1))
    other = os.urandom(300)
    async with client as http:
        for data in (DATA, other):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA
        assert (await http.get(f"/{sha256(other)}")).content == other  # pushes DATA's copy out
        hashed: list[bytes] = []
        partners: list[str] = []
        real_sha_of, real_agree = digest.sha_of, hotpath.HotPath.partners_agree

        def sha_of(data: bytes) -> Sha:
            hashed.append(data)
            return real_sha_of(data)

        monkeypatch.setattr(hotpath, "sha_of", sha_of)

        def agree(self: hotpath.HotPath, disk: Disk, sha: Sha, size: int) -> bool:
            partners.append(sha)
            return real_agree(self, disk, sha, size)

        monkeypatch.setattr(hotpath.HotPath, "partners_agree", agree)
        hops = count_thread_hops(service_of(client))
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA
        assert hops == [] and hashed == [] and partners == []  # opened on the loop, vouched for
        assert (await http.get(f"/{sha256(other)}")).content == other
        service_of(client).open_files.forget(Sha(sha256(other)))  # as for a corrupt copy: forgotten
        assert (await http.get(f"/{SHA}")).content == DATA
        assert (await http.get(f"/{sha256(other)}")).content == other
        assert hashed == [other] and partners == [sha256(other)]  # checked in full once more


@pytest.mark.anyio
async def test_a_copy_pushed_out_and_damaged_since_is_never_served(nowait_storage: Storage) -> None:
    client = app_client(nowait_storage.config(open_file_cache_size=1, small_blob_cache_bytes=0))  # opened again
    other = os.urandom(300)
    async with client as http:
        for data in (DATA, other):
            assert (await http.post(f"/{sha256(data)}", content=data, auth=AUTH)).status_code == 201
        assert (await http.get(f"/{SHA}")).content == DATA
        entry = service_of(client).open_files.get(Sha(SHA))
        assert entry is not None
        first = Path(entry.stat.path)
        assert (await http.get(f"/{sha256(other)}")).content == other  # pushes DATA's copy out
        damaged = corrupt(first)  # in place: the same inode, opened again from the dentry cache
        assert first.read_bytes() == damaged != DATA
        response = await http.get(f"/{SHA}")
        assert response.status_code == 200 and response.content == DATA  # from the partner
        assert len(list((first.parents[3] / ".stor-quarantine").glob("*.dat"))) == 1


def test_a_copy_pushed_out_is_closed_at_once_unless_its_file_is_gone(nowait_dir: Path) -> None:
    files = OpenFiles(1, recheck=60)
    first, first_fd = kept(nowait_dir, "a")
    files.put(Sha("a" * 64), first)
    second, second_fd = kept(nowait_dir, "b")
    files._keep(Sha("b" * 64), second)  # (as the event loop keeps it: no `close_dropped` after)
    assert not fd_is_open(first_fd)  # still linked: its close frees nothing, done on the spot
    (nowait_dir / "b").unlink()
    third, _ = kept(nowait_dir, "c")
    files._keep(Sha("c" * 64), third)
    assert fd_is_open(second_fd)  # unlinked: its last close would free it, left to a thread
    files.close_dropped()
    assert not fd_is_open(second_fd)
    files.close()
