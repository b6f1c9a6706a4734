"""One storage directory: Stor's layout, the durable write protocol, reads and a health probe.

Contract:
- A miss is `None`, not an error. Any other failure to use the directory (I/O error, disk
  unmounted, permission) is `StorageUnavailable`; a full disk while writing is
  `InsufficientStorage`. No other exception escapes, except `MemoryError` and friends.
- A blob becomes visible only complete and durable: bytes go to a temp file in
  `<root>/.stor-tmp/<owner>/` (same filesystem), are fsynced, then linked to their final name
  and the directory fsynced. An existing final name is never replaced.
- Each copy is given its fast checksum (`stor.checksum`) with its bytes, where the filesystem
  keeps user xattrs; a copy without one is still a valid copy.
- `<root>/.stor-tmp` doubles as a mount sentinel: stor creates it only on a verified root, so
  a bare mountpoint (disk unmounted) lacks it and every use of that disk fails instead of
  writing onto the wrong filesystem or answering a false "absent". The event loop proves a
  miss with the disk's clear mark (`clearmark`), which lives there.
- A temp on a filesystem whose `syncfs` is real (`TempFile.groupable`) may instead be made
  durable and linked by a `GroupCommit` (one `syncfs` for many uploads), in the same order.
- Every method is safe to call from several threads at once, and blocks: call them from a
  worker thread, never from the event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time

from stor.backends import nowait, syscalls, xattrs
from stor.backends.clearmark import ClearMark
from stor.backends.inflight import InflightOps, guarded
from stor.backends.opencopy import OpenCopy
from stor.backends.owners import OwnedDir, dead_owner_dirs
from stor.backends.quarantine import Quarantine
from stor.backends.temps import TempFile, disk_error, fsync_dir
from stor.checksum import FastSum
from stor.digest import Sha, blob_relpath
from stor.errors import StorageUnavailable
from stor.model import BlobStat, DiskHealth, HashedCopy

TMP_DIR = ".stor-tmp"
GROUP_COMMIT_FILESYSTEMS = frozenset({syscalls.EXT4_MAGIC, syscalls.XFS_MAGIC, syscalls.BTRFS_MAGIC})
"""Filesystems whose `syncfs` writes back every dirty file and commits the journal, reporting
errors. Not FUSE (its syncfs may do nothing at all), NFS or tmpfs (nothing to make durable)."""


class Disk:
    def __init__(self, root: str, *, require_mount: bool, max_inflight: int = 32, group_commit: bool = True) -> None:
        self.root = root
        self.require_mount = require_mount
        self.group_commit = group_commit
        """Its temps may be group-committed, where their filesystem allows (`TempFile.groupable`)."""
        self._groupable_on: tuple[int, bool] | None = None  # (device, whether syncfs is real there)
        self.inflight = InflightOps(root, max_inflight)
        self._errors = 0
        self._orphans: set[str] = set()  # temps that could not be removed (disk read-only?)
        self._lock = threading.Lock()
        self.tmp_root = os.path.join(root, TMP_DIR)
        self._owner = OwnedDir(self.tmp_root)
        self._claiming = threading.RLock()  # a claim and `close` never interleave
        self._closed = False
        self._counter = itertools.count()
        self.clear = ClearMark(self.tmp_root, self._owner.path)
        self.quarantine = Quarantine(self)
        self.takes_nowait = False
        """Its filesystem answers RWF_NOWAIT reads (see `nowait`); learned by health probes."""

    def __repr__(self) -> str:
        return f"Disk({self.root!r})"

    @property
    def io_errors(self) -> int:
        """Failed operations on this disk since start-up (misses are not failures)."""
        return self._errors

    def count_error(self) -> None:
        with self._lock:
            self._errors += 1

    def orphan(self, path: str) -> None:
        """A temp of ours that could not be removed: the next good health probe retries."""
        with self._lock:
            self._orphans.add(path)

    def _remove_orphans(self) -> None:
        with self._lock:
            orphans, self._orphans = self._orphans, set()
        for path in orphans:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                self.orphan(path)

    def stalled(self, after: float) -> bool:
        """An operation has been running on this disk for longer than `after` seconds."""
        return self.inflight.oldest() > after

    def blob_path(self, sha: Sha) -> str:
        return os.path.join(self.root, blob_relpath(sha))

    # -- start-up --------------------------------------------------------------------------

    def prepare(self, *, sweep: bool = True) -> int:
        """Claim this process's temp directory and (with `sweep`) remove temps left by dead
        processes.

        Returns how many stale temp files were removed. Never creates `root` itself.
        Calling it again once the directory is claimed does nothing.
        """
        with self._claiming:
            self._closed = False
            if self._owner.claimed:
                return 0
            if not os.path.isdir(self.root):
                raise StorageUnavailable(f"{self.root}: storage directory is missing")
            if self.require_mount and not self._is_mounted():
                raise StorageUnavailable(f"{self.root}: not a mounted filesystem")
            try:
                os.makedirs(self.tmp_root, exist_ok=True)
                removed = self.sweep_temps() if sweep else 0
                self._owner.claim()
                self.clear.forget()  # what was listed before the disk went away proves nothing now
            except OSError as exc:
                raise disk_error(self, "preparing the temp directory", exc) from exc
            return removed

    def close(self) -> None:
        """Let go of the temp directory claimed by `prepare` (its lock file's fd) for good: a
        health probe still running will not claim it again; only `prepare` does. (A probe hung
        inside `prepare` on a dead disk is not waited for beyond a second.)"""
        held = self._claiming.acquire(timeout=1.0)
        try:
            self._closed = True
            self._owner.release()
        finally:
            if held:
                self._claiming.release()

    def sweep_temps(self) -> int:
        """Remove the temp directories of processes that are gone. Several stor processes may
        share a disk; a live one's uploads in flight are never touched (see `owners`)."""
        removed = 0
        for entry in os.scandir(self.tmp_root):
            if not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):  # another process swept it first
                    os.unlink(entry.path)
                    removed += 1
        for dead in dead_owner_dirs(self.tmp_root):
            if dead == self._owner.path:
                continue  # ours, let go of while the disk was away: its temps are still ours
            try:
                removed += sum(1 for name in os.listdir(dead) if name.endswith(".tmp"))
            except FileNotFoundError:
                continue  # another worker starting at the same time swept it first
            shutil.rmtree(dead, ignore_errors=True)
        return removed

    def _is_mounted(self) -> bool:
        parent = os.path.dirname(self.root.rstrip("/")) or "/"
        return os.path.ismount(self.root) or os.stat(self.root).st_dev != os.stat(parent).st_dev

    # -- reads -----------------------------------------------------------------------------

    @guarded
    def stat(self, sha: Sha) -> BlobStat | None:
        """Size and mtime of the copy of `sha` here, or None when this disk has none."""
        path = self.blob_path(sha)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._confirm_present()
            return None
        except OSError as exc:
            raise disk_error(self, "stat", exc) from exc
        return BlobStat(path, st.st_size, st.st_mtime_ns)

    def _confirm_present(self) -> None:
        """A miss counts only if the disk is really there (see the module docstring)."""
        try:
            os.stat(self.tmp_root)
        except OSError as exc:
            raise StorageUnavailable(f"{self.root}: storage not available ({exc.strerror})") from exc

    @guarded
    def open(self, sha: Sha) -> OpenCopy[Disk] | None:
        """Open the copy of `sha` for reading (the caller owns it), or None when there is none."""
        path = self.blob_path(sha)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self._confirm_present()
            return None
        except OSError as exc:
            raise disk_error(self, "open", exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise disk_error(self, "fstat", exc) from exc
        return OpenCopy(self, fd, BlobStat(path, st.st_size, st.st_mtime_ns))

    def open_cached(self, sha: Sha) -> OpenCopy[Disk] | None:
        """`open` from the kernel's caches alone (see `nowait`), safe on the event loop: None
        when that would wait or fails. FileNotFoundError when the dentry cache knows the copy
        is absent (which proves nothing unless the disk is proved mounted: `clear`)."""
        path = self.blob_path(sha)
        fd = nowait.open_cached(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)  # a read-only fd: its close does no I/O
            return None
        return OpenCopy(self, fd, BlobStat(path, st.st_size, st.st_mtime_ns))

    def size_cached(self, sha: Sha) -> int | None:
        """The size of the copy of `sha` from the kernel's caches alone; None when that would
        wait. FileNotFoundError when the dentry cache knows it is absent."""
        st = nowait.stat_cached(self.blob_path(sha))
        return None if st is None else st.st_size

    @guarded
    def read_at(self, fd: int, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset`; a short file is an error, never short data."""
        parts: list[bytes] = []
        while size > 0:
            try:
                chunk = os.pread(fd, size, offset)
            except OSError as exc:
                raise disk_error(self, "read", exc) from exc
            if not chunk:
                raise StorageUnavailable(f"{self.root}: copy is shorter than its recorded size")
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @guarded
    def read_into(self, fd: int, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from `offset` with one `preadv` (no new bytes object): the count read,
        0 at the end of the file."""
        try:
            return os.preadv(fd, [buffer], offset)
        except OSError as exc:
            raise disk_error(self, "read", exc) from exc

    @guarded
    def read_some(self, fd: int, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`; empty at the end of the file."""
        return self._pread(fd, size, offset)

    @guarded
    def hash_copy(self, sha: Sha, *, keep: int = 0) -> HashedCopy | None:
        """The copy here hashed whole (see `OpenCopy.hashed`), or None when there is none."""
        copy = self.open(sha)
        if copy is None:
            return None
        with copy:
            return copy.hashed(keep=keep)

    def read_sum(self, fd: int) -> FastSum | None:
        """The fast checksum recorded on the open copy `fd`, or None (see `xattrs`)."""
        return xattrs.read_sum(fd)

    def write_sum(self, fd: int, digest: FastSum) -> bool:
        """Record `digest` on the open copy `fd`, verified by the caller; best effort (a copy
        without one is checked by SHA-256): False when it was not kept."""
        try:
            return xattrs.write_sum(fd, digest)
        except OSError:
            self.count_error()
            return False

    @guarded
    def record_sum(self, sha: Sha, digest: FastSum) -> bool:
        """Give the copy of `sha` here the fast checksum `digest` (of bytes verified as `sha`)
        unless it has it already; best effort, like `write_sum`. True: it has it now."""
        try:
            fd = os.open(self.blob_path(sha), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return xattrs.read_sum(fd) == digest or self.write_sum(fd, digest)
        finally:
            os.close(fd)

    def _pread(self, fd: int, size: int, offset: int) -> bytes:
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            raise disk_error(self, "read", exc) from exc

    # -- writes ----------------------------------------------------------------------------

    @guarded
    def remove(self, sha: Sha) -> bool:
        """Unlink this disk's copy of `sha`, durably (for `stor evacuate`, once the blob is
        durable elsewhere). False if there was none."""
        path = self.blob_path(sha)
        try:
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise disk_error(self, "remove", exc) from exc
        return True

    @guarded
    def new_temp(self) -> TempFile:
        name = f"{next(self._counter)}.tmp"
        path = os.path.join(self._owner.path, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise disk_error(self, "creating a temp file", exc) from exc
        try:
            device = os.fstat(fd).st_dev
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise disk_error(self, "fstat of a temp file", exc) from exc
        return TempFile(self, path, fd, device, self._groupable(fd, device))

    def _groupable(self, fd: int, device: int) -> bool:
        """Whether temps on `device` can wait for a `syncfs` (see `groupcommit`): asked of the
        filesystem once per device (a disk replaced and mounted again is a new one)."""
        if not self.group_commit:
            return False
        known = self._groupable_on
        if known is None or known[0] != device:
            known = self._groupable_on = (device, syscalls.fs_magic(fd) in GROUP_COMMIT_FILESYSTEMS)
        return known[1]

    @guarded
    def free_bytes(self) -> int:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise disk_error(self, "statvfs", exc) from exc
        return st.f_bavail * st.f_frsize

    # -- health ----------------------------------------------------------------------------

    def probe_health(self) -> DiskHealth:
        """Present, mounted (when required) and writable — checked by writing a probe file."""
        mounted = writable = readable = False
        free = total = 0
        error: str | None = None
        try:
            if not os.path.isdir(self.root):
                raise StorageUnavailable("storage directory is missing")
            mounted = self._is_mounted()
            if self.require_mount and not mounted:
                raise StorageUnavailable("not a mounted filesystem (disk unmounted?)")
            st = os.statvfs(self.root)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            readable = os.path.isdir(self.tmp_root)  # the sentinel: this is stor's filesystem
            self._recover_temp_dir()
            self._write_probe()
            writable = True
            self._remove_orphans()
            self.clear.revalidate()
        except StorageUnavailable as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{exc.strerror or exc}"
        if not readable:
            self._owner.release()  # a disk that went away is let go of: nothing of ours keeps it busy
            self.clear.forget()
        return DiskHealth(self.root, error is None, mounted, writable, free, total, error, self.io_errors, readable)

    def _recover_temp_dir(self) -> None:
        """After a disk comes back (remounted, replaced), claim a temp directory on it again."""
        with self._claiming:
            if not self._owner.claimed and not self._closed:
                self._owner.release()
                self.prepare()

    def _write_probe(self) -> None:
        path = os.path.join(self._owner.path, f"probe-{next(self._counter)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"stor")
            self.takes_nowait = nowait.supported(fd)
        finally:
            os.close(fd)
            os.unlink(path)


def now_ns() -> int:
    return time.time_ns()
