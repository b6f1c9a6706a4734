"""Group commit on a real filesystem: batching, the two phases, and failures that must never
be acknowledged. The syncfs failures are injected by replacing the one wrapper that calls it;
the real thing (strace, on ext4 images) is in tests/faults/test_crashes.py."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stor.backends import syscalls
from stor.backends.disk import GROUP_COMMIT_FILESYSTEMS, Disk
from stor.backends.groupcommit import GroupCommits
from stor.backends.pairs import PairWrite
from stor.backends.temps import TempFile
from stor.digest import Sha, sha_of
from stor.errors import StorageUnavailable
from tests.helpers import layout_path, prepared_disks, temp_files

MTIME = 1_600_000_000_123_456_789


def _fs_magic(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return syscalls.fs_magic(fd)
    finally:
        os.close(fd)


@pytest.fixture
def disks(tmp_path: Path) -> list[Disk]:
    if _fs_magic(tmp_path) not in GROUP_COMMIT_FILESYSTEMS:
        pytest.skip("the test directory is not on ext4, xfs or btrfs: no group commit there")
    return prepared_disks(tmp_path)


@pytest.fixture
def commits() -> Iterator[GroupCommits]:
    found = GroupCommits()
    yield found
    found.close()


def staged(disks: list[Disk], data: bytes) -> tuple[PairWrite, Sha]:
    sha = sha_of(data)
    writer = PairWrite(disks)
    writer.stage(sha, MTIME, data, group=True)
    return writer, sha


def fail_writeback_check(monkeypatch: pytest.MonkeyPatch, writer: PairWrite, error: Exception) -> None:
    """`sync_file_range` raises `error` for the writer's temps (the others go through)."""
    fds = {temp.fd for temp in writer.temps}
    real = syscalls.sync_file_range

    def failing(fd: int, flags: int, offset: int = 0, nbytes: int = 0) -> None:
        if fd in fds:
            raise error
        real(fd, flags, offset, nbytes)

    monkeypatch.setattr(syscalls, "sync_file_range", failing)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_temps_on_ext4_are_groupable_unless_turned_off(tmp_path: Path, disks: list[Disk]) -> None:
    temp = disks[0].new_temp()
    off = Disk(str(tmp_path / "m2"), require_mount=False, group_commit=False)
    off.prepare()
    other = off.new_temp()
    try:
        assert temp.groupable and not other.groupable
        assert temp.device == os.stat(tmp_path).st_dev
    finally:
        temp.discard()
        other.discard()


def test_shm_is_not_groupable() -> None:
    if _fs_magic(Path("/dev/shm")) != syscalls.TMPFS_MAGIC:
        pytest.skip("/dev/shm is not a tmpfs here")
    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="stor-test-"))
    try:
        disk = Disk(str(root), require_mount=False)
        disk.prepare()
        temp = disk.new_temp()
        assert not temp.groupable  # tmpfs: the per-file protocol (whose fsyncs cost nothing there)
        temp.discard()
    finally:
        shutil.rmtree(root)


def test_a_commit_makes_every_copy_visible_with_its_bytes_and_mtime(disks: list[Disk], commits: GroupCommits) -> None:
    fds = open_fds()
    data = os.urandom(5000)
    writer, sha = staged(disks, data)
    linked = commits.commit(writer.temps, sha).result(timeout=10)
    assert sorted(linked) == sorted((str(layout_path(Path(d.root), sha)), True) for d in disks)
    for disk in disks:
        copy = layout_path(Path(disk.root), sha)
        assert copy.read_bytes() == data
        assert copy.stat().st_mtime_ns == MTIME
        assert temp_files(Path(disk.root)) == []
    writer.abort()  # what the service does in the end: nothing left to remove
    assert open_fds() == fds  # the commit thread closed the temps' fds


def test_concurrent_uploads_share_cycles(disks: list[Disk], commits: GroupCommits) -> None:
    blobs = [os.urandom(4096) for _ in range(60)]
    writers = [staged(disks, data) for data in blobs]
    futures = [commits.commit(writer.temps, sha) for writer, sha in writers]
    for future in futures:
        future.result(timeout=20)
    for data in blobs:
        for disk in disks:
            assert layout_path(Path(disk.root), sha_of(data)).read_bytes() == data
    (stats,) = commits.stats().values()  # both members are on one filesystem: one commit thread
    assert stats.copies == 2 * 2 * len(blobs)  # each copy passes twice: durable, then linked
    assert stats.largest > 2  # some cycle served several uploads
    assert stats.cycles < stats.copies


