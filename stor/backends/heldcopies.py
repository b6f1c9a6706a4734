"""Small blobs' verified bytes kept in memory, beside the open-file cache.

The open-file cache (`OpenFiles`) keeps copies open so that a hot blob needs no thread hop, but
it is bounded by the process's open-file limit: with a working set of small blobs larger than
that, every GET opened a copy and pushed another out (about twice the CPU of a GET of a copy kept
open). So a small copy pushed out of it, whose bytes were verified, leaves them here, within a
budget of bytes per worker process (`small_blob_cache_bytes`): memory, not fds, bounds the
working set of small blobs served on the event loop.

A GET of a copy held here needs no fd and no read: one call asks the dentry cache whether its
file is still there (`nowait.file_cached`), so a copy removed by hand, or by a takedown in
another process, stops being served at once. The bytes are the blob's own (checked with SHA-256
when the copy was first read) and the caller checks them against their fast checksum at every
answer; a copy damaged or replaced on disk since then changes nothing served (scrub finds it).
An entry is dropped when its file is gone, with its disk, when a copy of its blob is found
corrupt, when the blob is taken down, and when it is pushed out; like a copy kept open, it has
its partners checked again every so often (`OpenFiles.due`), but its bytes are never read again.

Contract: `get` never waits (for the event loop): at most one `openat2` from the dentry cache,
no fd. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from stor.backends import nowait
from stor.backends.disk import Disk
from stor.checksum import FastSum
from stor.digest import Sha
from stor.model import BlobStat

HELD_MAX_BYTES = 64 * 1024
"""Copies up to this size are held; a bigger one would take the room of many small ones, and
`sendfile` serves it from the page cache with little CPU per byte."""
ENTRY_BYTES = 256
"""What an entry costs beyond the blob's bytes (its object, its key, its slot), counted against
the budget so that a budget of tiny blobs is not mostly overhead."""


@dataclass(eq=False, slots=True)
class HeldCopy:
    """A copy's verified bytes, for the event loop's reads (see `OpenFiles.get`)."""

    disk: Disk
    stat: BlobStat
    data: bytes
    fast: FastSum
    """The fast checksum of `data`, as verified."""
    recheck_at: float
    """When its partners are to be checked again (see `OpenFiles.due`)."""


class HeldCopies:
    def __init__(self, budget: int) -> None:
        """`budget`: bytes held at most (0: none)."""
        self.budget = budget
        self._entries: OrderedDict[Sha, HeldCopy] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def takes(self, size: int) -> bool:
        """Whether a copy of `size` bytes may be held."""
        return size <= HELD_MAX_BYTES and size + ENTRY_BYTES <= self.budget

    def put(self, sha: Sha, held: HeldCopy) -> None:
        """Hold `held` (its bytes verified by the caller), pushing out the least recently used."""
        if not self.takes(len(held.data)):
            return
        with self._lock:
            self._drop(sha)
            self._entries[sha] = held
            self._bytes += len(held.data) + ENTRY_BYTES
            while self._bytes > self.budget:
                self._drop(next(iter(self._entries)))

    def get(self, sha: Sha) -> HeldCopy | None:
        """The held copy of `sha` while its file is still there; None when there is none, its
        file is gone, or the dentry cache cannot tell (then it stays held)."""
        with self._lock:
            held = self._entries.get(sha)
            if held is None:
                return None
        there = nowait.file_cached(held.stat.path)
        with self._lock:
            if there is False:
                self._drop(sha)
                return None
            if sha in self._entries:
                self._entries.move_to_end(sha)
        return held if there else None

    def forget(self, sha: Sha) -> None:
        with self._lock:
            self._drop(sha)

    def forget_disk(self, root: str) -> None:
        with self._lock:
            for sha in [sha for sha, held in self._entries.items() if held.disk.root == root]:
                self._drop(sha)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def held(self) -> tuple[int, int]:
        """(copies, bytes counted against the budget) held now."""
        return len(self._entries), self._bytes

    def _drop(self, sha: Sha) -> None:
        """Under the lock."""
        held = self._entries.pop(sha, None)
        if held is not None:
            self._bytes -= len(held.data) + ENTRY_BYTES
