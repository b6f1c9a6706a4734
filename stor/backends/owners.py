"""Directories owned by one live process, for state that several processes share on a disk.

A process claims `<parent>/<random id>/` and holds an exclusive `flock` on the lock file in it
for as long as it lives. The kernel drops the lock when the process dies, however it dies, so
any process can tell a dead owner's directory (its lock can be taken) from a live one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator

LOCK_NAME = "owner.lock"


class OwnedDir:
    def __init__(self, parent: str) -> None:
        self.id = uuid.uuid4().hex
        self.path = os.path.join(parent, self.id)
        self._lock: int | None = None

    @property
    def claimed(self) -> bool:
        return self._lock is not None and os.path.isdir(self.path)

    def claim(self) -> None:
        """Create the directory and take its lock (again, after the disk came back)."""
        self.release()
        os.makedirs(self.path, exist_ok=True)
        # Read-only: flock needs no write access, and a file held open for writing would make
        # the disk refuse an administrator's `mount -o remount,ro` (EBUSY) while stor runs.
        fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._lock = fd

    def release(self) -> None:
        if self._lock is not None:
            fd, self._lock = self._lock, None
            os.close(fd)


CLAIMING_SECONDS = 60.0
"""An owner directory without its lock file counts as being claimed for this long."""


def dead_owner_dirs(parent: str) -> Iterator[str]:
    """The owner directories under `parent` whose process is gone."""
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not _alive(entry.path):
            yield entry.path


def _alive(owner_dir: str) -> bool:
    try:
        fd = os.open(os.path.join(owner_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # No lock yet: a process may be between its `makedirs` and its `flock` (see `claim`);
        # a directory left so by a process that died there is swept once it is old.
        try:
            return time.time() - os.stat(owner_dir).st_mtime < CLAIMING_SECONDS
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False


def return_claims(queue: str, wanted: Callable[[str], bool]) -> int:
    """Move the entries (`wanted` names) of dead owners' directories under `queue` back into
    `queue`, and remove those directories: what a process that died had claimed is claimable
    again. How many went back."""
    returned = 0
    for dead in dead_owner_dirs(queue):
        for name in os.listdir(dead):
            if wanted(name):
                os.replace(os.path.join(dead, name), os.path.join(queue, name))
                returned += 1
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(dead, LOCK_NAME))
            os.rmdir(dead)
    return returned
