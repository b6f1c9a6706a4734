"""File calls that never wait for a disk: they answer from the kernel's caches or fail at once.

Linux has two: `openat2(RESOLVE_CACHED)` opens a file only when every component of its path
is in the dentry cache (io_uring's non-blocking open), and `preadv2(RWF_NOWAIT)` reads only
what is in the page cache. Both fail with EAGAIN rather than start I/O, so they are safe on
the event loop. They are only used on filesystems that take RWF_NOWAIT (ext4, xfs, btrfs):
there, opening for reading and `fstat` work from memory once the path is cached. tmpfs, FUSE
and NFS refuse RWF_NOWAIT (`supported` says so), and FUSE or NFS could block in `open` itself.
"""

from __future__ import annotations

import errno
import os

from stor.backends import syscalls

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_noatime = os.O_NOATIME  # a read must not dirty the inode (a journal write) on the event loop
_FILE_PROBE = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

REFUSED = (errno.EOPNOTSUPP, errno.EINVAL)
"""What a filesystem (or kernel) without the facility answers."""


def open_cached(path: str, *, path_only: bool = False) -> int | None:
    """An fd of `path` for reading (or an O_PATH fd, which only proves the file exists), when
    its whole path is in the dentry cache; None when that would need I/O or anything fails.
    A cached negative entry raises FileNotFoundError: the file is known to be absent."""
    global _noatime  # noqa: PLW0603 - learned once per process
    if not syscalls.openat2_available():
        return None
    flags = os.O_PATH | os.O_CLOEXEC if path_only else _READ_FLAGS | _noatime
    fd = syscalls.openat2(path, flags, syscalls.RESOLVE_CACHED)
    if fd == -errno.EPERM and flags & _noatime:  # O_NOATIME needs the file's owner (or root)
        _noatime = 0
        fd = syscalls.openat2(path, flags & ~os.O_NOATIME, syscalls.RESOLVE_CACHED)
    if fd >= 0:
        return fd
    if fd == -errno.ENOENT:
        raise FileNotFoundError(errno.ENOENT, "absent", path)
    return None


def file_cached(path: str) -> bool | None:
    """Whether `path` is there and not a directory, from the dentry cache alone, in one call
    and with no fd to close: an O_DIRECTORY open of a file fails with ENOTDIR. None when the
    cache cannot tell."""
    if not syscalls.openat2_available():
        return None
    fd = syscalls.openat2(path, _FILE_PROBE, syscalls.RESOLVE_CACHED)
    if fd == -errno.ENOTDIR:
        return True
    if fd >= 0:
        os.close(fd)  # a directory, as an O_PATH fd: closing it touches no filesystem
        return False
    return False if fd == -errno.ENOENT else None


def stat_cached(path: str) -> os.stat_result | None:
    """The stat of `path` when its whole path is in the dentry cache (an O_PATH open and an
    `fstat`, both from memory); None when that would need I/O. FileNotFoundError as
    `open_cached`."""
    fd = open_cached(path, path_only=True)
    if fd is None:
        return None
    try:
        return os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # an O_PATH fd: closing it touches no filesystem


def read_cached(fd: int, size: int) -> bytes | None:
    """The first `size` bytes of `fd` from the page cache; None when any of them is not there
    (or the read fails: the caller's slow path finds out why)."""
    if size == 0:
        return b""
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], 0, os.RWF_NOWAIT)
    except OSError:
        return None
    return bytes(buffer) if got == size else None


def supported(fd: int) -> bool:
    """Whether the filesystem of `fd` takes RWF_NOWAIT (and so everything in this module)."""
    if not syscalls.openat2_available():
        return False
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as exc:
        return exc.errno not in REFUSED
    return True
