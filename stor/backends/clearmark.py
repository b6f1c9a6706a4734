"""A disk's clear mark: proof, in one call from the kernel's caches, that the disk is mounted and
that nothing was added to the directories the mark watches (the disk's quarantine, and its
takedown records) since this process last listed them.

The mark is an empty file, `clear`, in this process's own temp directory
(`<root>/.stor-tmp/<owner>/`). A writer that adds an entry to a watched directory does it
inside `adding`: holding an exclusive `flock` on `.stor-tmp`, it first removes every process's
mark on the disk. A process puts its mark back and lists the watched directories under a
shared `flock` (`renew`). So while a mark is in place, no entry was added since the listing read
under it, whichever process or node (through this kernel) added it; and as the mark lives in
`.stor-tmp`, the disk's sentinel, a bare mountpoint has none (see `disk`). A writer that does not
know the mark (an older stor, during an upgrade) is caught by `revalidate`, which compares the
directories' mtimes at every health probe.

Contract: `proves_absent` never waits (for the event loop): one `openat2`, no fd. `renew`,
`revalidate` and `adding` block (worker threads); `renew` never waits for a writer (it gives
up, and is asked again). All are safe from several threads and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator

from stor.backends import nowait
from stor.digest import Sha

MARK_NAME = "clear"


class ClearMark:
    def __init__(self, tmp_root: str, owner_dir: str) -> None:
        self.tmp_root = tmp_root
        self.path = os.path.join(owner_dir, MARK_NAME)
        self.watched: list[str] = []
        self._listed: frozenset[str] | None = None  # the watched entries' shas, read under the mark
        self._mtimes: list[int] = []  # the watched directories' mtimes when they were listed
        self._renewing = threading.Lock()

    def watch(self, directory: str) -> None:
        """Vouch for `directory` too: every writer of an entry in it writes inside `adding`.
        Its entries are named `<SHA>.<anything>`. Watching one twice changes nothing."""
        if directory in self.watched:
            return
        self.watched.append(directory)
        self.forget()

    def forget(self) -> None:
        """Vouch for nothing until the next `renew` (the disk was claimed again, or went away)."""
        self._listed = None

    def proves_absent(self, sha: Sha) -> bool | None:
        """Event loop: True when the mark is in place and no watched directory held an entry
        for `sha`; False when one did (a thread must look); None when the mark is not in place,
        or not in the dentry cache (`renew` it)."""
        if nowait.file_cached(self.path) is not True:
            return None
        listed = self._listed  # read after the mark was seen: see `renew`
        if listed is None:
            return None
        return sha.upper() not in listed

    def renew(self) -> bool:
        """Put the mark in place and list the watched directories under it; False when that
        could not be done now (the disk is away, or a writer is adding: ask again later)."""
        with self._renewing:
            # Vouch for nothing before the mark is made: a loop that sees the new mark must not
            # pair it with the listing read under the old one.
            self._listed = None
            try:
                with _locked(self.tmp_root, fcntl.LOCK_SH | fcntl.LOCK_NB):
                    os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                    mtimes = [_mtime(directory) for directory in self.watched]
                    listed = frozenset(name.split(".", 1)[0] for d in self.watched for name in _names(d))
            except OSError:
                return False
            self._mtimes = mtimes
            self._listed = listed
            return True

    def revalidate(self) -> None:
        """Renew the mark when it is gone, or when a watched directory changed since it was
        listed (a writer that knows nothing of the mark). For the health probe."""
        try:
            unchanged = os.path.isfile(self.path) and [_mtime(d) for d in self.watched] == self._mtimes
        except OSError:
            unchanged = False
        if self._listed is None or not unchanged:
            self.renew()

    @contextlib.contextmanager
    def adding(self) -> Iterator[None]:
        """Add entries to a watched directory inside this block: every process's mark on the
        disk is removed first, and none is put back until the block ends."""
        with _locked(self.tmp_root, fcntl.LOCK_EX, missing_ok=True) as locked:
            if locked:  # (no `.stor-tmp`: no mark to remove, and none can be made)
                for entry in os.scandir(self.tmp_root):
                    if entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(entry.path, MARK_NAME))
            yield


@contextlib.contextmanager
def _locked(directory: str, how: int, *, missing_ok: bool = False) -> Iterator[bool]:
    """A `flock` on `directory` for the block; False, unlocked, when it is missing and that is
    fine. `BlockingIOError` when `how` does not wait and the lock is taken."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not missing_ok:
            raise
        yield False
        return
    try:
        fcntl.flock(fd, how)
        yield True
    finally:
        os.close(fd)  # drops the lock


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def _mtime(directory: str) -> int:
    try:
        return os.stat(directory).st_mtime_ns
    except FileNotFoundError:
        return -1
