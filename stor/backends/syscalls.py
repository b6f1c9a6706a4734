"""Linux calls that Python's `os` module lacks, through ctypes.

- `openat2` with `RESOLVE_CACHED` (io_uring's non-blocking open, see `nowait`);
- `syncfs`, which writes back and commits one whole filesystem (see `groupcommit`);
- `sync_file_range`, whose `WAIT_AFTER` reports a file's writeback errors since its fd was
  opened, without a journal commit;
- `fstatfs`, for the filesystem type of an open file.

The only module that calls libc through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine)
RESOLVE_CACHED = 0x20
_AT_FDCWD = -100

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

EXT4_MAGIC = 0xEF53  # ext2 and ext3 too: the ext4 driver serves them
XFS_MAGIC = 0x58465342
BTRFS_MAGIC = 0x9123683E
TMPFS_MAGIC = 0x01021994


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW_SIZE = ctypes.sizeof(_OpenHow)
_hows: dict[tuple[int, int], object] = {}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_STATFS_BYTES = 256  # struct statfs is 120 bytes on 64-bit Linux; f_type is its first word


def openat2_available() -> bool:
    return _SYS_OPENAT2 is not None


def openat2(path: str, flags: int, resolve: int) -> int:
    """The fd, or minus the errno (no exception: callers branch on the errno)."""
    if _SYS_OPENAT2 is None:
        return -errno.ENOSYS
    how = _hows.get((flags, resolve))
    if how is None:  # a few combinations, each built once: this runs for every open on the event loop
        how = _hows[(flags, resolve)] = ctypes.byref(_OpenHow(flags, 0, resolve))
    fd = int(_syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), how, _HOW_SIZE))
    return fd if fd >= 0 else -ctypes.get_errno()


def syncfs(fd: int) -> None:
    """Write back and commit the filesystem holding `fd`; raise OSError on failure, including
    any writeback error on that filesystem since `fd` was opened or last passed here."""
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def sync_file_range(fd: int, flags: int, offset: int = 0, nbytes: int = 0) -> None:
    """`sync_file_range(2)` (nbytes 0: to the end of the file); raise OSError on failure."""
    if _sync_file_range(fd, offset, nbytes, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fs_magic(fd: int) -> int | None:
    """The `f_type` of the filesystem holding `fd` (e.g. `EXT4_MAGIC`), None if unknown."""
    buffer = ctypes.create_string_buffer(_STATFS_BYTES)
    if _fstatfs(fd, buffer) != 0:
        return None
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF
