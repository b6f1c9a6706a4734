"""Removing many copies from one disk at disk speed (`stor evacuate`, once they are durable
elsewhere): every copy unlinked, then the removals made durable together, with one `syncfs`
where the filesystem has a real one (else each directory is fsynced, as `Disk.remove` does).

A crash before the `syncfs` may bring some copies back: harmless, they are whole blobs stored
elsewhere too, and the next evacuation removes them again. Blocking; used from one thread.
"""

from __future__ import annotations

import os

from stor.backends import syscalls
from stor.backends.disk import GROUP_COMMIT_FILESYSTEMS, Disk
from stor.backends.temps import disk_error, fsync_dir
from stor.digest import Sha


def remove_copies(disk: Disk, shas: list[Sha]) -> tuple[list[Sha], list[tuple[Sha, str]]]:
    """Unlink `disk`'s copies of `shas`, durably: the shas whose copy was removed (once the
    removals are durable), and those whose copy could not be (why). `StorageUnavailable` when
    the disk cannot make the removals durable (they may or may not be)."""
    removed: list[Sha] = []
    failed: list[tuple[Sha, str]] = []
    with disk.inflight.op():
        for sha in shas:
            try:
                os.unlink(disk.blob_path(sha))
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed.append((sha, str(disk_error(disk, "remove", exc))))
                continue
            removed.append(sha)
        if removed:
            _make_durable(disk, removed)
    return removed, failed


def _make_durable(disk: Disk, removed: list[Sha]) -> None:
    try:
        fd = os.open(disk.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if disk.group_commit and syscalls.fs_magic(fd) in GROUP_COMMIT_FILESYSTEMS:
                syscalls.syncfs(fd)
                return
        finally:
            os.close(fd)
        for directory in sorted({os.path.dirname(disk.blob_path(sha)) for sha in removed}):
            fsync_dir(directory)
    except OSError as exc:
        raise disk_error(disk, "remove", exc) from exc
