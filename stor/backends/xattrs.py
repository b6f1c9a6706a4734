"""A copy's fast checksum on disk: the `stor.checksum.ATTR` extended attribute of its file.

Contract: `read_sum` never raises (an attribute that cannot be read is an absent one: the copy
is then verified by SHA-256, which reads the bytes and meets any real disk error there).
`write_sum` returns False when the filesystem cannot keep the attribute (no user xattrs, no room
for it, read-only, not ours to change): the copy stays valid without one. Any other error is
raised as the `OSError` it is.
"""

from __future__ import annotations

import errno
import os

from stor.checksum import ATTR, FastSum, parse

_CANNOT_KEEP = frozenset(
    {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOSPC, errno.EDQUOT, errno.E2BIG, errno.ERANGE}
    | {errno.EROFS, errno.EPERM, errno.EACCES}
)


def read_sum(fd: int) -> FastSum | None:
    """The recorded fast checksum of the open file `fd`, or None."""
    try:
        return parse(os.getxattr(fd, ATTR))
    except OSError:
        return None


def write_sum(fd: int, digest: FastSum) -> bool:
    """Record `digest` on the open file `fd` (which may be open read-only): True if kept."""
    try:
        os.setxattr(fd, ATTR, digest)
    except OSError as exc:
        if exc.errno in _CANNOT_KEEP:
            return False
        raise
    return True
