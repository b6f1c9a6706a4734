"""A FUSE passthrough filesystem whose behaviour the tests switch at run time.

    python -m tests.faults.faultfs SOURCE MOUNTPOINT CONTROL

SOURCE is mirrored at MOUNTPOINT. CONTROL is a file holding the current mode, read on every
operation:

- ``ok``: plain passthrough;
- ``eio-write``: write, fsync, create, mkdir, link and rename fail with EIO;
- ``eio-read``: read fails with EIO (files are opened with direct I/O, so no page cache hides it);
- ``enospc``: writes and new entries fail with ENOSPC;
- ``erofs``: every change fails with EROFS;
- ``hang``: every operation blocks until the mode changes;
- ``slow``: every operation takes 0.2 s more.

Runs in its own process: a test that hangs the filesystem must not hang the test runner.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import mfusepy as fuse

MUTATING = {"write", "fsync", "create", "mkdir", "link", "rename", "unlink", "rmdir", "truncate", "utimens", "chmod"}
WRITES = {"write", "fsync", "create", "mkdir", "link", "rename"}


def gated(method: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the current mode before the operation."""

    @functools.wraps(method)
    def wrapper(self: FaultFS, *args: Any) -> Any:
        self._gate(method.__name__)
        return method(self, *args)

    return wrapper


class FaultFS(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: str, control: str) -> None:
        self.source = source
        self.control = control

    def _mode(self) -> str:
        try:
            with open(self.control) as f:
                return f.read().strip() or "ok"
        except OSError:
            return "ok"

    def _gate(self, op: str) -> None:
        mode = self._mode()
        while mode == "hang":
            time.sleep(0.05)
            mode = self._mode()
        if mode == "slow":
            time.sleep(0.2)
        elif mode == "erofs" and op in MUTATING:
            raise fuse.FuseOSError(errno.EROFS)
        elif mode == "enospc" and op in WRITES:
            raise fuse.FuseOSError(errno.ENOSPC)
        elif (mode == "eio-write" and op in WRITES) or (mode == "eio-read" and op == "read"):
            raise fuse.FuseOSError(errno.EIO)

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    # -- passthrough ---------------------------------------------------------------------------

    @gated
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._real(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_atime", "st_mtime", "st_ctime")
        attrs = {key: getattr(st, key) for key in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    @gated
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    @gated
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    @gated
    def access(self, path: str, amode: int) -> int:
        if not os.access(self._real(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    @gated
    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    @gated
    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    @gated
    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    @gated
    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    @gated
    def link(self, target: str, source: str) -> None:
        os.link(self._real(source), self._real(target))

    @gated
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    @gated
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._real(path))
        else:
            os.utime(self._real(path), ns=times)

    @gated
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._real(path), length)

    @gated
    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    @gated
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._real(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    @gated
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    @gated
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    @gated
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        os.fsync(fh)

    @gated
    def flush(self, path: str, fh: int) -> None:
        pass

    @gated
    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    @gated
    def opendir(self, path: str) -> int:
        return os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)

    @gated
    def releasedir(self, path: str, fh: int) -> None:
        os.close(fh)

    @gated
    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        os.fsync(fh)


def main() -> None:
    source, mountpoint, control = sys.argv[1:4]
    fuse.FUSE(
        FaultFS(source, control),
        mountpoint,
        foreground=True,
        nothreads=False,
        direct_io=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        fsname="faultfs",
    )


if __name__ == "__main__":
    main()
