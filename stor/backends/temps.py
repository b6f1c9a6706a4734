"""A temp file on one disk that becomes a blob copy (or a record), and the directory fsync
and error translation that the write protocol shares with `disk`.

Contract: every failure is `StorageUnavailable`, or `InsufficientStorage` for a full disk;
`discard` is safe at any point and more than once. Blocking; thread-safe per file.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import Protocol

from stor.backends import syscalls, xattrs
from stor.backends.clearmark import ClearMark
from stor.backends.inflight import InflightOps, guarded
from stor.checksum import FastSum
from stor.digest import Sha
from stor.errors import InsufficientStorage, StorageUnavailable


class Home(Protocol):
    """What a temp file needs of the directory it lives in (a `Disk`)."""

    root: str
    inflight: InflightOps
    clear: ClearMark

    def blob_path(self, sha: Sha) -> str: ...

    def orphan(self, path: str) -> None: ...

    def count_error(self) -> None: ...


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


def disk_error(disk: Home, action: str, exc: OSError) -> StorageUnavailable | InsufficientStorage:
    disk.count_error()
    message = f"{disk.root}: {action}: {exc.strerror or exc}"
    if exc.errno in _NO_SPACE:
        return InsufficientStorage(message)
    return StorageUnavailable(message)


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TempFile:
    """A temp file on one disk that becomes a blob copy, or vanishes with `discard`.

    Alone: `sync`, then `commit`. Group-committed (see `groupcommit`): `set_mtime`, a `syncfs`
    of its filesystem, `check_written`, `link`, another `syncfs`, `discard` (which then only
    closes the fd)."""

    def __init__(self, disk: Home, path: str, fd: int, device: int, groupable: bool) -> None:
        self.disk = disk
        self.inflight = disk.inflight
        self.path = path
        self.device = device
        """`st_dev` of its filesystem: which `GroupCommit` it belongs to."""
        self.groupable = groupable
        """Its filesystem's `syncfs` can make it durable (see `GROUP_COMMIT_FILESYSTEMS`)."""
        self.created = time.monotonic_ns()
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        """The open fd (a `syncfs` called on it reports writeback errors since it was opened)."""
        return self._require_fd()

    @guarded
    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._require_fd(), view)
            except OSError as exc:
                raise disk_error(self.disk, "write", exc) from exc
            view = view[written:]  # a short write happens just before ENOSPC

    @guarded
    def sync(self, mtime_ns: int) -> None:
        """Give the file its final mtime and make its bytes durable."""
        self.set_mtime(mtime_ns)
        try:
            os.fsync(self._require_fd())  # a failed fsync is final: the caller fails the request, never retries
        except OSError as exc:
            raise disk_error(self.disk, "fsync", exc) from exc

    def set_sum(self, digest: FastSum) -> None:
        """Record the copy's fast checksum (before the sync that makes it durable with the bytes).
        A filesystem that cannot keep it leaves the copy without one (see `xattrs`)."""
        try:
            xattrs.write_sum(self._require_fd(), digest)
        except OSError as exc:
            raise disk_error(self.disk, "setxattr", exc) from exc

    def set_mtime(self, mtime_ns: int) -> None:
        try:
            os.utime(self._require_fd(), ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            raise disk_error(self.disk, "utime", exc) from exc

    @guarded
    def start_writeback(self) -> None:
        """Start writing the dirty pages out without waiting (a large upload calls this as it
        spools, so the `syncfs` that later commits it has little left to write)."""
        try:
            syscalls.sync_file_range(self._require_fd(), syscalls.SYNC_FILE_RANGE_WRITE)
        except OSError as exc:
            raise disk_error(self.disk, "write", exc) from exc

    @guarded
    def check_written(self) -> None:
        """After a `syncfs` wrote this file out: raise if any of its writeback failed since it
        was opened. `sync_file_range` with WAIT_AFTER reports the file's own writeback errors
        (once, to this fd) without another journal commit."""
        flags = (
            syscalls.SYNC_FILE_RANGE_WAIT_BEFORE | syscalls.SYNC_FILE_RANGE_WRITE | syscalls.SYNC_FILE_RANGE_WAIT_AFTER
        )
        try:
            syscalls.sync_file_range(self._require_fd(), flags)
        except OSError as exc:
            raise disk_error(self.disk, "writeback", exc) from exc

    @guarded
    def commit(self, sha: Sha) -> tuple[str, bool]:
        """Link the synced file to its blob name: (final path, True if this call created it).

        An existing copy is kept (content addressing: it holds the same bytes), so concurrent
        uploads of one sha never replace each other's file.
        """
        self._close()
        final = self.disk.blob_path(sha)
        try:
            created, new_dirs = self._link(final)
            for directory in (os.path.dirname(final), *new_dirs):
                fsync_dir(directory)
        except OSError as exc:
            raise disk_error(self.disk, "commit", exc) from exc
        return final, created

    @guarded
    def link(self, sha: Sha) -> tuple[str, bool]:
        """`commit` without the fsyncs, for a group commit whose next `syncfs` makes the new
        name (and any new directory) durable. The fd stays open for that `syncfs`."""
        final = self.disk.blob_path(sha)
        try:
            created, _ = self._link(final)
        except OSError as exc:
            raise disk_error(self.disk, "commit", exc) from exc
        return final, created

    def _link(self, final: str) -> tuple[bool, list[str]]:
        new_dirs = make_parents(self.disk.root, os.path.dirname(final))
        created = _link_no_replace(self.path, final)
        self.path = ""
        return created, new_dirs

    @guarded
    def replace(self, final: str) -> None:
        """Rename the synced file over `final`, replacing it, and fsync its directory: for small
        mutable records (blob copies use `commit`, which never replaces)."""
        self._close()
        try:
            os.replace(self.path, final)
            self.path = ""
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            raise disk_error(self.disk, "replace", exc) from exc

    def discard(self) -> None:
        """Remove the temp file; safe to call at any point, more than once."""
        self._close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError:  # read-only now? retried once the disk takes writes again
                self.disk.orphan(self.path)
            self.path = ""

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError("temp file already closed")
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _link_no_replace(temp: str, final: str) -> bool:
    """Give `temp` the name `final` unless it exists; True if this call made it. The temp
    name is gone afterwards either way."""
    try:
        os.link(temp, final)
    except FileExistsError:
        os.unlink(temp)
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: check, then rename. Only another process racing for the same
        # sha can slip in between, and it would put the same bytes there.
        if os.path.exists(final):
            os.unlink(temp)
            return False
        os.rename(temp, final)
        return True
    os.unlink(temp)
    return True


def make_parents(
    root: str,
    directory: str,
    *,
    before: Callable[[str, str], None] | None = None,
    after: Callable[[str, str], None] | None = None,
) -> list[str]:
    """mkdir the missing levels of `directory` below `root`; return the parents whose entries
    changed, which must be fsynced for the new directories to survive a crash. `before` and
    `after` are told (parent, name) around each `mkdir` that this call makes (a journal of the
    parent's entries: see `nameindex`)."""
    missing: list[str] = []
    current = directory
    while current != root and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    changed: list[str] = []
    for path in reversed(missing):
        parent, name = os.path.split(path)
        if before is not None:
            before(parent, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            continue  # (its maker tells `after`)
        if after is not None:
            after(parent, name)
        changed.append(parent)
    return changed
