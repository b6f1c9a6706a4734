"""The disk layer on real directories: layout, the write protocol, temps, the mount sentinel."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stor.backends import disk as disk_module
from stor.backends import owners
from stor.backends.disk import Disk
from stor.backends.inflight import InflightOps
from stor.backends.pairs import PairWrite
from stor.digest import Sha, sha_of
from stor.errors import DigestMismatch, StorageUnavailable
from stor.wiring.build import DISK_OPS_LIMIT, IO_THREADS
from tests.helpers import layout_path, prepared_disks, shorten, temp_files

DATA = b"x" * 10_000
SHA = sha_of(DATA)
MTIME = 1_600_000_000_123_456_789


@pytest.fixture
def disks(tmp_path: Path) -> list[Disk]:
    return prepared_disks(tmp_path)


def test_mirrored_write_makes_both_copies_with_one_mtime(disks: list[Disk]) -> None:
    writer = PairWrite(disks)
    writer.write(DATA[:4000])
    paths = writer.finish(SHA, MTIME, DATA[4000:])
    for disk, path in zip(disks, paths, strict=True):
        assert Path(path) == layout_path(Path(disk.root), SHA)
        assert Path(path).read_bytes() == DATA
        assert os.stat(path).st_mtime_ns == MTIME
        assert temp_files(Path(disk.root)) == []


def test_mismatch_leaves_nothing_behind(disks: list[Disk]) -> None:
    wrong = Sha("0" * 64)
    small = PairWrite(disks)
    with pytest.raises(DigestMismatch) as info:
        small.finish(wrong, MTIME, DATA)
    assert wrong in str(info.value) and SHA in str(info.value)
    spooled = PairWrite(disks)
    spooled.write(DATA)  # temps exist now
    assert all(temp_files(Path(d.root)) for d in disks)
    with pytest.raises(DigestMismatch):
        spooled.finish(wrong, MTIME)
    for disk in disks:
        assert temp_files(Path(disk.root)) == []
        assert disk.stat(wrong) is None


def test_the_empty_blob_is_a_blob(disks: list[Disk]) -> None:
    empty = sha_of(b"")
    PairWrite(disks).finish(empty, MTIME)
    for disk in disks:
        stat = disk.stat(empty)
        assert stat is not None and stat.size == 0


def test_an_existing_copy_is_never_replaced(disks: list[Disk]) -> None:
    PairWrite(disks).finish(SHA, MTIME, DATA)
    paths = PairWrite(disks).finish(SHA, MTIME + 5 * 10**9, DATA)
    for path in paths:
        assert os.stat(path).st_mtime_ns == MTIME  # the first copy stayed
        assert Path(path).read_bytes() == DATA


def test_abort_removes_temps(disks: list[Disk]) -> None:
    writer = PairWrite(disks)
    writer.write(DATA)
    writer.abort()
    assert [temp_files(Path(d.root)) for d in disks] == [[], []]
    assert all(d.stat(SHA) is None for d in disks)


def test_read_at_never_returns_short_data(disks: list[Disk]) -> None:
    PairWrite(disks).finish(SHA, MTIME, DATA)
    copy = disks[0].open(SHA)
    assert copy is not None
    with copy:
        assert copy.stat.size == len(DATA)
        assert copy.read_at(10, 20) == DATA[10:30]
        shorten(Path(copy.stat.path), 100)
        with pytest.raises(StorageUnavailable, match="shorter"):
            copy.read_at(0, len(DATA))
    assert copy.closed
    copy.close()  # a second close does nothing


def test_a_missing_root_is_unavailable_not_absent(tmp_path: Path, disks: list[Disk]) -> None:
    """A disk that vanished (unmounted, renamed) must not answer "absent": that is a false 404."""
    os.rename(disks[0].root, str(tmp_path / "moved"))
    with pytest.raises(StorageUnavailable):
        disks[0].stat(SHA)
    with pytest.raises(StorageUnavailable):
        disks[0].open(SHA)
    assert disks[1].stat(SHA) is None
    health = disks[0].probe_health()
    assert not health.ok and "missing" in (health.error or "")


def test_a_bare_mountpoint_is_unavailable(tmp_path: Path) -> None:
    """Stands in for an unmounted disk: the root exists but stor never prepared it."""
    (tmp_path / "bare").mkdir()
    disk = Disk(str(tmp_path / "bare"), require_mount=False)
    with pytest.raises(StorageUnavailable):
        disk.stat(SHA)


def test_prepare_never_creates_a_root(tmp_path: Path) -> None:
    disk = Disk(str(tmp_path / "absent"), require_mount=False)
    with pytest.raises(StorageUnavailable, match="missing"):
        disk.prepare()
    assert not (tmp_path / "absent").exists()


def test_require_mount_refuses_a_plain_directory(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    disk = Disk(str(tmp_path / "plain"), require_mount=True)
    with pytest.raises(StorageUnavailable, match="not a mounted filesystem"):
        disk.prepare()
    assert not disk.probe_health().ok


def test_sweep_removes_dead_owners_temps_and_keeps_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    live = Disk(str(root), require_mount=False)
    live.prepare()
    in_flight = live.new_temp()
    in_flight.write(b"uploading")
    # A process killed mid-upload leaves an owner directory nobody holds a lock on.
    dead = root / ".stor-tmp" / "deadbeef"
    dead.mkdir()
    (dead / "owner.lock").touch()
    (dead / "7.tmp").write_bytes(b"half a blob")
    restarted = Disk(str(root), require_mount=False)
    assert restarted.prepare() == 1
    assert not dead.exists()
    assert Path(in_flight.path).read_bytes() == b"uploading"  # another live process's upload
    in_flight.discard()


def test_a_directory_being_claimed_is_not_swept(tmp_path: Path) -> None:
    """Two workers start at once: one between its `makedirs` and its `flock` must not lose its
    directory to the other's sweep; one left so by a process that died there goes in time."""
    root = tmp_path / "disk"
    root.mkdir()
    Disk(str(root), require_mount=False).prepare()
    claiming, abandoned = root / ".stor-tmp" / "c1a1", root / ".stor-tmp" / "dead"
    claiming.mkdir()
    abandoned.mkdir()
    os.utime(abandoned, (time.time() - 120, time.time() - 120))
    Disk(str(root), require_mount=False).prepare()
    assert claiming.exists() and not abandoned.exists()


