"""One open copy of a blob on a disk, owned: the only holder of its file descriptor.

`Disk.open` (a worker thread) and `Disk.open_cached` (the event loop, from the kernel's caches
alone) make one; whoever holds it reads through it and closes it, exactly once (a second
`close` does nothing; it is a context manager). Code above the backends never sees the fd
except to hand it to `sendfile`. The stat is that of the open file, so a copy replaced on disk
after the open keeps answering with the bytes and the size it was opened with.

`fast` is what the holder learned of the bytes: the fast checksum of what they were when they
were verified (None: not verified yet). Reads may come from several threads at once; `close`
must not race them (the holder closes when it is done reading).
"""

from __future__ import annotations

import contextlib
import os
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from stor.backends import nowait
from stor.checksum import FastHasher, FastSum
from stor.digest import Sha, new_hasher
from stor.model import BlobStat, HashedCopy


class DiskReads(Protocol):
    """What an open copy needs of its disk (`disk.Disk`): guarded reads, errors translated."""

    root: str
    takes_nowait: bool

    def read_at(self, fd: int, offset: int, size: int) -> bytes: ...

    def read_some(self, fd: int, offset: int, size: int) -> bytes: ...

    def read_into(self, fd: int, buffer: memoryview, offset: int) -> int: ...

    def read_sum(self, fd: int) -> FastSum | None: ...

    def write_sum(self, fd: int, digest: FastSum) -> bool: ...


D = TypeVar("D", bound=DiskReads)


class OpenCopy(Generic[D]):
    """An open copy on a disk of type `D` (in practice `OpenCopy[disk.Disk]`)."""

    __slots__ = ("_fd", "disk", "fast", "recheck_at", "stat")

    def __init__(self, disk: D, fd: int, stat: BlobStat) -> None:
        self.disk = disk
        self.stat = stat
        self.fast: FastSum | None = None
        """The checksum of the bytes verified, once they were (see `OpenFiles`)."""
        self.recheck_at = 0.0
        """When its partners are to be checked again (`time.monotonic()`; see `OpenFiles.due`):
        at once for a copy this process has not checked them for."""
        self._fd = fd

    def __repr__(self) -> str:
        return f"OpenCopy({self.stat.path!r}, {'closed' if self._fd < 0 else self._fd})"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd, for `sendfile` only: it stays this copy's to close."""
        if self._fd < 0:
            raise ValueError("copy already closed")
        return self._fd

    def current(self) -> bool:
        """Whether the file is still linked and of the size it was opened with (one `fstat`,
        in memory on the filesystems whose copies are kept open): a copy removed, replaced or
        truncated since then must not be served."""
        try:
            st = os.fstat(self.fileno())
        except (OSError, ValueError):
            return False
        return st.st_nlink > 0 and st.st_size == self.stat.size

    # -- reads (blocking, but `read_cached`; disk errors become `StorageUnavailable`) ---------

    def read_at(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset`; a short file is an error, never short data."""
        return self.disk.read_at(self.fileno(), offset, size)

    def read_some(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`; empty at the end of the file."""
        return self.disk.read_some(self.fileno(), offset, size)

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from `offset`: the count read, 0 at the end of the file."""
        return self.disk.read_into(self.fileno(), buffer, offset)

    def read_cached(self) -> bytes | None:
        """The whole copy from the page cache, or None when that would wait or fails. Safe on
        the event loop."""
        if self._fd < 0:
            return None
        return nowait.read_cached(self._fd, self.stat.size)

    def recorded_sum(self) -> FastSum | None:
        """The fast checksum recorded on the copy (its attribute), or None."""
        return self.disk.read_sum(self.fileno())

    def record_sum(self, digest: FastSum) -> None:
        """Record `digest` (of bytes verified by the caller) on the copy; best effort."""
        self.disk.write_sum(self.fileno(), digest)

    def hashed(self, *, keep: int = 0) -> HashedCopy:
        """The whole copy hashed (SHA-256 and its fast checksum), with its recorded fast checksum,
        and its bytes too when it holds at most `keep` of them. The stat's size is the number of
        bytes actually read. Blocking."""
        hasher, fast = new_hasher(), FastHasher()
        offset = 0
        kept: list[bytes] | None = [] if self.stat.size <= keep else None
        recorded = self.recorded_sum()
        while chunk := self.read_some(offset, 1024 * 1024):
            hasher.update(chunk)
            fast.update(chunk)
            offset += len(chunk)
            if kept is not None:
                kept.append(chunk)
        data = b"".join(kept) if kept is not None and offset <= keep else None
        stat = BlobStat(self.stat.path, offset, self.stat.mtime_ns)
        return HashedCopy(Sha(hasher.hexdigest()), stat, fast.digest(), recorded, data)

    # -- ownership ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the fd, once. Blocking: the last close of a file may do I/O."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):  # nothing to do about it: the fd is gone either way
                os.close(fd)

    def __enter__(self) -> OpenCopy[D]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