def test_a_failed_syncfs_before_the_links_fails_the_upload_and_shows_nothing(
    disks: list[Disk], commits: GroupCommits, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(syscalls, "syncfs", failing)
    writer, sha = staged(disks, b"never acknowledged")
    with pytest.raises(StorageUnavailable, match="syncfs: Input/output error"):
        commits.commit(writer.temps, sha).result(timeout=10)
    writer.abort()
    for disk in disks:
        assert not layout_path(Path(disk.root), sha).exists()
        assert temp_files(Path(disk.root)) == []
        assert disk.io_errors == 1


def test_a_failed_syncfs_after_the_links_fails_the_upload(
    disks: list[Disk], commits: GroupCommits, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = syscalls.syncfs, [0]

    def second_fails(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(syscalls, "syncfs", second_fails)
    writer, sha = staged(disks, b"linked, but not known durable")
    with pytest.raises(StorageUnavailable):
        commits.commit(writer.temps, sha).result(timeout=10)
    writer.abort()
    for disk in disks:  # the copies may stay (valid blobs); no temp does
        copy = layout_path(Path(disk.root), sha)
        assert not copy.exists() or copy.read_bytes() == b"linked, but not known durable"
        assert temp_files(Path(disk.root)) == []


def test_a_writeback_error_fails_only_the_copy_it_hit(
    disks: list[Disk], commits: GroupCommits, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_writer, bad_sha = staged(disks, b"its writeback failed")
    good_writer, good_sha = staged(disks, b"written fine")
    fail_writeback_check(monkeypatch, bad_writer, OSError(errno.EIO, "Input/output error"))
    bad = commits.commit(bad_writer.temps, bad_sha)
    good = commits.commit(good_writer.temps, good_sha)
    with pytest.raises(StorageUnavailable, match="writeback"):
        bad.result(timeout=10)
    assert len(good.result(timeout=10)) == 2
    bad_writer.abort()
    for disk in disks:
        assert not layout_path(Path(disk.root), bad_sha).exists()
        assert layout_path(Path(disk.root), good_sha).exists()


def test_after_close_new_commits_are_refused(disks: list[Disk], commits: GroupCommits) -> None:
    writer, sha = staged(disks, b"first")
    commits.commit(writer.temps, sha).result(timeout=10)
    commits.close()
    late, late_sha = staged(disks, b"too late")
    with pytest.raises(StorageUnavailable, match="shutting down"):
        commits.commit(late.temps, late_sha).result(timeout=10)
    late.abort()
    assert all(temp_files(Path(d.root)) == [] for d in disks)


def test_an_empty_phase_resolves_at_once(commits: GroupCommits) -> None:
    empty: list[TempFile] = []
    assert commits.commit(empty, Sha("0" * 64)).result(timeout=1) == []


def test_an_unexpected_error_in_a_cycle_fails_its_uploads_and_the_thread_goes_on(
    disks: list[Disk], commits: GroupCommits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (not a storage error) in a cycle fails the uploads it had not answered yet,
    never leaves one waiting, and the commit thread serves the next ones."""
    good_writer, good_sha = staged(disks, b"in the cycle, or the next")
    bad_writer, bad_sha = staged(disks, b"meets a bug")
    fail_writeback_check(monkeypatch, bad_writer, RuntimeError("a bug, not an OSError"))
    good = commits.commit(good_writer.temps, good_sha)
    bad = commits.commit(bad_writer.temps, bad_sha)
    with pytest.raises(StorageUnavailable, match="group commit failed"):
        bad.result(timeout=10)
    try:  # it shared the failed cycle (its second phase may have): failed, or else done whole
        assert len(good.result(timeout=10)) == 2
    except StorageUnavailable as exc:
        assert "group commit failed" in str(exc)
    good_writer.abort()
    bad_writer.abort()
    later, later_sha = staged(disks, b"after the bug")
    assert len(commits.commit(later.temps, later_sha).result(timeout=10)) == 2  # the thread is alive
