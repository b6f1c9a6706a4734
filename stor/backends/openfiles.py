"""Copies of small blobs kept open, so that a hot blob's GET or HEAD needs no thread hop.

Handing a call to a worker thread costs far more CPU than reading a small file (about 90 µs
against 10 µs measured here: the GIL changes hands around every syscall the thread makes).
So small copies are kept open here, with the stat of the open file, and read on the event loop
with `nowait.read_cached`, which answers from the page cache or not at all. A copy gets here
two ways: a worker thread that opened and read it leaves its fd (`put`), or the event loop
opens it itself with `nowait.open_cached` when its path is in the dentry cache (`open`).
Anything short of a full answer (a miss, EAGAIN, a short read, an error) sends the request
down the thread path, which does the real work and its error handling. Only disks whose
filesystem takes RWF_NOWAIT are used (`usable`, learned by the disk's health probe); nothing
here ever waits on a disk.

A blob's bytes never change, so an open fd holds the right ones (and reads are still verified
by the caller). Each use checks with `fstat` that the file is still linked and whole, so a copy
removed or replaced by hand stops being served at once; entries also expire after `ttl`
seconds, and are dropped when a copy is found corrupt or its disk stops answering. The fds of
dropped entries are closed off the event loop (the last close of a file can do I/O): by the
next `put`, or by `close_dropped` when `closing_due` says enough have piled up.

Thread-safe; one instance per worker process. `capacity` is bounded by the process's open
file limit (see `fd_budget`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from stor.backends import nowait
from stor.backends.disk import Disk
from stor.checksum import FastSum
from stor.digest import Sha
from stor.model import BlobStat

READ_ON_LOOP_BYTES = 256 * 1024
"""Copies up to this size are read on the event loop; a bigger one would hold the loop while
it is copied and hashed (bigger copies are still kept open: a HEAD needs only their stat)."""
CLOSE_BATCH = 64
"""Dropped fds that may wait for a worker thread to close them."""


@dataclass(eq=False)
class OpenCopy:
    disk: Disk
    fd: int
    stat: BlobStat
    expires: float
    fast: FastSum | None = None
    """The fast checksum of the bytes this fd held when they were verified (None: not yet)."""


class OpenFiles:
    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[Sha, OpenCopy] = OrderedDict()
        self._dropped: list[int] = []
        self._lock = threading.Lock()

    def usable(self, disk: Disk) -> bool:
        """Whether copies on `disk` may be kept open: its filesystem takes RWF_NOWAIT."""
        return self.capacity > 0 and disk.takes_nowait

    def get(self, sha: Sha) -> OpenCopy | None:
        """The open copy of `sha`, checked with one `fstat` (in memory on the filesystems
        used here): None when there is none, it expired, or the file was removed, replaced
        or truncated since it was opened."""
        with self._lock:
            entry = self._entries.get(sha)
            if entry is None:
                return None
            try:
                st = os.fstat(entry.fd)
                current = st.st_nlink > 0 and st.st_size == entry.stat.size
            except OSError:
                current = False
            if not current or entry.expires < time.monotonic():
                del self._entries[sha]
                self._dropped.append(entry.fd)
                return None
            self._entries.move_to_end(sha)
            return entry

    def open(self, sha: Sha, disk: Disk) -> OpenCopy | None:
        """Open the copy of `sha` on `disk` from the kernel's caches alone and keep it; None
        when that cannot be done without waiting. FileNotFoundError when the dentry cache
        knows there is no such file (under this path: see `BlobService._absent_everywhere`).
        Safe on the loop."""
        if not self.usable(disk):
            return None
        path = disk.blob_path(sha)
        fd = nowait.open_cached(path)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            self._drop(fd)
            return None
        return self._keep(sha, disk, fd, BlobStat(path, st.st_size, st.st_mtime_ns))

    def put(self, sha: Sha, disk: Disk, fd: int, stat: BlobStat, fast: FastSum | None = None) -> None:
        """Keep `fd`, opened by a worker thread (ownership passes here, kept or not), with the
        fast checksum of its verified bytes. Call from a worker thread: it closes what was
        dropped."""
        if self.usable(disk):
            self._keep(sha, disk, fd, stat).fast = fast
        else:
            self._drop(fd)
        self.close_dropped()

    def _keep(self, sha: Sha, disk: Disk, fd: int, stat: BlobStat) -> OpenCopy:
        entry = OpenCopy(disk, fd, stat, time.monotonic() + self.ttl)
        with self._lock:
            old = self._entries.pop(sha, None)
            if old is not None:
                self._dropped.append(old.fd)
            self._entries[sha] = entry
            while len(self._entries) > self.capacity:
                self._dropped.append(self._entries.popitem(last=False)[1].fd)
        return entry

    def _drop(self, fd: int) -> None:
        with self._lock:
            self._dropped.append(fd)

    def read(self, entry: OpenCopy) -> bytes | None:
        """The whole copy from the page cache, or None when it is too big to read on the loop,
        that would mean waiting, or it fails (the thread path finds out what is wrong)."""
        if entry.stat.size > READ_ON_LOOP_BYTES:
            return None
        return nowait.read_cached(entry.fd, entry.stat.size)

    def forget(self, sha: Sha) -> None:
        """Drop the entry of `sha`: a copy was found corrupt."""
        with self._lock:
            entry = self._entries.pop(sha, None)
            if entry is not None:
                self._dropped.append(entry.fd)

    def forget_disk(self, root: str) -> None:
        """Drop every entry on a disk that stopped answering (or went away)."""
        with self._lock:
            for sha, entry in list(self._entries.items()):
                if entry.disk.root == root:
                    del self._entries[sha]
                    self._dropped.append(entry.fd)

    @property
    def closing_due(self) -> bool:
        """Enough dropped fds wait that a worker thread should run `close_dropped`."""
        return len(self._dropped) >= CLOSE_BATCH

    def close_dropped(self) -> None:
        """Close the fds of dropped entries. Blocking: call from a worker thread."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        for fd in dropped:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._dropped.extend(entry.fd for entry in self._entries.values())
            self._entries.clear()
        self.close_dropped()

    @property
    def held(self) -> int:
        """How many copies are kept open now."""
        return len(self._entries)


def fd_budget(wanted: int) -> int:
    """How many fds the cache may hold: `wanted`, leaving the rest of this process's open-file
    limit (raised to its hard limit first) for sockets, uploads and everything else: a quarter
    of it, at least 4,096 fds, but never more than half."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    reserve = min(max(soft // 4, 4096), soft // 2)
    return max(0, min(wanted, soft - reserve))