def test_a_dead_directory_swept_by_another_worker_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers start at once after a crash: both find the dead process's directory, one
    removes it while the other is about to count its temps. Start-up goes on."""
    root = tmp_path / "disk"
    root.mkdir()
    dead = root / ".stor-tmp" / "deadbeef"
    dead.mkdir(parents=True)
    (dead / "owner.lock").touch()
    (dead / "1.tmp").write_bytes(b"x")

    def swept_meanwhile(parent: str) -> Iterator[str]:
        for path in owners.dead_owner_dirs(parent):
            shutil.rmtree(path)  # the other worker
            yield path

    monkeypatch.setattr(disk_module, "dead_owner_dirs", swept_meanwhile)
    assert Disk(str(root), require_mount=False).prepare() == 0
    assert not dead.exists()


def test_health_probe_writes_and_cleans_up(disks: list[Disk]) -> None:
    health = disks[0].probe_health()
    assert health.ok and health.writable and health.free_bytes > 0 and health.total_bytes >= health.free_bytes
    assert temp_files(Path(disks[0].root)) == []


def test_health_recovers_a_disk_that_comes_back(tmp_path: Path, disks: list[Disk]) -> None:
    """A replaced (empty) disk at the same path is claimed again without a restart."""
    root = Path(disks[0].root)
    os.rename(root, tmp_path / "old")
    assert not disks[0].probe_health().ok
    root.mkdir()
    assert disks[0].probe_health().ok
    PairWrite([disks[0]]).finish(SHA, MTIME, DATA)
    assert layout_path(root, SHA).read_bytes() == DATA


def test_commit_works_where_hard_links_are_refused(disks: list[Disk], monkeypatch: pytest.MonkeyPatch) -> None:
    """Some FUSE and network filesystems refuse link(2) with EPERM; the rename path is used."""

    def no_links(src: str, dst: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    paths = PairWrite(disks).finish(SHA, MTIME, DATA)
    assert [Path(p).read_bytes() for p in paths] == [DATA, DATA]
    again = PairWrite(disks).finish(SHA, MTIME + 10**9, DATA)  # exists: kept, not replaced
    assert [os.stat(p).st_mtime_ns for p in again] == [MTIME, MTIME]
    assert [temp_files(Path(d.root)) for d in disks] == [[], []]


def test_a_disk_admits_half_the_io_threads_then_waits_then_refuses() -> None:
    """A hung disk may hold half the threads, never all; one more operation waits a moment
    for a slot (a busy healthy disk frees one soon) and is refused when none frees."""
    limit = DISK_OPS_LIMIT
    assert limit == IO_THREADS // 2 >= 32
    ops = InflightOps("/disk", limit, busy_wait=0.2)
    with contextlib.ExitStack() as held:
        for _ in range(limit):
            held.enter_context(ops.op())
        assert ops.count() == limit
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="hung"), ops.op():
            pass
        assert time.monotonic() - started >= 0.2

        def free_one_soon() -> None:
            time.sleep(0.05)
            held.close()  # every slot frees

        threading.Thread(target=free_one_soon).start()
        with ops.op():  # waits for the slot instead of failing
            assert ops.count() == 1
    assert ops.count() == 0 and ops.oldest() == 0.0
