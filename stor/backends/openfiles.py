"""Copies of small blobs kept open, so that a hot blob's GET or HEAD needs no thread hop.

Handing a call to a worker thread costs far more CPU than reading a small file (about 90 µs
against 10 µs measured here: the GIL changes hands around every syscall the thread makes).
So a worker thread that opened and read a small copy leaves its fd here, with the stat of
that open file, and the next read of the same blob happens on the event loop with
`preadv2(RWF_NOWAIT)`: the kernel answers from the page cache or fails with EAGAIN at once,
never waiting for the disk. Anything but a full read (a miss, EAGAIN, a short read, a
filesystem without RWF_NOWAIT such as FUSE, an error) sends the request down the thread path,
which does the real work and its error handling. Nothing here can block the event loop: it
never opens, stats or closes a file there.

A blob's bytes never change, so an open fd holds the right ones (and reads are still verified
by the caller). Each use checks with `fstat` that the file is still linked and whole, so a copy
removed or replaced by hand stops being served at once; entries also expire after `ttl`
seconds, and are dropped when a copy is found corrupt or its disk stops answering. The fds of
dropped entries are closed by the next `put` (always called in a worker thread: the last close
of a file can do I/O) or by `close_dropped`.

Thread-safe; one instance per worker process. `capacity` is bounded by the process's open
file limit (see `fd_budget`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from stor.backends.disk import BlobStat, Disk
from stor.digest import Sha

_NOT_NOW = {errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL}


@dataclass(frozen=True)
class OpenCopy:
    disk: Disk
    fd: int
    stat: BlobStat
    expires: float


class OpenFiles:
    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[Sha, OpenCopy] = OrderedDict()
        self._dropped: list[int] = []
        self._no_nowait: set[str] = set()  # disk roots whose filesystem refuses RWF_NOWAIT
        self._probed: set[str] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, sha: Sha) -> OpenCopy | None:
        """The open copy of `sha`, checked with one `fstat` (in memory on the filesystems
        that take RWF_NOWAIT): None when there is none, it expired, or the file was removed,
        replaced or truncated since it was opened."""
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

    def accepts(self, disk: Disk) -> bool:
        return self.capacity > 0 and disk.root not in self._no_nowait

    def put(self, sha: Sha, disk: Disk, fd: int, stat: BlobStat) -> None:
        """Keep `fd` (ownership passes here, taken or not). Call from a worker thread."""
        if disk.root not in self._probed:
            self._probe(disk, fd)
        with self._lock:
            if self.accepts(disk) and sha not in self._entries:
                self._entries[sha] = OpenCopy(disk, fd, stat, time.monotonic() + self.ttl)
                while len(self._entries) > self.capacity:
                    self._dropped.append(self._entries.popitem(last=False)[1].fd)
            else:
                self._dropped.append(fd)
        self.close_dropped()

    def read(self, sha: Sha, entry: OpenCopy) -> bytes | None:
        """The whole copy from the page cache, or None when that would mean waiting (or any
        error: the thread path finds out what is wrong). Safe on the event loop."""
        size = entry.stat.size
        buffer = bytearray(size)
        try:
            got = os.preadv(entry.fd, [buffer], 0, os.RWF_NOWAIT) if size else 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._refuse(entry.disk.root)
            elif exc.errno not in _NOT_NOW:
                self.forget(sha)
            return None
        if got != size:
            return None
        return bytes(buffer)

    def forget(self, sha: Sha) -> None:
        """Drop the entry of `sha`: a copy was found corrupt, or a read of it failed."""
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

    def _probe(self, disk: Disk, fd: int) -> None:
        """Learn once per disk whether its filesystem takes RWF_NOWAIT (tmpfs and FUSE do not)."""
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._refuse(disk.root)
        self._probed.add(disk.root)

    def _refuse(self, root: str) -> None:
        with self._lock:
            self._no_nowait.add(root)
        self.forget_disk(root)

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
    """How many fds the cache may hold: `wanted`, within a quarter of this process's open-file
    limit (raised to its hard limit first), so sockets and uploads always have room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(0, min(wanted, soft // 4))
